"""One-row GEMVs: fused residual + RMSNorm + GEMV (+ GLU), the batch-1 GEMV (with norm / scale / GLU
epilogues), the fused QKV GEMV + rotary + paged KV write, and the cuBLAS-vs-Triton pick for one-row linears.
The batch-1 GEMV and the QKV one also take FP8 (E4M3) weights with their scales, so the batch-1 chain runs
on FP8 models too."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from giants.inference.kernels.common import ACTS, _act, _grid_dep, _np2, _pdl, cold_copies, time_ms
from giants.inference.kernels.fp8 import _layout, _w_apply, _w_load, _w_tile


# ---- residual add + RMSNorm + one-row GEMV (+ GLU) --------------------------------------------
@triton.jit
def _norm_gemv_kernel(X, R, NW, W, B, Y, RES_OUT, N, K, eps, alpha, limit, HAS_RES: tl.constexpr,
                      PLUS_ONE: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """y = W @ norm(x [+ r]) for one row, the norm computed by every program from x (a few KB, read from
    L2) instead of by a kernel of its own; program 0 stores x + r, the new residual stream. With GLU >= 0
    W holds [gate; up] (2N rows) and y = act(gate . h, up . h): the GLU kernel goes too. Intermediate
    values are rounded to the activation dtype where the unfused kernels store them."""
    _grid_dep(PDL)
    pid = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    ss = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = k0 + rk < K
        x = tl.load(X + k0 + rk, mask=km, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(R + k0 + rk, mask=km, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            if pid == 0:
                tl.store(RES_OUT + k0 + rk, x, mask=km)
        xf = x.to(tl.float32)
        ss += xf * xf
    rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    w_ptr = W + rn.to(tl.int64)[:, None] * K + rk[None, :]
    u_ptr = W + (rn + N).to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = k0 + rk < K
        x = tl.load(X + k0 + rk, mask=km, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(R + k0 + rk, mask=km, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        nw = tl.load(NW + k0 + rk, mask=km, other=0.0).to(tl.float32)
        if PLUS_ONE:
            nw = nw + 1.0
        h = ((x.to(tl.float32) * rstd) * nw).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + k0, mask=nm[:, None] & km[None, :], other=0.0)
        acc += w.to(tl.float32) * h[None, :]
        if GLU >= 0:
            wu = tl.load(u_ptr + k0, mask=nm[:, None] & km[None, :], other=0.0)
            acc_u += wu.to(tl.float32) * h[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=nm, other=0.0).to(tl.float32)
    if GLU >= 0:
        u = tl.sum(acc_u, axis=1)
        if HAS_BIAS:
            u += tl.load(B + N + rn, mask=nm, other=0.0).to(tl.float32)
        g = y.to(Y.dtype.element_ty).to(tl.float32)
        u = u.to(Y.dtype.element_ty).to(tl.float32)
        y = _act(g, u, alpha, limit, GLU)
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=nm)


NORM_GEMV_CONFIGS = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                     for bn, bk, nw, ns in ((8, 512, 4, 4), (4, 1024, 4, 4), (16, 256, 4, 4), (8, 1024, 8, 3),
                                            (16, 512, 8, 3), (4, 512, 4, 3))]


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              plus_one: bool, w: torch.Tensor, bias: torch.Tensor | None, *, glu: str | None = None,
              alpha: float = 1.702, limit: float = 7.0, block_n: int = 8, block_k: int = 512, num_warps: int = 4,
              num_stages: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual: (1, K); w: (N, K), or (2F, K) = [gate; up] with `glu` -> (y (1, N or F), x + residual
    or None): rmsnorm then F.linear (then the GLU) for one row in one kernel."""
    N2, K = w.shape
    N = N2 // 2 if glu is not None else N2
    if not (x.shape == (1, K) and x.is_contiguous() and w.is_contiguous()):
        raise ValueError(f"norm_gemv needs contiguous x (1, {K}) and w (N, {K}); got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}")
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    _norm_gemv_kernel[(triton.cdiv(N, block_n),)](
        x, residual if residual is not None else x, norm_weight, w, bias if bias is not None else w, y,
        res_out if res_out is not None else y, N, K, eps, alpha, limit, HAS_RES=residual is not None,
        PLUS_ONE=plus_one, HAS_BIAS=bias is not None, GLU=ACTS[glu] if glu is not None else -1, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages, **_pdl())
    return y, res_out


# ---- batch-1 GEMV ---------------------------------------------------------------------------
# The batch-1 GEMVs load their first weight tile before waiting for the previous kernel (PDL), so a kernel's
# stream starts while the previous one drains; False waits first (benchmarks/bench_fp8.py reruns with it).
EARLY_TILE = True

class ChainNorm(NamedTuple):
    """The batch-1 chain's pending RMSNorm: the sums of squares of the new residual stream, one per program of
    the GEMV that made it, over n values, and the norm's eps. The next GEMV scales its sums by
    rsqrt(sum(parts) / n + eps), each of its programs summing the parts itself (loaded before its weight
    stream, summed after), so the producer needs no last-program ticket and no serial tail."""

    parts: torch.Tensor
    n: int
    eps: float

    def rstd(self) -> torch.Tensor:
        """The (1,) fp32 factor the consumer kernels compute (for references and checks)."""
        return torch.rsqrt(self.parts.sum(0, keepdim=True) / self.n + self.eps)


def _scale_args(scale: ChainNorm | None) -> tuple:
    """(parts, number of parts, n, eps, SCALED, BLOCK_SP) for a consumer kernel."""
    if scale is None:
        return None, 1, 1, 0.0, False, 1
    return scale.parts, scale.parts.numel(), scale.n, scale.eps, True, _np2(scale.parts.numel())


@triton.jit
def _scale_parts(S_IN, SP, SCALED: tl.constexpr, BLOCK_SP: tl.constexpr):
    """A ChainNorm's parts, loaded early (the sum waits for them only after the weight stream)."""
    rp = tl.arange(0, BLOCK_SP)
    if SCALED:
        parts = tl.load(S_IN + rp, mask=rp < SP, other=0.0)
    else:
        parts = tl.zeros((BLOCK_SP,), tl.float32)
    return parts


@triton.jit
def _row_dots(X, W, rn, nm, N, K, S_IN, SP, GLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, SCALED: tl.constexpr, BLOCK_SP: tl.constexpr, PDL: tl.constexpr,
              EARLY: tl.constexpr):
    """(sum_k W[rn, k] X[k], and with GLU >= 0 the same over rows rn + N, else zeros) in fp32, and the ChainNorm
    parts: one stream over the weight rows (rows outside nm read as zero), x loaded once per K tile for both.
    EARLY: the first weight tile is loaded before the wait for the previous kernel (see _row_dots_fp8)."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    rk = tl.arange(0, BLOCK_K)
    w_ptr = W + rn.to(tl.int64)[:, None] * K + rk[None, :]
    u_ptr = W + (rn + N).to(tl.int64)[:, None] * K + rk[None, :]
    m0 = nm[:, None] & (rk < K)[None, :]
    if not EARLY:
        _grid_dep(PDL)
    w = tl.load(w_ptr, mask=m0, other=0.0)
    wu = w
    if GLU >= 0:
        wu = tl.load(u_ptr, mask=m0, other=0.0)
    if EARLY:
        _grid_dep(PDL)
    parts = _scale_parts(S_IN, SP, SCALED, BLOCK_SP)
    x = tl.load(X + rk, mask=rk < K, other=0.0)
    acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if GLU >= 0:
        acc_u += wu.to(tl.float32) * x.to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(X + k0 + rk)
            w = tl.load(w_ptr + k0, mask=nm[:, None], other=0.0)
            if GLU >= 0:
                wu = tl.load(u_ptr + k0, mask=nm[:, None], other=0.0)
        else:
            km = k0 + rk < K
            x = tl.load(X + k0 + rk, mask=km, other=0.0)
            w = tl.load(w_ptr + k0, mask=nm[:, None] & km[None, :], other=0.0)
            if GLU >= 0:
                wu = tl.load(u_ptr + k0, mask=nm[:, None] & km[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        if GLU >= 0:
            acc_u += wu.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1), tl.sum(acc_u, axis=1), parts


@triton.jit
def _row_dots_fp8(X, W, S, rn, nm, N, K, KB, S_IN, SP, GLU: tl.constexpr, ROWWISE: tl.constexpr, SBN: tl.constexpr,
                  SBK: tl.constexpr, ACC_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr, SCALED: tl.constexpr, BLOCK_SP: tl.constexpr, PDL: tl.constexpr,
                  EARLY: tl.constexpr):
    """_row_dots for an FP8 (E4M3) weight with scales S (giants.inference.kernels.fp8's layouts): the finished
    sums times the row scale (ROWWISE), else each SBK-wide slice's sum times its block scale as it is added.
    Returns (y, u, the ChainNorm parts).

    EARLY: the first weight tile is loaded before the wait for the previous kernel (_grid_dep): the weights do not
    depend on it, so under PDL this program's stream starts while the previous kernel drains, instead of every
    kernel of the batch-1 chain paying its DRAM ramp after the last one's tail."""
    rk = tl.arange(0, BLOCK_K)
    w_rows = W + rn.to(tl.int64)[:, None] * K
    u_rows = W + (rn + N).to(tl.int64)[:, None] * K
    s_rows = S + (rn // SBN).to(tl.int64) * KB
    u_srows = S + ((rn + N) // SBN).to(tl.int64) * KB
    if not EARLY:
        _grid_dep(PDL)
    w0 = _w_load(w_rows, 0, rk, nm, K, EVEN_K)
    u0 = w0
    if GLU >= 0:
        u0 = _w_load(u_rows, 0, rk, nm, K, EVEN_K)
    if EARLY:
        _grid_dep(PDL)
    parts = _scale_parts(S_IN, SP, SCALED, BLOCK_SP)
    if EVEN_K:
        x = tl.load(X + rk).to(tl.float32)
    else:
        x = tl.load(X + rk, mask=rk < K, other=0.0).to(tl.float32)
    acc = _w_apply(w0, s_rows, x, 0, nm, KB, ROWWISE, SBK, BLOCK_N, BLOCK_K)
    acc_u = tl.zeros((BLOCK_N, ACC_W), tl.float32)
    if GLU >= 0:
        acc_u = _w_apply(u0, u_srows, x, 0, nm, KB, ROWWISE, SBK, BLOCK_N, BLOCK_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(X + k0 + rk).to(tl.float32)
        else:
            x = tl.load(X + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        acc += _w_tile(w_rows, s_rows, x, k0, rk, nm, K, KB, ROWWISE, SBK, BLOCK_N, BLOCK_K, EVEN_K)
        if GLU >= 0:
            acc_u += _w_tile(u_rows, u_srows, x, k0, rk, nm, K, KB, ROWWISE, SBK, BLOCK_N, BLOCK_K, EVEN_K)
    y = tl.sum(acc, axis=1)
    u = tl.sum(acc_u, axis=1)
    if ROWWISE:
        y = y * tl.load(s_rows, mask=nm, other=0.0)
        if GLU >= 0:
            u = u * tl.load(u_srows, mask=nm, other=0.0)
    return y, u, parts


@triton.jit
def _dots(X, W, S, rn, nm, N, K, KB, S_IN, SP, GLU: tl.constexpr, FP8: tl.constexpr, ROWWISE: tl.constexpr,
          SBN: tl.constexpr, SBK: tl.constexpr, ACC_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          EVEN_K: tl.constexpr, SCALED: tl.constexpr, BLOCK_SP: tl.constexpr, PDL: tl.constexpr,
          EARLY: tl.constexpr):
    """(y, u, the ChainNorm parts): the row dots wait for the previous kernel themselves, after loading their
    first weight tile, then load the parts early (the sum waits for them only after the weight stream)."""
    if FP8:
        y, u, parts = _row_dots_fp8(X, W, S, rn, nm, N, K, KB, S_IN, SP, GLU, ROWWISE, SBN, SBK, ACC_W, BLOCK_N,
                                    BLOCK_K, EVEN_K, SCALED, BLOCK_SP, PDL, EARLY)
    else:
        y, u, parts = _row_dots(X, W, rn, nm, N, K, S_IN, SP, GLU, BLOCK_N, BLOCK_K, EVEN_K, SCALED, BLOCK_SP, PDL,
                                EARLY)
    return y, u, parts


@triton.jit
def _gemv_kernel(X, W, WS, B, Y, R, NW, HX, SS, S_IN, SP, SN, seps, N, K, KB, alpha, limit,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 HAS_RES: tl.constexpr, PLUS_ONE: tl.constexpr, SCALED: tl.constexpr, BLOCK_SP: tl.constexpr,
                 GLU: tl.constexpr, FP8: tl.constexpr, ROWWISE: tl.constexpr, SBN: tl.constexpr,
                 SBK: tl.constexpr, ACC_W: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    """Y[n] = sum_k X[k] W[n, k] (+ B[n]) for one row x: a pure stream over W.

    SCALED: the sum is multiplied, before the bias, by rsqrt(sum(S_IN[:SP]) / SN + seps) (a ChainNorm), so
    with X = x * nw that is rstd(x) and this is linear(rmsnorm(x)) without a norm kernel. GLU >= 0: W holds
    [gate; up] (2N rows) and Y = act(gate, up). HAS_RES (the O and down projections of a chained layer):
    Y = round(round(y) + R), the new residual stream, as the norm kernel would add it; HX = round(Y * NW), the
    next norm's input times its weight; SS[pid] the sum of this program's squares of Y, which the next GEMV's
    programs add up in a fixed order (deterministic)."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    y, u, parts = _dots(X, W, WS, rn, nm, N, K, KB, S_IN, SP, GLU, FP8, ROWWISE, SBN, SBK, ACC_W, BLOCK_N, BLOCK_K,
                        EVEN_K, SCALED, BLOCK_SP, PDL, EARLY)
    if SCALED:
        f = tl.rsqrt(tl.sum(parts, axis=0) / SN + seps)
        y = y * f
    if HAS_BIAS:
        y += tl.load(B + rn, mask=nm, other=0.0).to(tl.float32)
    if GLU >= 0:
        if SCALED:
            u = u * f
        if HAS_BIAS:
            u += tl.load(B + N + rn, mask=nm, other=0.0).to(tl.float32)
        y = _act(y.to(Y.dtype.element_ty).to(tl.float32), u.to(Y.dtype.element_ty).to(tl.float32), alpha, limit,
                 GLU)
    if HAS_RES:
        r = tl.load(R + rn, mask=nm, other=0.0).to(tl.float32)
        x = (y.to(Y.dtype.element_ty).to(tl.float32) + r).to(Y.dtype.element_ty)
        tl.store(Y + rn, x, mask=nm)
        xf = tl.where(nm, x.to(tl.float32), 0.0)
        nw = tl.load(NW + rn, mask=nm, other=0.0).to(tl.float32)
        if PLUS_ONE:
            nw = nw + 1.0
        tl.store(HX + rn, (xf * nw).to(HX.dtype.element_ty), mask=nm)
        tl.store(SS + pid, tl.sum(xf * xf, axis=0))
    else:
        tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=nm)


def _weight_args(w, block_k: int) -> tuple[torch.Tensor, torch.Tensor, int, int, dict]:
    """(weight, scales, scale columns, K tile, the kernels' weight constexprs) for a float weight tensor or an FP8Weight
    (giants.inference.fp8): an FP8 weight streams one byte a weight, its block scales need K tiles of at least
    one scale block."""
    if isinstance(w, torch.Tensor):
        return w, w, 1, block_k, dict(FP8=False, ROWWISE=True, SBN=1, SBK=1, ACC_W=block_k)
    rowwise, sbn, sbk, _ = _layout(w, False)
    if not rowwise:
        block_k = max(block_k, sbk)
    return w.q, w.scale, w.scale.shape[-1], block_k, dict(FP8=True, ROWWISE=rowwise, SBN=sbn,
                                                          SBK=1 if rowwise else sbk,
                                                          ACC_W=block_k if rowwise else block_k // sbk)


def gemv(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, scale: ChainNorm | None = None,
         glu: str | None = None, alpha: float = 1.702, limit: float = 7.0,
         residual: tuple[torch.Tensor, torch.Tensor, float, bool] | None = None, block_n: int = 8,
         block_k: int = 512, num_warps: int = 4, num_stages: int = 4):
    """x: (1, K), w: (N, K) row-major (or an FP8Weight) -> (1, N); F.linear for a single row.

    scale: a ChainNorm, whose rstd multiplies the product before the bias (x is then the chained norm's input
    times its weight); glu: w is [gate; up] (2N, K) and the result act(gate, up) (1, N).
    residual = (r (1, N), next norm weight (N,), eps, plus_one): returns (r + linear, that times the norm
    weight, its ChainNorm) for the next chained GEMV."""
    N2, K = w.shape
    N = N2 // 2 if glu is not None else N2
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    grid = triton.cdiv(N, block_n)
    if residual is not None:
        r, nw, eps, plus_one = residual
        hx = torch.empty_like(y)
        ss = torch.empty(grid, dtype=torch.float32, device=x.device)
    else:
        r = nw = hx = ss = y
        plus_one = False
    s_in, sp, sn, seps, scaled, block_sp = _scale_args(scale)
    wq, ws, kb, block_k, wargs = _weight_args(w, block_k)
    _gemv_kernel[(grid,)](x, wq, ws, bias if bias is not None else wq, y, r, nw, hx, ss,
                          s_in if s_in is not None else y, sp, sn, seps, N, K, kb, alpha, limit,
                          HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
                          HAS_RES=residual is not None, PLUS_ONE=plus_one, SCALED=scaled, BLOCK_SP=block_sp,
                          GLU=ACTS[glu] if glu is not None else -1, num_warps=num_warps, num_stages=num_stages,
                          EARLY=EARLY_TILE, **wargs, **_pdl())
    return (y, hx, ChainNorm(ss, N, eps)) if residual is not None else y


@triton.jit
def _qkv_rope_gemv_kernel(X, W, WS, B, S_IN, SP, SN, seps, COS, SIN, Q_OUT, K_CACHE, V_CACHE, SLOT, K, KB, H, HKV,
                          HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, BLOCK_SP: tl.constexpr,
                          HAS_ROPE: tl.constexpr, HALF: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr,
                          ROWWISE: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, ACC_W: tl.constexpr,
                          PDL: tl.constexpr, EARLY: tl.constexpr):
    """The one-row QKV projection with the rotary and the KV-cache write in its epilogue (no qkv tensor,
    no rotary kernel). Program p covers BLOCK_N / 2 rows of one head's first half and the matching rows
    of its second half, so each rotation pair meets in one program; rows are ordered lo0, hi0, lo1, ...
    Values are rounded to the activation dtype where the unfused GEMV stores qkv."""
    BH: tl.constexpr = BLOCK_N // 2
    D: tl.constexpr = 2 * HALF
    pid = tl.program_id(0)
    head = pid // (HALF // BH)
    j = (pid % (HALF // BH)) * BH + tl.arange(0, BH)  # (BH,) positions in the half
    i = tl.arange(0, BLOCK_N)
    rn = head * D + (pid % (HALF // BH)) * BH + i // 2 + (i % 2) * HALF
    y, _, parts = _dots(X, W, WS, rn, tl.full((BLOCK_N,), 1, tl.int1), 0, K, KB, S_IN, SP, -1, FP8, ROWWISE, SBN,
                        SBK, ACC_W, BLOCK_N, BLOCK_K, EVEN_K, SCALED, BLOCK_SP, PDL, EARLY)
    if SCALED:
        y = y * tl.rsqrt(tl.sum(parts, axis=0) / SN + seps)
    if HAS_BIAS:
        y += tl.load(B + rn).to(tl.float32)
    y = y.to(Q_OUT.dtype.element_ty).to(tl.float32)
    lo, hi = tl.split(tl.reshape(y, (BH, 2)))
    if HAS_ROPE and head < H + HKV:
        c = tl.load(COS + j).to(tl.float32)
        s = tl.load(SIN + j).to(tl.float32)
        lo, hi = lo * c - hi * s, hi * c + lo * s
    if head < H:
        dst = Q_OUT + head * D
    else:
        slot = tl.load(SLOT).to(tl.int64)
        if head < H + HKV:
            dst = K_CACHE + (slot * HKV + head - H) * D
        else:
            dst = V_CACHE + (slot * HKV + head - H - HKV) * D
    tl.store(dst + j, lo.to(Q_OUT.dtype.element_ty))
    tl.store(dst + HALF + j, hi.to(Q_OUT.dtype.element_ty))


def qkv_rope_gemv(x: torch.Tensor, w, bias: torch.Tensor | None, scale: ChainNorm | None,
                  cos: torch.Tensor | None, sin: torch.Tensor | None, q_out: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slots: torch.Tensor, H: int, Hkv: int, *, block_n: int = 8,
                  block_k: int = 512, num_warps: int = 4, num_stages: int = 4) -> None:
    """One row: qkv = x @ w.T (* scale) (+ bias), then what rope_kv_write does with it, in one kernel.
    x: (1, K); w: ((H + 2 Hkv) D, K), a tensor or an FP8Weight; cos/sin (1, D/2) or None; q_out (1, H, D);
    caches (blocks, bs, Hkv, D)."""
    D = q_out.shape[-1]
    K = w.shape[1]
    if block_n % 2 or (D // 2) % (block_n // 2) or w.shape[0] != (H + 2 * Hkv) * D or x.shape != (1, K):
        raise ValueError(f"qkv_rope_gemv: block_n {block_n} must be even and split D/2 = {D // 2}; w "
                         f"{tuple(w.shape)} must be (({H} + 2 * {Hkv}) * {D}, K), x {tuple(x.shape)} (1, K)")
    grid = (H + 2 * Hkv) * (D // block_n)
    wq, ws, kb, block_k, wargs = _weight_args(w, block_k)
    s_in, sp, sn, seps, scaled, block_sp = _scale_args(scale)
    _qkv_rope_gemv_kernel[(grid,)](
        x, wq, ws, bias if bias is not None else wq, s_in if s_in is not None else x, sp, sn, seps,
        cos if cos is not None else x, sin if sin is not None else x, q_out, k_cache, v_cache, slots, K, kb, H, Hkv,
        HAS_BIAS=bias is not None, SCALED=scaled, BLOCK_SP=block_sp, HAS_ROPE=cos is not None, HALF=D // 2,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, num_warps=num_warps, num_stages=num_stages,
        EARLY=EARLY_TILE, **wargs, **_pdl())


GEMV_CONFIGS = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                for bn, bk, nw, ns in ((4, 1024, 4, 4), (8, 512, 4, 4), (16, 256, 4, 4), (8, 1024, 8, 3),
                                       (16, 512, 8, 3), (32, 256, 8, 3), (2, 2048, 4, 4))]


def pick_linear_1row(w: torch.Tensor, bias: torch.Tensor | None, reps: int = 30):
    """Time F.linear (cuBLAS) against the Triton GEMV configs for a one-row input (CUDA graphs, cold weight
    copies); returns the fastest as a callable x -> y, with its name and the measured microseconds of each."""
    import torch.nn.functional as F

    x = torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device)
    cands = {"cublas": lambda x, w=w: F.linear(x, w, bias)}
    for c in GEMV_CONFIGS:
        cands[f"triton{c['block_n']}x{c['block_k']}w{c['num_warps']}s{c['num_stages']}"] = \
            functools.partial(gemv, bias=bias, **c)
    ref = F.linear(x, w, bias).float()
    copies = cold_copies(w)
    times = {}
    for name, fn in cands.items():
        try:
            y = fn(x, w=w)
            if name != "cublas" and not torch.allclose(y.float(), ref, atol=2e-2, rtol=2e-2):
                continue
            times[name] = time_ms(lambda i, fn=fn: fn(x, w=copies[i % len(copies)]), reps) * 1e3
        except Exception:  # noqa: BLE001 - a config that does not compile for this shape is skipped
            torch.cuda.synchronize()
            continue
    best = min(times, key=times.get)
    return functools.partial(cands[best], w=w), best, times
