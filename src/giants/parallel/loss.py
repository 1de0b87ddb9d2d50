"""Next-token cross-entropy on plain or vocab-sharded logits, and its average over data-parallel ranks.

`cross_entropy` has the trainer's semantics (giants.train.losses.causal_lm_loss): fp32, positions labelled
`ignore_index` do not count, "mean" = sum over target tokens / their count (clamped at 1). Logits may be a plain
tensor, or the Shard(-1) DTensor that the tensor-parallel plan leaves at the model's output (apply_tp with
loss_parallel=True): then the loss is computed by torch's `loss_parallel()` on the vocabulary shards (each rank's
log-softmax over its V/n columns, with the max, the sum of exponentials and the target logit all-reduced), so the
full logits are never gathered, in the forward or the backward.

torch's loss_parallel must also be active when the backward reaches the loss (its backward ops are handled only
inside the context). `cross_entropy` removes that requirement: the loss-parallel graph is built inside an
autograd Function whose backward re-enters `loss_parallel()`, so `loss.backward()` works anywhere (and the
returned loss is a plain tensor, the same on every tensor-parallel rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum", "none")


class _LossParallelCE(torch.autograd.Function):
    """Per-token fp32 cross-entropy (ignored tokens 0) of Shard(-1) DTensor logits (N, V) against plain targets
    (N,), computed by torch's loss_parallel in forward and backward. Returns a plain (N,) tensor."""

    @staticmethod
    def forward(ctx: Any, logits: DTensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:  # type: ignore[override]
        from torch.distributed.tensor.parallel import loss_parallel

        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(True)
            with loss_parallel():
                per_token = F.cross_entropy(leaf.float(), targets, ignore_index=ignore_index, reduction="none")
        ctx.leaf, ctx.per_token = leaf, per_token
        out = per_token.to_local() if isinstance(per_token, DTensor) else per_token
        if hasattr(out, "wait"):
            out = out.wait()
        return out.detach().clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[DTensor, None, None]:  # type: ignore[override]
        from torch.distributed.tensor.parallel import loss_parallel

        leaf, per_token = ctx.leaf, ctx.per_token
        if isinstance(per_token, DTensor):
            g = DTensor.from_local(g.contiguous(), per_token.device_mesh, per_token.placements, run_check=False)
        with loss_parallel(), torch.enable_grad():
            (grad,) = torch.autograd.grad(per_token, leaf, g)
        ctx.leaf = ctx.per_token = None
        return grad, None, None


def _is_vocab_sharded(logits: torch.Tensor) -> bool:
    if not isinstance(logits, DTensor):
        return False
    pls = logits.placements
    return len(pls) == 1 and isinstance(pls[0], Shard) and pls[0].dim % logits.dim() == logits.dim() - 1


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (..., V) against targets (...) in fp32. reduction: "mean" (sum over target tokens
    / their count, at least 1: the trainer's loss), "sum", or "none" (per token, 0 where ignored; targets' shape).

    logits: a plain tensor, or a DTensor: Shard(-1) over a 1-D tensor-parallel mesh (vocab-parallel, full
    logits never gathered), any other placement is gathered first. The result is a plain tensor."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    y = targets.reshape(-1)
    if isinstance(targets, DTensor):
        raise TypeError("cross_entropy: targets must be a plain tensor (the same on every tensor-parallel rank)")
    if _is_vocab_sharded(logits):
        per_token = _LossParallelCE.apply(logits.reshape(-1, logits.shape[-1]), y, ignore_index)
    else:
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y, ignore_index=ignore_index,
                                    reduction="none")
    if reduction == "none":
        return per_token.view(targets.shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / (y != ignore_index).sum().clamp(min=1)


def token_count(targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                dp_mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Target tokens in `targets` (positions not labelled ignore_index), summed over the data-parallel ranks of
    `dp_mesh` (this rank's count when None)."""
    n = (targets != ignore_index).sum()
    if dp_mesh is None or dp_mesh.size() == 1:
        return n
    return _sum_over(n.to(torch.int64), dp_mesh)


def _sum_over(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """A scalar summed over every rank of `mesh` (any number of dims), by DTensor (Partial -> Replicate)."""
    d = DTensor.from_local(t.reshape(1), mesh, (Partial(),) * mesh.ndim, run_check=False)
    out = d.redistribute(mesh, (Replicate(),) * mesh.ndim).to_local()
    if hasattr(out, "wait"):
        out = out.wait()
    return out.reshape(())


def data_parallel_loss(loss_sum: torch.Tensor, n_tokens: torch.Tensor, dp_mesh: DeviceMesh | None = None,
                       *, grads_averaged: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss every data-parallel rank backpropagates so that the gradient is the one of the global batch's
    mean loss (one process over the whole batch), and that global mean for logging.

    loss_sum: this rank's summed token losses (cross_entropy(..., reduction="sum")); n_tokens: the global target
    token count (token_count(targets, dp_mesh=dp_mesh)). Each rank's share is loss_sum / n_tokens; FSDP averages
    gradients over the data-parallel ranks (grads_averaged=True, its default divide factor), so the share is
    multiplied by the number of ranks to make that average a sum. Returns (loss to backward, detached global mean
    loss: the all-reduced sum / n_tokens)."""
    n = n_tokens.clamp(min=1).to(loss_sum.dtype)
    share = loss_sum / n
    dp = 1 if dp_mesh is None else dp_mesh.size()
    backward_loss = share * dp if grads_averaged else share
    with torch.no_grad():
        total = share.detach()
        if dp > 1:
            assert dp_mesh is not None
            total = _sum_over(total, dp_mesh)
    return backward_loss, total
