"""FP8 (E4M3) weight kernels: the decode GEMV (one byte a weight), its expert-indexed form for MoE decode,
and a weight-only GEMM (FP8 tiles converted to the activation dtype in registers, then tl.dot) for batches
the GEMV is too narrow for. Scales: per output channel (applied once per output) or per bn x bk block (the
partial sums of each bk-wide slice scaled as they are added). Written for correctness first; configs are
timed once per weight shape on CUDA (pick_fp8_gemv), as the bf16 GEMV's are.

Weights come as giants.inference.fp8.FP8Weight: q (N, K) or (E, N, K) float8_e4m3fn, scale (..., ceil(N/bn),
ceil(K/bk)) float32, block (bn, bk).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from giants.inference.kernels.common import ACTS, _act, _grid_dep, _pdl, cold_copies, pick_config_timed


@triton.jit
def _x_tile(xp, rp, NW, k0, rk, K, rstd, XDT: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
            PLUS_ONE: tl.constexpr):
    """One K tile of the input row in fp32: x, or with NORM rmsnorm(x [+ r]) * weight, rounded to the activation
    dtype where the unfused kernels store it."""
    km = k0 + rk < K
    x = tl.load(xp + k0 + rk, mask=km, other=0.0)
    if NORM:
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(rp + k0 + rk, mask=km, other=0.0).to(tl.float32)).to(XDT)
        nw = tl.load(NW + k0 + rk, mask=km, other=0.0).to(tl.float32)
        if PLUS_ONE:
            nw = nw + 1.0
        x = ((x.to(tl.float32) * rstd) * nw).to(XDT)
    return x.to(tl.float32)


@triton.jit
def _w_load(w_rows, k0, rk, nm, K, EVEN_K: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) FP8 weight tile at K offset k0 (rows outside nm, columns past K read as zero)."""
    if EVEN_K:
        w = tl.load(w_rows + (k0 + rk)[None, :], mask=nm[:, None], other=0.0)
    else:
        w = tl.load(w_rows + (k0 + rk)[None, :], mask=nm[:, None] & (k0 + rk < K)[None, :], other=0.0)
    return w


@triton.jit
def _w_apply(w, s_rows, x, k0, nm, KB, ROWWISE: tl.constexpr, SBK: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """A loaded weight tile's share of the rows' dot products: the (BLOCK_N, BLOCK_K) products when ROWWISE (the
    row scale is applied to the finished sum), else (BLOCK_N, BLOCK_K / SBK) slice sums already times their block
    scales."""
    prod = w.to(tl.float32) * x[None, :]
    if ROWWISE:
        return prod
    else:
        NBK: tl.constexpr = BLOCK_K // SBK
        part = tl.sum(tl.reshape(prod, (BLOCK_N, NBK, SBK)), axis=2)
        kb = k0 // SBK + tl.arange(0, NBK)
        sc = tl.load(s_rows[:, None] + kb[None, :], mask=nm[:, None] & (kb < KB)[None, :], other=0.0)
        return part * sc


@triton.jit
def _w_tile(w_rows, s_rows, x, k0, rk, nm, K, KB, ROWWISE: tl.constexpr, SBK: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """_w_apply of the tile at k0."""
    return _w_apply(_w_load(w_rows, k0, rk, nm, K, EVEN_K), s_rows, x, k0, nm, KB, ROWWISE, SBK, BLOCK_N, BLOCK_K)


@triton.jit
def _fp8_gemv_kernel(X, X_ROW, EXPERT, W, S, B, Y, R, NW, RES_OUT, N, K, KB, SROWS, stride_x, stride_y, eps, alpha,
                     limit, HAS_BIAS: tl.constexpr, INDEXED: tl.constexpr, ROWWISE: tl.constexpr, SBN: tl.constexpr,
                     SBK: tl.constexpr, ACC_W: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
                     PLUS_ONE: tl.constexpr, GLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, PDL: tl.constexpr):
    """Y[p, n] = sum_k x_p[k] * q[e_p, n, k] * scale (+ B[e_p, n]); x_p = X[X_ROW[p]], e_p = EXPERT[p] when
    INDEXED, else x_p = X[p] and e_p = 0. Program (n tile, p) streams BLOCK_N weight rows once. ROWWISE: one
    scale per row, applied to the finished sum; else the sums of each SBK-wide slice are scaled by
    S[e_p, n // SBN, k // SBK] (BLOCK_K is a multiple of SBK).
    NORM (dense rows): x_p is rmsnorm(X[p] [+ R[p]]) * NW, the norm computed by every program from the row (a few
    KB, from L2), and the programs of n tile 0 store X[p] + R[p], the new residual stream, in RES_OUT.
    GLU >= 0: W holds [gate; up] (2N rows) and Y = act(gate . x, up . x)."""
    _grid_dep(PDL)
    p = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    if INDEXED:
        e = tl.load(EXPERT + p).to(tl.int64)
        xr = tl.load(X_ROW + p).to(tl.int64)
    else:
        e = (p * 0).to(tl.int64)
        xr = p.to(tl.int64)
    XDT: tl.constexpr = X.dtype.element_ty
    ROWS: tl.constexpr = 2 if GLU >= 0 else 1
    w_rows = W + e * ROWS * N * K + rn.to(tl.int64)[:, None] * K
    s_rows = S + e * SROWS * KB + (rn // SBN).to(tl.int64) * KB
    u_rows = W + e * ROWS * N * K + (rn + N).to(tl.int64)[:, None] * K
    u_srows = S + e * SROWS * KB + ((rn + N) // SBN).to(tl.int64) * KB
    xp = X + xr * stride_x
    rp = R + xr * K
    rk = tl.arange(0, BLOCK_K)
    if NORM:
        ss = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = k0 + rk < K
            x = tl.load(xp + k0 + rk, mask=km, other=0.0)
            if HAS_RES:
                x = (x.to(tl.float32) + tl.load(rp + k0 + rk, mask=km, other=0.0).to(tl.float32)).to(XDT)
                if tl.program_id(0) == 0:
                    tl.store(RES_OUT + xr * K + k0 + rk, x, mask=km)
            ss += x.to(tl.float32) * x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    else:
        rstd = tl.full((), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_N, ACC_W), tl.float32)
    acc_u = tl.zeros((BLOCK_N, ACC_W), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _x_tile(xp, rp, NW, k0, rk, K, rstd, XDT, NORM, HAS_RES, PLUS_ONE)
        acc += _w_tile(w_rows, s_rows, x, k0, rk, nm, K, KB, ROWWISE, SBK, BLOCK_N, BLOCK_K, EVEN_K)
        if GLU >= 0:
            acc_u += _w_tile(u_rows, u_srows, x, k0, rk, nm, K, KB, ROWWISE, SBK, BLOCK_N, BLOCK_K, EVEN_K)
    y = tl.sum(acc, axis=1)
    if ROWWISE:
        y = y * tl.load(s_rows, mask=nm, other=0.0)
    if HAS_BIAS:
        y += tl.load(B + e * ROWS * N + rn, mask=nm, other=0.0).to(tl.float32)
    if GLU >= 0:
        u = tl.sum(acc_u, axis=1)
        if ROWWISE:
            u = u * tl.load(u_srows, mask=nm, other=0.0)
        if HAS_BIAS:
            u += tl.load(B + e * ROWS * N + N + rn, mask=nm, other=0.0).to(tl.float32)
        y = _act(y.to(XDT).to(tl.float32), u.to(XDT).to(tl.float32), alpha, limit, GLU)
    tl.store(Y + p.to(tl.int64) * stride_y + rn, y.to(Y.dtype.element_ty), mask=nm)


FP8_GEMV_CONFIGS = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                    for bn, bk, nw, ns in ((8, 1024, 4, 3), (4, 1024, 4, 4), (16, 512, 4, 3), (8, 512, 4, 4),
                                           (16, 1024, 8, 3), (32, 512, 8, 3), (4, 2048, 4, 3), (2, 2048, 4, 4))]
DEFAULT_GEMV = FP8_GEMV_CONFIGS[0]
_gemv_choice: dict[tuple, dict] = {}


def _layout(w, indexed: bool) -> tuple[bool, int, int, int]:
    """(rowwise, SBN, SBK, scale rows per expert) of an FP8Weight; raises if the kernels cannot take it."""
    N, K = w.q.shape[-2:]
    rowwise = w.block[0] == 1 and w.scale.shape[-1] == 1
    sbn, sbk = w.block
    if not rowwise and (sbk & (sbk - 1) or not 16 <= sbk <= 1024):
        raise ValueError(f"FP8 kernels: scale block width {sbk} must be a power of two in [16, 1024]")
    if w.q.dim() != (3 if indexed else 2) or not w.q.is_contiguous() or not w.scale.is_contiguous():
        raise ValueError(f"FP8 kernels: contiguous q ({'E, ' if indexed else ''}N, K) expected, got "
                         f"{tuple(w.q.shape)}")
    return rowwise, (1 if rowwise else sbn), (K if rowwise else sbk), w.scale.shape[-2]


def supports(w) -> bool:
    try:
        _layout(w, w.q.dim() == 3)
    except ValueError:
        return False
    return True


def _launch_gemv(x: torch.Tensor, rows, experts, w, bias, out: torch.Tensor, cfg: dict, indexed: bool,
                 norm: tuple | None = None, glu: str | None = None, alpha: float = 1.702, limit: float = 7.0) -> None:
    """norm: (residual or None, norm weight, eps, plus_one, residual out or None) for a norm in front."""
    N2, K = w.q.shape[-2:]
    N = N2 // 2 if glu is not None else N2
    rowwise, sbn, sbk, srows = _layout(w, indexed)
    block_k = cfg["block_k"] if rowwise else max(cfg["block_k"], sbk)
    P = out.shape[0]
    if P == 0:
        return
    r, nw, eps, plus_one, res_out = norm if norm is not None else (None, None, 0.0, False, None)
    _fp8_gemv_kernel[(triton.cdiv(N, cfg["block_n"]), P)](
        x, rows if indexed else x, experts if indexed else x, w.q, w.scale, bias if bias is not None else x, out,
        r if r is not None else x, nw if nw is not None else x, res_out if res_out is not None else x,
        N, K, w.scale.shape[-1], srows, x.stride(0), out.stride(0), eps, alpha, limit, HAS_BIAS=bias is not None,
        INDEXED=indexed, ROWWISE=rowwise, SBN=sbn, SBK=sbk if not rowwise else 1,
        ACC_W=block_k if rowwise else block_k // sbk,
        NORM=norm is not None, HAS_RES=r is not None, PLUS_ONE=plus_one, GLU=ACTS[glu] if glu is not None else -1,
        BLOCK_N=cfg["block_n"], BLOCK_K=block_k, EVEN_K=K % block_k == 0, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **_pdl())


def gemv_config(w, bias, x: torch.Tensor, indexed: bool = False, config: dict | None = None) -> dict:
    """config, else the tile timed once per weight shape on CUDA (outside graph capture), else DEFAULT_GEMV."""
    if config is not None:
        return config
    key = (tuple(w.q.shape), w.block, tuple(w.scale.shape), bias is not None, x.dtype, indexed)
    if key not in _gemv_choice:
        tune = (x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and not indexed
                and not torch.cuda.is_current_stream_capturing())
        _gemv_choice[key] = pick_fp8_gemv(w, bias, x.dtype) if tune else DEFAULT_GEMV
    return _gemv_choice[key]


def fp8_gemv(x: torch.Tensor, w, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x (M, K) contiguous, w an FP8Weight (N, K) -> (M, N) in x's dtype; one program row per input row."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"fp8_gemv: x must be (M, K) with unit column stride, got {tuple(x.shape)}")
    out = torch.empty(x.shape[0], w.q.shape[0], dtype=x.dtype, device=x.device)
    _launch_gemv(x, None, None, w, bias, out, gemv_config(w, bias, x, False, config), False)
    return out


def fp8_expert_gemv(x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, w, bias: torch.Tensor | None,
                    config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K); rows, experts (P,) int; w an FP8Weight with q (E, N, K); bias (E, N) or None -> (P, N):
    out[p] = W[experts[p]] @ x[rows[p]] (+ bias[experts[p]]). out: (P, N) with unit column stride (any row
    stride: e.g. the gate half of a [gate | up] buffer)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"fp8_expert_gemv: x must be (M, K) with unit column stride, got {tuple(x.shape)}")
    P, N = experts.shape[0], w.q.shape[1]
    if out is None:
        out = torch.empty(P, N, dtype=x.dtype, device=x.device)
    elif out.shape != (P, N) or out.stride(1) != 1:
        raise ValueError(f"fp8_expert_gemv: out must be ({P}, {N}) with unit column stride, got "
                         f"{tuple(out.shape)} strides {out.stride()}")
    _launch_gemv(x, rows, experts, w, bias, out, config or dict(block_n=16, block_k=512, num_warps=4, num_stages=3),
                 True)
    return out


def fp8_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  plus_one: bool, w, bias: torch.Tensor | None, *, glu: str | None = None, alpha: float = 1.702,
                  limit: float = 7.0, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear(rmsnorm(x [+ residual]) * norm_weight) (then the GLU of [gate; up] with `glu`) for a few rows in one
    kernel -> (y (M, N or N/2), x + residual or None). x, residual: (M, K) contiguous; w an FP8Weight."""
    if x.dim() != 2 or not x.is_contiguous() or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"fp8_norm_gemv: contiguous x (M, K) and residual of its shape, got {tuple(x.shape)}")
    N2 = w.q.shape[0]
    out = torch.empty(x.shape[0], N2 // 2 if glu is not None else N2, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    _launch_gemv(x, None, None, w, bias, out, gemv_config(w, bias, x, False, config), False,
                 norm=(residual.contiguous() if residual is not None else None, norm_weight, eps, plus_one, res_out),
                 glu=glu, alpha=alpha, limit=limit)
    return out, res_out


def pick_fp8_gemv(w, bias: torch.Tensor | None, dtype: torch.dtype) -> dict:
    """The fastest FP8_GEMV_CONFIGS entry for a one-row input (CUDA graphs over cold weight copies) among those
    that agree with the dequantize-then-matmul reference."""
    from giants.inference.fp8 import FP8Weight

    x = torch.randn(1, w.q.shape[1], dtype=dtype, device=w.q.device)
    ref = torch.nn.functional.linear(x.float(), w.dequantize(torch.float32),
                                     bias.float() if bias is not None else None)
    ok = []
    for c in FP8_GEMV_CONFIGS:
        try:
            y = fp8_gemv(x, w, bias, config=c).float()
        except Exception:  # noqa: BLE001 - a config that does not compile for this shape is skipped
            torch.cuda.synchronize()
            continue
        if torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())):
            ok.append(c)
    if not ok:
        return DEFAULT_GEMV
    copies = [FP8Weight(q, w.scale, w.block) for q in cold_copies(w.q)]
    best, _ = pick_config_timed(lambda i, **c: fp8_gemv(x, copies[i % len(copies)], bias, config=c), ok)
    return best


# ---- weight-only GEMM ----------------------------------------------------------------------------
@triton.jit
def _fp8_gemm_kernel(X, W, S, B, Y, M, N, K, KB, stride_x, HAS_BIAS: tl.constexpr, ROWWISE: tl.constexpr,
                     SBN: tl.constexpr, SBK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """Y = X @ (q * scale)^T (+ B): FP8 tiles converted to X's dtype in registers (exact: every E4M3 value is a
    bf16 / fp16 value), tl.dot in fp32, each K tile's partial product scaled per output column (SBK is a
    multiple of BLOCK_K), or the finished sum with ROWWISE. DOT_F32: the interpreter's tl.dot in fp32."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm, nm = rm < M, rn < N
    s_rows = S + (rn // SBN).to(tl.int64) * KB
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = k0 + rk < K
        a = tl.load(X + rm.to(tl.int64)[:, None] * stride_x + (k0 + rk)[None, :], mask=mm[:, None] & km[None, :],
                    other=0.0)
        b = tl.load(W + rn.to(tl.int64)[:, None] * K + (k0 + rk)[None, :], mask=nm[:, None] & km[None, :],
                    other=0.0)
        if DOT_F32:
            part = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)))
        else:
            part = tl.dot(a, tl.trans(b.to(a.dtype)))
        if ROWWISE:
            acc += part
        else:
            acc += part * tl.load(s_rows + k0 // SBK, mask=nm, other=0.0)[None, :]
    if ROWWISE:
        acc = acc * tl.load(s_rows, mask=nm, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def fp8_gemm(x: torch.Tensor, w, bias: torch.Tensor | None = None, block_m: int | None = None,
             block_n: int | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x (M, K) (bf16 / fp16 / fp32), w an FP8Weight (N, K) -> (M, N): weight-only FP8 matmul. Tiles: 16 x 32 rows
    for a few rows (more programs over N), up to 64 x 64; K tiles of 128 (or the scale block, if narrower)."""
    M, K = x.shape
    N = w.q.shape[0]
    rowwise, sbn, sbk, _ = _layout(w, False)
    block_k = 128 if rowwise or sbk % 128 == 0 else sbk
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    dot_f32 = interp or x.dtype == torch.float32
    if block_m is None:
        block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    if block_n is None:
        block_n = 32 if M <= 16 else 64
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    _fp8_gemm_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        x, w.q, w.scale, bias if bias is not None else x, out, M, N, K, w.scale.shape[-1], x.stride(0),
        HAS_BIAS=bias is not None, ROWWISE=rowwise, SBN=sbn, SBK=sbk if not rowwise else 1, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, DOT_F32=dot_f32, num_warps=num_warps, num_stages=num_stages)
    return out
