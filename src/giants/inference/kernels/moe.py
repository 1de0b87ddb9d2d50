"""MoE decode kernels: bf16/fp32 expert-indexed GEMVs (split-K, fused activations), the fused down projection +
combine, and the fused norm + router top-k. The MXFP4 expert GEMV is in kernels/mxfp4.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from giants.inference.kernels.common import (
    ACTS,
    _act,
    _grid_dep,
    _np2,
    _pdl,
    _rms_normed,
    cold_copies,
    pick_config_timed,
)


# ---- expert-indexed GEMV (MoE decode, bf16/fp32 experts) --------------------------------------
@triton.jit
def _expert_gemv_kernel(X, X_ROW, EXPERT, W, BIAS, Y, N, K, alpha, limit, HAS_BIAS: tl.constexpr,
                        ACT_IN: tl.constexpr, GLU_OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr):
    """Y[p, n] = sum_k x_p[k] * W[EXPERT[p], n, k] (+ BIAS[EXPERT[p], n]): one stream over the routed
    experts' rows, no sort, no per-expert launch. x_p = X[X_ROW[p]], or with ACT_IN >= 0 the gated
    activation of X[X_ROW[p]] = [gate | up] (2K wide), rounded to X's dtype as the unfused path stores it.
    GLU_OUT >= 0: each expert's W holds [gate; up] (2N rows) and Y[p] = act(gate, up) (N wide): the program
    streams gate row n and up row n together, so the down projection needs no activation of its own."""
    _grid_dep(PDL)
    p = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    e = tl.load(EXPERT + p).to(tl.int64)
    xr = tl.load(X_ROW + p).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rows = 2 * N if GLU_OUT >= 0 else N
    w_ptr = W + e * rows * K + rn.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = k0 + rk < K
        if ACT_IN >= 0:
            g = tl.load(X + xr * 2 * K + k0 + rk, mask=km, other=0.0).to(tl.float32)
            u = tl.load(X + xr * 2 * K + K + k0 + rk, mask=km, other=0.0).to(tl.float32)
            x = _act(g, u, alpha, limit, ACT_IN).to(X.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(X + xr * K + k0 + rk, mask=km, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k0, mask=nm[:, None] & km[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        if GLU_OUT >= 0:
            wu = tl.load(w_ptr + N * K + k0, mask=nm[:, None] & km[None, :], other=0.0)
            acc_u += wu.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + e * rows + rn, mask=nm, other=0.0).to(tl.float32)
    if GLU_OUT >= 0:
        u = tl.sum(acc_u, axis=1)
        if HAS_BIAS:
            u += tl.load(BIAS + e * rows + N + rn, mask=nm, other=0.0).to(tl.float32)
        y = _act(y.to(Y.dtype.element_ty).to(tl.float32), u.to(Y.dtype.element_ty).to(tl.float32), alpha, limit,
                 GLU_OUT)
    tl.store(Y + p * N + rn, y.to(Y.dtype.element_ty), mask=nm)


@triton.jit
def _splitk_gemv_kernel(X, X_ROW, EXPERT, W, BIAS, Y, N, K, K_PER, alpha, limit, HAS_BIAS: tl.constexpr,
                        ACT_IN: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr):
    """Y[p * SPLIT + s, n] = sum over k in split s of x_p[k] * W[EXPERT[p], n, k] (+ BIAS[EXPERT[p], n] in
    split 0). Splitting K gives a short weight stream many programs: GEMVs of a few tens of MB otherwise
    run as a wave or two of long, latency-bound programs. The consumer (norm, rotary) sums the partials."""
    _grid_dep(PDL)
    p = tl.program_id(0)
    s = tl.program_id(2)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    e = tl.load(EXPERT + p).to(tl.int64)
    xr = tl.load(X_ROW + p).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    k_lo = s * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    w_ptr = W + e * N * K + rn.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        km = k0 + rk < k_hi
        if ACT_IN >= 0:
            g = tl.load(X + xr * 2 * K + k0 + rk, mask=km, other=0.0).to(tl.float32)
            u = tl.load(X + xr * 2 * K + K + k0 + rk, mask=km, other=0.0).to(tl.float32)
            x = _act(g, u, alpha, limit, ACT_IN).to(X.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(X + xr * K + k0 + rk, mask=km, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k0, mask=nm[:, None] & km[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        if s == 0:
            y += tl.load(BIAS + e * N + rn, mask=nm, other=0.0).to(tl.float32)
    tl.store(Y + (p * SPLIT + s) * N + rn, y.to(Y.dtype.element_ty), mask=nm)


def splitk_gemv(x: torch.Tensor, x_row: torch.Tensor, expert: torch.Tensor, w: torch.Tensor,
                bias: torch.Tensor | None, *, split: int = 1, activation: str | None = None, alpha: float = 1.702,
                limit: float = 7.0, block_n: int = 8, block_k: int = 256, num_warps: int = 4,
                num_stages: int = 3) -> torch.Tensor:
    """x: (M, K), or (M, 2K) = [gate | up] with `activation`; x_row, expert: (P,) int; w: (E, N, K) (or (N, K),
    one expert) contiguous; bias (E, N) or (N,). Returns (P * split, N): with split > 1 fp32 partial sums,
    row p * split + s, for the consumer to add up; with split 1 the result in x's dtype."""
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    P = expert.shape[0]
    N, K = w3.shape[1], w3.shape[2]
    width = 2 * K if activation is not None else K
    if not (x.is_contiguous() and w3.is_contiguous() and x.shape[1] == width):
        raise ValueError(f"splitk_gemv needs contiguous x (M, {width}) and w (E, N, K); got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}")
    k_per = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    out = torch.empty(P * split, N, dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    _splitk_gemv_kernel[(P, triton.cdiv(N, block_n), split)](
        x, x_row, expert, w3, bias if bias is not None else w3, out, N, K, k_per, alpha, limit,
        HAS_BIAS=bias is not None, ACT_IN=ACTS[activation] if activation is not None else -1, SPLIT=split,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages, **_pdl())
    return out


SPLITK_CONFIGS = [dict(split=sp, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                  for sp in (1, 2, 3, 4, 6, 8)
                  for bn, bk, nw, ns in ((8, 256, 4, 3), (4, 512, 4, 3), (16, 256, 8, 3), (8, 512, 4, 2),
                                         (16, 128, 4, 4), (32, 128, 8, 2))]


def pick_gemv_act(w: torch.Tensor, bias: torch.Tensor | None, activation: str, alpha: float = 1.702,
                  limit: float = 7.0) -> tuple[dict, float]:
    """(config, ms) of the one-row down projection that applies the gated activation as it loads
    (split_k 1, so the output is final)."""
    gu = torch.randn(1, 2 * w.shape[1], dtype=w.dtype, device=w.device)
    zero = torch.zeros(1, dtype=torch.long, device=w.device)
    copies = cold_copies(w)
    return pick_config_timed(
        lambda i, **c: splitk_gemv(gu, zero, zero, copies[i % len(copies)], bias, activation=activation,
                                   alpha=alpha, limit=limit, **c),
        [c for c in SPLITK_CONFIGS if c["split"] == 1])


EXPERT_GEMV_CONFIGS = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                       for bn, bk, nw, ns in ((8, 256, 4, 3), (4, 512, 4, 4), (8, 512, 4, 3), (16, 256, 8, 3),
                                              (2, 1024, 4, 4), (16, 128, 4, 4), (32, 128, 8, 3))]


def expert_gemv(x: torch.Tensor, x_row: torch.Tensor, expert: torch.Tensor, w: torch.Tensor,
                bias: torch.Tensor | None, *, activation: str | None = None, glu: str | None = None,
                alpha: float = 1.702, limit: float = 7.0, block_n: int = 8, block_k: int = 256, num_warps: int = 4,
                num_stages: int = 3) -> torch.Tensor:
    """x: (M, K), or (M, 2K) = [gate | up] with `activation`; x_row, expert: (P,) int; w: (E, N, K)
    contiguous; bias: (E, N) -> (P, N). With `glu`, w is (E, 2F, K) = [gate; up] per expert and the result
    act(gate, up) (P, F). For a few (token, expert) pairs (MoE decode at small batch), where
    torch._grouped_mm with one row per group is far from the bandwidth limit."""
    P = expert.shape[0]
    N, K = w.shape[1], w.shape[2]
    width = 2 * K if activation is not None else K
    if not (x.is_contiguous() and w.is_contiguous() and x.shape[1] == width) or (glu is not None and N % 2):
        raise ValueError(f"expert_gemv needs contiguous x (M, {width}) and w (E, N, K) (N even with glu); got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}")
    if glu is not None:
        N //= 2
    out = torch.empty(P, N, dtype=x.dtype, device=x.device)
    _expert_gemv_kernel[(P, triton.cdiv(N, block_n))](
        x, x_row, expert, w, bias if bias is not None else w, out, N, K, alpha, limit, HAS_BIAS=bias is not None,
        ACT_IN=ACTS[activation] if activation is not None else -1, GLU_OUT=ACTS[glu] if glu is not None else -1,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages, **_pdl())
    return out


def _expert_inputs(w: torch.Tensor, pairs: int, width: int
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Random rows (pairs, width), their row ids, and per call index (mod 8) expert ids as distinct as a
    real routing makes them, different from call to call as from layer to layer (no warm L2)."""
    x = torch.randn(pairs, width, dtype=w.dtype, device=w.device)
    rows = torch.arange(pairs, device=w.device)
    E = w.shape[0]
    return x, rows, [(rows * 7 + pairs * i) % E for i in range(8)]


def pick_expert_gemv(w: torch.Tensor, bias: torch.Tensor | None, pairs: int, glu: str | None = None
                     ) -> tuple[dict, float]:
    """(the fastest EXPERT_GEMV_CONFIGS entry for this expert shape and pair count, its ms; CUDA events)."""
    x, rows, experts = _expert_inputs(w, pairs, w.shape[2])
    return pick_config_timed(lambda i, **c: expert_gemv(x, rows, experts[i % 8], w, bias, glu=glu, **c),
                             EXPERT_GEMV_CONFIGS)


def pick_expert_act(w: torch.Tensor, bias: torch.Tensor | None, pairs: int, activation: str) -> tuple[dict, float]:
    """(config, ms) for the down projection that applies the gated activation to its input."""
    x, rows, experts = _expert_inputs(w, pairs, 2 * w.shape[2])
    return pick_config_timed(
        lambda i, **c: expert_gemv(x, rows, experts[i % 8], w, bias, activation=activation, **c),
        EXPERT_GEMV_CONFIGS)


def pick_expert_down(w: torch.Tensor, bias: torch.Tensor | None, pairs: int, k_top: int,
                     activation: str) -> tuple[dict, float]:
    """(config, ms) for expert_down_combine."""
    gu, _, experts = _expert_inputs(w, pairs, 2 * w.shape[2])
    weights = torch.full((pairs,), 1.0 / k_top, dtype=w.dtype, device=w.device)
    return pick_config_timed(
        lambda i, **c: expert_down_combine(gu, experts[i % 8], weights, w, bias, k_top, activation, **c),
        EXPERT_GEMV_CONFIGS)


@triton.jit
def _expert_down_combine_kernel(GU, EXPERT, WEIGHTS, W, BIAS, Y, N, F, alpha, limit, K_TOP: tl.constexpr,
                                ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Y[b, n] = sum_j WEIGHTS[b, j] * (W[e_j, n, :] . act(GU[b*K+j]) + BIAS[e_j, n]), e_j = EXPERT[b, j]:
    the gated activation, the down projection of every routed expert and the weighted combine in one
    pass. The activation and each expert's output are rounded to the activation dtype, as the unfused
    path stores them."""
    _grid_dep(PDL)
    b = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    rk = tl.arange(0, BLOCK_K)
    y = tl.zeros((BLOCK_N,), tl.float32)
    for j in tl.static_range(K_TOP):
        p = b * K_TOP + j
        e = tl.load(EXPERT + p).to(tl.int64)
        wt = tl.load(WEIGHTS + p).to(tl.float32)
        w_ptr = W + e * N * F + rn.to(tl.int64)[:, None] * F + rk[None, :]
        gu_ptr = GU + p.to(tl.int64) * 2 * F
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, F, BLOCK_K):
            km = k0 + rk < F
            g = tl.load(gu_ptr + k0 + rk, mask=km, other=0.0).to(tl.float32)
            u = tl.load(gu_ptr + F + k0 + rk, mask=km, other=0.0).to(tl.float32)
            a = _act(g, u, alpha, limit, ACT).to(GU.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + k0, mask=nm[:, None] & km[None, :], other=0.0)
            acc += w.to(tl.float32) * a[None, :]
        yj = tl.sum(acc, axis=1)
        if HAS_BIAS:
            yj += tl.load(BIAS + e * N + rn, mask=nm, other=0.0).to(tl.float32)
        y += wt * yj.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + b * N + rn, y.to(Y.dtype.element_ty), mask=nm)


def expert_down_combine(gu: torch.Tensor, expert: torch.Tensor, weights: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor | None, k_top: int, activation: str, alpha: float = 1.702,
                        limit: float = 7.0, *, block_n: int = 8, block_k: int = 256, num_warps: int = 4,
                        num_stages: int = 3) -> torch.Tensor:
    """gu: (B*K, 2F) [gate | up] of each (token, expert) pair; expert, weights: (B*K,); w: (E, N, F);
    bias: (E, N) -> (B, N) = sum over the token's K experts of weight * down(act(gate, up))."""
    P, F2 = gu.shape
    B, N, F = P // k_top, w.shape[1], w.shape[2]
    if not (gu.is_contiguous() and w.is_contiguous() and F2 == 2 * F):
        raise ValueError(f"expert_down_combine needs contiguous gu (P, {2 * F}) and w (E, N, {F}); got "
                         f"{tuple(gu.shape)}, {tuple(w.shape)}")
    out = torch.empty(B, N, dtype=gu.dtype, device=gu.device)
    _expert_down_combine_kernel[(B, triton.cdiv(N, block_n))](
        gu, expert, weights, w, bias if bias is not None else w, out, N, F, alpha, limit, K_TOP=k_top,
        ACT=ACTS[activation], HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages, **_pdl())
    return out


@triton.jit
def _topk_route(vals, ce, W_OUT, IDX_OUT, b, K_TOP: tl.constexpr, BLOCK_KT: tl.constexpr,
                SOFTMAX_BEFORE: tl.constexpr, RENORM: tl.constexpr):
    """Stores row b's top-k expert ids and routing weights from its fp32 logits vals (-inf past E): softmax
    over the k chosen logits, or (SOFTMAX_BEFORE) the chosen entries of the softmax over all experts,
    optionally renormalised."""
    m_all = tl.max(vals, axis=0)
    z_all = tl.sum(tl.exp(vals - m_all), axis=0)
    ck = tl.arange(0, BLOCK_KT)
    top = tl.full((BLOCK_KT,), float("-inf"), tl.float32)
    for j in tl.static_range(K_TOP):
        mx = tl.max(vals, axis=0)
        i = tl.argmax(vals, axis=0)
        tl.store(IDX_OUT + b * K_TOP + j, i.to(IDX_OUT.dtype.element_ty))
        top = tl.where(ck == j, mx, top)
        vals = tl.where(ce == i, float("-inf"), vals)
    if SOFTMAX_BEFORE:
        wts = tl.exp(top - m_all) / z_all
        if RENORM:
            wts = wts / tl.sum(wts, axis=0)
    else:
        ex = tl.exp(top - tl.max(top, axis=0))
        wts = ex / tl.sum(ex, axis=0)
    tl.store(W_OUT + b * K_TOP + ck, wts.to(W_OUT.dtype.element_ty), mask=ck < K_TOP)


@triton.jit
def _route_topk_kernel(LOGITS, W_OUT, IDX_OUT, E, K_TOP: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_KT: tl.constexpr, SOFTMAX_BEFORE: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr):
    """Top-k of one token's router logits and its routing weights (see _topk_route)."""
    _grid_dep(PDL)
    b = tl.program_id(0)
    ce = tl.arange(0, BLOCK_E)
    vals = tl.load(LOGITS + b * E + ce, mask=ce < E, other=float("-inf")).to(tl.float32)
    _topk_route(vals, ce, W_OUT, IDX_OUT, b, K_TOP, BLOCK_KT, SOFTMAX_BEFORE, RENORM)


def route_topk(logits: torch.Tensor, k_top: int, softmax_before: bool, renormalize: bool,
               weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (B, E) -> weights (B, K) in weight_dtype, expert ids (B, K) int64; what MoE.route returns."""
    B, E = logits.shape
    weights = torch.empty(B, k_top, dtype=weight_dtype, device=logits.device)
    idx = torch.empty(B, k_top, dtype=torch.long, device=logits.device)
    _route_topk_kernel[(B,)](logits, weights, idx, E, K_TOP=k_top, BLOCK_E=_np2(E), BLOCK_KT=_np2(k_top),
                             SOFTMAX_BEFORE=softmax_before, RENORM=renormalize, **_pdl())
    return weights, idx


@triton.jit
def _norm_route_kernel(X, R, NW, H_OUT, RES_OUT, RW, RB, LOGITS, CNT, W_OUT, IDX_OUT, D, E, eps,
                       PLUS_ONE: tl.constexpr, HAS_BIAS: tl.constexpr, K_TOP: tl.constexpr, EP: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_KT: tl.constexpr,
                       SOFTMAX_BEFORE: tl.constexpr, RENORM: tl.constexpr, LANES: tl.constexpr, PDL: tl.constexpr):
    """The MoE layer's input at small batch in one kernel: h = rmsnorm(x + r) (program (b, 0) stores h and
    the new residual), the router logits of experts [EP * j, EP * (j + 1)) in program (b, j), and from the
    program that finishes row b last (a ticket from CNT[b]) its top-k and routing weights, as route_topk.
    Values are rounded where the separate norm, router linear and top-k kernels store them. LANES: H_OUT is
    fp16 and h is stored in the f16 lanes of kernels.mxfp4.mxfp4_lanes (for the MXFP4 experts' hfma GEMV)."""
    _grid_dep(PDL)
    b = tl.program_id(0)
    pj = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    x = tl.load(X + b * D + cols, mask=m, other=0.0)
    x = (x.to(tl.float32) + tl.load(R + b * D + cols, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    h = _rms_normed(x.to(tl.float32), NW, cols, m, D, eps, PLUS_ONE).to(X.dtype.element_ty)
    if pj == 0:
        tl.store(RES_OUT + b * D + cols, x, mask=m)
        if LANES:  # column 8w + e to lane 2 (e % 2) + e // 4, half (e // 2) % 2 (mxfp4._LANE_SRC)
            e8 = cols % 8
            at = (2 * (e8 % 2) + e8 // 4) * (D // 4) + (cols // 8) * 2 + (e8 // 2) % 2
            hc = tl.clamp(h.to(tl.float32), -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL)
            tl.store(H_OUT + b * D + at, hc.to(tl.float16), mask=m)
        else:
            tl.store(H_OUT + b * D + cols, h, mask=m)
    hf = h.to(tl.float32)
    for j in tl.static_range(EP):
        e = pj * EP + j
        if e < E:
            lg = tl.sum(tl.load(RW + e.to(tl.int64) * D + cols, mask=m, other=0.0).to(tl.float32) * hf, axis=0)
            if HAS_BIAS:
                lg += tl.load(RB + e).to(tl.float32)
            tl.store(LOGITS + b * E + e, lg.to(X.dtype.element_ty).to(tl.float32))
    tl.debug_barrier()  # whichever thread stored a logit, the ticket's release below orders it
    ticket = tl.atomic_add(CNT + b, 1, sem="acq_rel")
    if ticket == tl.num_programs(1) - 1:
        tl.store(CNT + b, 0)  # ready for the next layer
        ce = tl.arange(0, BLOCK_E)
        vals = tl.load(LOGITS + b * E + ce, mask=ce < E, other=float("-inf"), cache_modifier=".cg")
        _topk_route(vals, ce, W_OUT, IDX_OUT, b, K_TOP, BLOCK_KT, SOFTMAX_BEFORE, RENORM)


def norm_route(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, plus_one: bool,
               router_w: torch.Tensor, router_b: torch.Tensor | None, k_top: int, softmax_before: bool,
               renormalize: bool, counter: torch.Tensor, experts_per_program: int = 2, lanes: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (B, D); router_w (E, D); counter: (>= B,) int32 zeros (left zero).
    Returns h = rmsnorm(x + residual), x + residual, routing weights (B, K) in x's dtype, expert ids (B, K)
    int64: what rmsnorm, the router linear and route_topk give. lanes: h comes as kernels.mxfp4.F16Lanes
    (D a multiple of 8), what the MXFP4 experts' hfma GEMV reads, instead of a tensor."""
    B, D = x.shape
    E = router_w.shape[0]
    if not (x.is_contiguous() and residual.is_contiguous() and router_w.is_contiguous()
            and router_w.shape[1] == D and counter.numel() >= B):
        raise ValueError(f"norm_route needs contiguous x, residual (B, {D}), router_w (E, {D}) and a counter of "
                         f">= {B} int32; got {tuple(x.shape)}, {tuple(router_w.shape)}, {counter.numel()}")
    if lanes and D % 8:
        raise ValueError(f"norm_route: lanes need a width that is a multiple of 8, got {D}")
    h = torch.empty(x.shape, dtype=torch.float16 if lanes else x.dtype, device=x.device)
    res = torch.empty_like(x)
    logits = torch.empty(B, E, dtype=torch.float32, device=x.device)
    weights = torch.empty(B, k_top, dtype=x.dtype, device=x.device)
    idx = torch.empty(B, k_top, dtype=torch.long, device=x.device)
    _norm_route_kernel[(B, triton.cdiv(E, experts_per_program))](
        x, residual, norm_weight, h, res, router_w, router_b if router_b is not None else router_w, logits, counter,
        weights, idx, D, E, eps, PLUS_ONE=plus_one, HAS_BIAS=router_b is not None, K_TOP=k_top,
        EP=experts_per_program, BLOCK_D=_np2(D), BLOCK_E=_np2(E), BLOCK_KT=_np2(k_top),
        SOFTMAX_BEFORE=softmax_before, RENORM=renormalize, LANES=lanes, num_warps=4, **_pdl())
    if lanes:
        from giants.inference.kernels.mxfp4 import F16Lanes

        return F16Lanes(h.view(torch.int32), D, x.dtype), res, weights, idx
    return h, res, weights, idx
