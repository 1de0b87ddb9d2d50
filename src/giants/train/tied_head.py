"""The output head of a model whose embedding is tied to it, for training with fp32 master weights.

The tied weight W (V, D) stays fp32 in the model: the embedding lookup reads it and feeds the fp32 residual
stream. Under plain autocast the head then casts all of W to bf16 every step (1.5 GB of traffic at Llama-3.2-1B
shape), its weight gradient comes out of the GEMM in bf16 and is cast to fp32 and added to the lookup's
gradient (a zero-filled (V, D) fp32 tensor with the looked-up rows scattered in): about 1.2 ms a step on an H200.

Here the head reads a bf16 copy of W that the optimizer writes with its update (`MasterAdamW(shadow=...)`),
its weight-gradient GEMM writes fp32 directly (cuBLAS accumulates in fp32 either way; this skips the rounding
to bf16), and the lookup runs outside the graph: `scatter_embedding_grad` adds its rows into that gradient
after the backward. The forward computes what autocast computes (bf16(W) is the same round-to-nearest copy);
the weight gradient is the same sum without the intermediate bf16 rounding.
"""

from __future__ import annotations

import torch


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of low-precision operands, summed and returned in fp32 (cuBLAS writes fp32 directly on CUDA; elsewhere
    the exact products of the upcast values)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _TiedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, weight_lowp: torch.Tensor) -> torch.Tensor:
        # hidden: (N, D) in weight_lowp's dtype; weight: (V, D) fp32 (only its gradient is produced here)
        ctx.save_for_backward(hidden, weight_lowp)
        return hidden @ weight_lowp.t()  # (N, V)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight_lowp = ctx.saved_tensors
        grad = grad.to(weight_lowp.dtype)
        return grad @ weight_lowp, mm_fp32(grad.t(), hidden), None


def tied_logits(hidden: torch.Tensor, weight: torch.Tensor, weight_lowp: torch.Tensor) -> torch.Tensor:
    """hidden (..., D) -> logits (..., V) through weight_lowp (a low-precision copy of `weight`); the weight
    gradient goes to the fp32 `weight`."""
    shape = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1]).to(weight_lowp.dtype)
    return _TiedHead.apply(h, weight, weight_lowp).view(*shape, weight.shape[0])


@torch.no_grad()
def scatter_embedding_grad(weight: torch.Tensor, ids: torch.Tensor, embeds: torch.Tensor) -> None:
    """Add the lookup's gradient (`embeds.grad`, one row per id) into weight.grad (creating it if the head gave
    none): the backward of `weight[ids]`."""
    if embeds.grad is None:
        raise RuntimeError("scatter_embedding_grad: the looked-up embeddings got no gradient")
    rows = embeds.grad.reshape(-1, weight.shape[1]).to(weight.dtype)
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    weight.grad.index_put_((ids.reshape(-1),), rows, accumulate=True)
