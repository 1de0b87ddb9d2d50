"""Fused residual add + RMSNorm (with the MoE combine), the gated activation, and rotary + paged KV write."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from giants.inference.kernels.common import ACTS, _act, _grid_dep, _np2, _pdl, _rms_normed


# ---- residual add + RMSNorm ---------------------------------------------------------------
@triton.jit
def _rmsnorm_kernel(X, R, W, Y, RES, WTS, D, eps, stride_x, HAS_RES: tl.constexpr, PLUS_ONE: tl.constexpr,
                    COMBINE_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _grid_dep(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    if COMBINE_K > 0:
        # x = sum_j WTS[row, j] * X[row * K + j]: the MoE combine of K expert outputs, fused here
        xs = tl.zeros((BLOCK,), tl.float32)
        for j in tl.static_range(COMBINE_K):
            wt = tl.load(WTS + row * COMBINE_K + j).to(tl.float32)
            xs += wt * tl.load(X + (row * COMBINE_K + j) * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        x = xs.to(X.dtype.element_ty)
    else:
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * D + cols, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RES + row * D + cols, x, mask=m)
    y = _rms_normed(x.to(tl.float32), W, cols, m, D, eps, PLUS_ONE)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool,
            residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
            res_out: torch.Tensor | None = None, combine: tuple[torch.Tensor, int] | None = None
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = norm(x [+ residual]); with a residual also returns the sum (the new residual stream).
    combine=(weights (N*K,), K): x holds N*K rows (K expert outputs per token), summed with the weights first."""
    D = x.shape[1]
    K = combine[1] if combine is not None else 0
    N = x.shape[0] // max(K, 1)
    y = out if out is not None else torch.empty(N, D, dtype=x.dtype, device=x.device)
    if residual is not None:
        res_out = res_out if res_out is not None else torch.empty_like(y)
    _rmsnorm_kernel[(N,)](x, residual if residual is not None else x, weight, y,
                          res_out if residual is not None else y, combine[0] if combine is not None else x, D, eps,
                          x.stride(0), HAS_RES=residual is not None, PLUS_ONE=plus_one, COMBINE_K=K, BLOCK=_np2(D),
                          **_pdl())
    return (y, res_out) if residual is not None else y


# ---- gated activation -------------------------------------------------------------------------
@triton.jit
def _glu_kernel(GU, OUT, F, alpha, limit, ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _grid_dep(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(GU + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row * F + cols, _act(g, u, alpha, limit, ACT).to(OUT.dtype.element_ty), mask=m)


def glu(gu: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """gu: (N, 2F) = [gate | up] -> (N, F)."""
    N, F2 = gu.shape
    F = F2 // 2
    out = out if out is not None else torch.empty(N, F, dtype=gu.dtype, device=gu.device)
    BLOCK = min(1024, _np2(F))
    _glu_kernel[(N, triton.cdiv(F, BLOCK))](gu, out, F, alpha, limit, ACT=ACTS[activation], BLOCK=BLOCK, **_pdl())
    return out


# ---- rotary + KV write ---------------------------------------------------------------------
@triton.jit
def _rope_kv_kernel(QKV, COS, SIN, Q_OUT, K_CACHE, V_CACHE, SLOT, stride_qkv, H, HKV,
                    HALF: tl.constexpr, HAS_ROPE: tl.constexpr, PDL: tl.constexpr):
    _grid_dep(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    D: tl.constexpr = 2 * HALF
    i = tl.arange(0, HALF)
    base = QKV + b * stride_qkv + h * D
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    if HAS_ROPE:
        c = tl.load(COS + b * HALF + i).to(tl.float32)
        s = tl.load(SIN + b * HALF + i).to(tl.float32)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
    else:
        y1 = x1
        y2 = x2
    if h < H:
        dst = Q_OUT + (b * H + h) * D
        tl.store(dst + i, y1.to(Q_OUT.dtype.element_ty))
        tl.store(dst + HALF + i, y2.to(Q_OUT.dtype.element_ty))
    else:
        hk = h - H
        slot = tl.load(SLOT + b)
        dst = K_CACHE + (slot * HKV + hk) * D
        tl.store(dst + i, y1.to(K_CACHE.dtype.element_ty))
        tl.store(dst + HALF + i, y2.to(K_CACHE.dtype.element_ty))
        vsrc = QKV + b * stride_qkv + (H + HKV + hk) * D
        vdst = V_CACHE + (slot * HKV + hk) * D
        tl.store(vdst + i, tl.load(vsrc + i))
        tl.store(vdst + HALF + i, tl.load(vsrc + HALF + i))


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, q_out: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, H: int, Hkv: int) -> None:
    """qkv: (B, (H + 2 Hkv) D); cos/sin: (B, D/2); q_out: (B, H, D); caches (num_blocks, bs, Hkv, D);
    slots: (B,) flat slot (block * bs + offset) for each token's k and v."""
    B = qkv.shape[0]
    D = q_out.shape[-1]
    _rope_kv_kernel[(B, H + Hkv)](qkv, cos if cos is not None else qkv, sin if sin is not None else qkv, q_out,
                                  k_cache, v_cache, slots, qkv.stride(0), H, Hkv, HALF=D // 2,
                                  HAS_ROPE=cos is not None, **_pdl())
