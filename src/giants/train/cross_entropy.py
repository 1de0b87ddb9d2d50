"""Cross-entropy over bf16/fp16 logits on CUDA in two Triton passes, for the training loss.

`F.cross_entropy(logits.float(), labels)` as inductor compiles it reads the (N, V) logits in a forward kernel at
about 1.3 TB/s and again in the backward, 3.0 ms a step for Llama-3.2-1B's 8192 x 128,256 logits on an H200. Here the
forward reads each row once (an online max and sum of exponentials, in fp32) and keeps only its log-sum-exp; the
backward reads the row again and writes softmax minus one-hot, times the row's incoming gradient, in the logits'
dtype. The math is F.cross_entropy's on the fp32 upcast of the logits (same rounding point for the gradient: fp32,
then the logits' dtype), up to summation order.

Both passes are `torch.library.triton_op`s, so torch.compile keeps them inside the compiled graph.
"""

from __future__ import annotations

import torch

from giants.train.tied_head import mm_fp32

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    _HAS_TRITON = False

BLOCK = 4096
GRAD_PROGRAMS_PER_SM = 4  # _ce_grad_kernel's persistent grid (bench_ce.py: 1.99 ms at 4, 2.94 at 2, 2.03 at 8)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4

if _HAS_TRITON:

    @triton.jit
    def _ce_fwd_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, stride, ignore_index, V: tl.constexpr,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        # running max and sum of exponentials: one exp per element (a per-lane running max would need two, and the
        # exponentials, not the bytes, then bound the pass)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _ce_bwd_kernel(logits_ptr, labels_ptr, lse_ptr, grad_rows_ptr, out_ptr, stride, out_stride, ignore_index,
                       V: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row)
        g = tl.where(label != ignore_index, tl.load(grad_rows_ptr + row), 0.0)
        lse = tl.load(lse_ptr + row)
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(logits_ptr + row * stride + idx, mask=idx < V, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(idx == label, 1.0, 0.0)) * g
            tl.store(out_ptr + row * out_stride + idx, grad.to(out_ptr.dtype.element_ty), mask=idx < V)

    @triton.jit
    def _ce_grad_kernel(logits_ptr, labels_ptr, loss_ptr, out_ptr, N, stride, out_stride, ignore_index,
                        V: tl.constexpr, BLOCK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
        # Loss and unscaled gradient (softmax - one-hot, zero for ignored rows) of each row in one kernel: a
        # persistent grid walks the rows, so the rows in flight (a few per multiprocessor, 256 KB each at Llama 3's
        # vocabulary) stay in L2 between the pass that finds the log-sum-exp and the pass that writes the gradient.
        cols = tl.arange(0, BLOCK)
        for i in range(0, ROWS_PER_PROGRAM):
            row = tl.program_id(0) + i * tl.num_programs(0)
            if row < N:
                _ce_grad_row(logits_ptr, labels_ptr, loss_ptr, out_ptr, row, stride, out_stride, ignore_index, cols,
                             V, BLOCK)

    @triton.jit
    def _ce_grad_row(logits_ptr, labels_ptr, loss_ptr, out_ptr, row, stride, out_stride, ignore_index, cols,
                     V: tl.constexpr, BLOCK: tl.constexpr):
        base = logits_ptr + row.to(tl.int64) * stride
        # one max reduction a block; the sum of exponentials stays per lane until the end
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        lse = m + tl.log(tl.sum(s, axis=0))
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        obase = out_ptr + row.to(tl.int64) * out_stride
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(idx == label, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(obase + idx, grad.to(out_ptr.dtype.element_ty), mask=idx < V)

    @triton_op("giants::ce_rows_grad", mutates_args={})
    def _ce_rows_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        N, V = logits.shape
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits)
        programs = max(1, min(N, GRAD_PROGRAMS_PER_SM * _sm_count(logits.device)))
        # (rows a program as a compile-time constant: one compilation per shape, as for V)
        wrap_triton(_ce_grad_kernel)[(programs,)](logits, labels, loss, grad, N, logits.stride(0), grad.stride(0),
                                                 ignore_index, V=V, BLOCK=BLOCK,
                                                 ROWS_PER_PROGRAM=triton.cdiv(N, programs), num_warps=8)
        return loss, grad

    @triton_op("giants::ce_rows_fwd", mutates_args={})
    def _ce_rows_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        N, V = logits.shape
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        # the vocabulary size is a compile-time constant: one compilation per model
        wrap_triton(_ce_fwd_kernel)[(N,)](logits, labels, loss, lse, logits.stride(0), ignore_index, V=V, BLOCK=BLOCK,
                                          num_warps=8)
        return loss, lse

    @triton_op("giants::ce_rows_bwd", mutates_args={})
    def _ce_rows_bwd(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                     ignore_index: int) -> torch.Tensor:
        N, V = logits.shape
        out = torch.empty_like(logits)
        wrap_triton(_ce_bwd_kernel)[(N,)](logits, labels, lse, grad_rows, out, logits.stride(0), out.stride(0),
                                          ignore_index, V=V, BLOCK=BLOCK, num_warps=8)
        return out

    def _setup(ctx, inputs, output) -> None:
        logits, labels, ignore_index = inputs
        ctx.save_for_backward(logits, labels, output[1])
        ctx.ignore_index = ignore_index

    def _backward(ctx, grad_loss, grad_lse):
        logits, labels, lse = ctx.saved_tensors
        return _ce_rows_bwd(logits, labels, lse, grad_loss.float().contiguous(), ctx.ignore_index), None, None

    _ce_rows_fwd.register_autograd(_backward, setup_context=_setup)


def triton_ce_ok(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    return (_HAS_TRITON and logits.is_cuda and logits.dim() == 2 and logits.dtype in (torch.bfloat16, torch.float16)
            and logits.stride(1) == 1 and labels.dim() == 1 and labels.is_contiguous())


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-row cross-entropy (N,) in fp32 of logits (N, V) against labels (N,); rows labelled `ignore_index`
    give 0 and no gradient. CUDA bf16/fp16 logits with unit column stride (see `triton_ce_ok`)."""
    return _ce_rows_fwd(logits, labels, ignore_index)[0]


def ce_rows_and_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row cross-entropy (N,) fp32, its gradient for an upstream gradient of one per row: softmax - one-hot in
    the logits' dtype, zero rows where ignored). No autograd. One Triton kernel where `triton_ce_ok`, else torch."""
    if triton_ce_ok(logits, labels):
        return _ce_rows_grad(logits, labels, ignore_index)
    x = logits.float()
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.where(valid, lse - x.gather(1, safe[:, None])[:, 0], 0.0)
    grad = torch.exp(x - lse[:, None])
    grad[torch.arange(len(labels), device=labels.device), safe] -= 1.0
    return loss, (grad * valid[:, None]).to(logits.dtype)


class _LinearCE(torch.autograd.Function):
    """Per-row cross-entropy of hidden @ weight_lowp.T against labels; the gradient of `weight` (fp32 for an fp32
    weight, else its dtype) and of `hidden`. The logits' gradient is formed in the forward, as softmax - one-hot for
    a unit upstream gradient, and saved in place of the logits; the backward folds each row's upstream gradient g
    into the two GEMMs' small operands: d hidden = g * (G @ W), d W = G.T @ (g * hidden)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, weight_lowp: torch.Tensor, labels: torch.Tensor,
                ignore_index: int) -> torch.Tensor:
        # hidden: (N, D) in weight_lowp's dtype; weight_lowp: (V, D)
        logits = hidden @ weight_lowp.t()  # (N, V)
        loss, grad = ce_rows_and_grad(logits, labels, ignore_index)
        ctx.save_for_backward(hidden, weight_lowp, grad)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        hidden, weight_lowp, grad = ctx.saved_tensors
        g = grad_rows.float()[:, None]  # (N, 1)
        d_hidden = (mm_fp32(grad, weight_lowp) * g).to(hidden.dtype)
        scaled = (hidden.float() * g).to(hidden.dtype)
        gt = grad.t()
        d_weight = mm_fp32(gt, scaled) if ctx.weight_dtype == torch.float32 else (gt @ scaled).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, weight_lowp: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy of hidden (..., D) @ weight_lowp.T against labels (...), rows labelled ignore_index left
    out; `weight_lowp` is `weight` in the compute dtype (the same tensor, detached, when `weight` is already in
    it), and the head's weight gradient goes to `weight`."""
    h = hidden.reshape(-1, hidden.shape[-1]).to(weight_lowp.dtype)
    y = labels.reshape(-1)
    rows = _LinearCE.apply(h, weight, weight_lowp, y, ignore_index)
    return rows.sum() / (y != ignore_index).sum().clamp(min=1)
