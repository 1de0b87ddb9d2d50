"""Triton kernels for the GPU decode path: fused residual+RMSNorm, rotary+paged KV write, paged
decode attention (GQA, sliding window, soft-cap, sinks, T5 relative bias; split-K), gated activations.

Imported only on CUDA (or under TRITON_INTERPRET=1 for checking on a CPU). Shapes: B sequences (one
token each), H query heads, Hkv kv heads, G = H // Hkv, D head dim, bs block size.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def _np2(n: int) -> int:
    return triton.next_power_of_2(n)


# ---- programmatic dependent launch ------------------------------------------------------------
# On Hopper a kernel launched with PDL is scheduled while the kernel before it drains: its programs
# start and wait at griddepcontrol.wait until the previous kernel's writes are visible, so the launch
# and the ramp overlap the tail of the kernel before. Every kernel here waits before its first load
# and store, so the order of effects is the plain stream's. GIANTS_PDL=0 turns it off, =1 forces it on.
# (Prefetching the first weight tiles into L2 before the wait measured slower: 223 vs 225 tok/s on
# Llama-3.1-8B.)
def _pdl_default() -> bool:
    env = os.environ.get("GIANTS_PDL")
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"GIANTS_PDL must be 0 or 1, got {env!r}")
        return env == "1"
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 9


PDL_ON = _pdl_default()


def set_pdl(on: bool) -> None:
    """Kernels launched (or captured in a CUDA graph) afterwards use PDL or not."""
    global PDL_ON
    PDL_ON = bool(on)


def _pdl() -> dict:
    return {"PDL": 1, "launch_pdl": True} if PDL_ON else {"PDL": 0}


@triton.jit
def _grid_dep(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one's writes."""
    if PDL > 0:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


# ---- residual add + RMSNorm ---------------------------------------------------------------
@triton.jit
def _rms_normed(xf, W, cols, m, D, eps, PLUS_ONE: tl.constexpr):
    """RMSNorm of one fp32 row xf (zeros past D) times the weight W (1 + W with PLUS_ONE), in fp32."""
    var = tl.sum(xf * xf, axis=0) / D
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if PLUS_ONE:
        w = w + 1.0
    return (xf * tl.rsqrt(var + eps)) * w


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
def _act(g, u, alpha, limit, ACT: tl.constexpr):
    if ACT == 0:  # silu
        y = g * tl.sigmoid(g) * u
    elif ACT == 1:  # gelu, tanh approximation: tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        y = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0)) * u
    else:  # gpt-oss clamped swiglu
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        y = g * tl.sigmoid(alpha * g) * (u + 1.0)
    return y


@triton.jit
def _glu_kernel(GU, OUT, F, alpha, limit, ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _grid_dep(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(GU + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row * F + cols, _act(g, u, alpha, limit, ACT).to(OUT.dtype.element_ty), mask=m)


ACTS = {"silu_glu": 0, "gelu_tanh_glu": 1, "clamped_swiglu": 2}


def glu(gu: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """gu: (N, 2F) = [gate | up] -> (N, F)."""
    N, F2 = gu.shape
    F = F2 // 2
    out = out if out is not None else torch.empty(N, F, dtype=gu.dtype, device=gu.device)
    BLOCK = min(1024, _np2(F))
    _glu_kernel[(N, triton.cdiv(F, BLOCK))](gu, out, F, alpha, limit, ACT=ACTS[activation], BLOCK=BLOCK, **_pdl())
    return out


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


# ---- paged decode attention -------------------------------------------------------------------
@triton.jit
def _paged_attn_kernel(Q, K_CACHE, V_CACHE, TABLE, SEQ_LEN, BIAS, M_OUT, L_OUT, ACC_OUT, OUT, SINKS,
                       scale, softcap, stride_table, max_dist, H: tl.constexpr, HKV: tl.constexpr,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                       BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SINKS: tl.constexpr,
                       IEEE: tl.constexpr, PDL: tl.constexpr):
    _grid_dep(PDL)
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GP)
    gm = g < G
    d = tl.arange(0, D)
    heads = hk * G + g
    q = tl.load(Q + (b * H + heads)[:, None] * D + d[None, :], mask=gm[:, None], other=0.0)  # (GP, D)
    L = tl.load(SEQ_LEN + b)
    q_pos = L - 1
    lo_tok = 0
    if WINDOW > 0:
        lo_tok = tl.maximum(q_pos - WINDOW + 1, 0)
    first_page = lo_tok // BS
    n_pages = tl.cdiv(L, BS) - first_page
    pps = tl.cdiv(n_pages, NUM_SPLITS)
    start = (first_page + split * pps) * BS
    end = tl.minimum((first_page + (split + 1) * pps) * BS, L)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    n = tl.arange(0, BLOCK_N)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + n
        valid = (t < end) & (t >= lo_tok)
        blk = tl.load(TABLE + b * stride_table + t // BS, mask=valid, other=0).to(tl.int64)
        off = ((blk * BS + t % BS) * HKV + hk) * D
        k = tl.load(K_CACHE + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
        if IEEE:  # fp32 caches: full-precision products (checks against the eager path)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (GP, BLOCK_N)
        if HAS_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        if HAS_BIAS:
            dist = tl.minimum(q_pos - t, max_dist - 1)
            s += tl.load(BIAS + heads[:, None] * max_dist + dist[None, :], mask=gm[:, None] & valid[None, :],
                         other=0.0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V_CACHE + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    if NUM_SPLITS == 1:
        if HAS_SINKS:
            sink = tl.load(SINKS + heads, mask=gm, other=0.0).to(tl.float32)
            m_f = tl.maximum(m_i, sink)
            l_f = l_i * tl.exp(m_i - m_f) + tl.exp(sink - m_f)
            acc = acc * tl.exp(m_i - m_f)[:, None]
        else:
            l_f = l_i
        o = acc / l_f[:, None]
        tl.store(OUT + (b * H + heads)[:, None] * D + d[None, :], o.to(OUT.dtype.element_ty), mask=gm[:, None])
    else:
        row = (b * H + heads) * NUM_SPLITS + split
        tl.store(M_OUT + row, m_i, mask=gm)
        tl.store(L_OUT + row, l_i, mask=gm)
        tl.store(ACC_OUT + row[:, None] * D + d[None, :], acc, mask=gm[:, None])


@triton.jit
def _attn_reduce_kernel(M_IN, L_IN, ACC_IN, OUT, SINKS, H: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                        HAS_SINKS: tl.constexpr, PDL: tl.constexpr):
    _grid_dep(PDL)
    bh = tl.program_id(0)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D)
    m = tl.load(M_IN + bh * NUM_SPLITS + s)
    l = tl.load(L_IN + bh * NUM_SPLITS + s)
    m_max = tl.max(m, axis=0)
    if HAS_SINKS:
        sink = tl.load(SINKS + bh % H).to(tl.float32)
        m_max = tl.maximum(m_max, sink)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    denom = tl.sum(w * l, axis=0)
    if HAS_SINKS:
        denom += tl.exp(sink - m_max)
    acc = tl.load(ACC_IN + (bh * NUM_SPLITS + s)[:, None] * D + d[None, :])
    o = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(OUT + bh * D + d, o.to(OUT.dtype.element_ty))


class PagedAttention:
    """Decode attention over the paged cache for one layer configuration; holds its split buffers."""

    def __init__(self, *, n_heads: int, n_kv_heads: int, head_dim: int, block_size: int, scale: float,
                 window: int = 0, softcap: float | None = None, sinks: torch.Tensor | None = None,
                 bias_table: torch.Tensor | None = None) -> None:
        self.H, self.Hkv, self.D, self.bs = n_heads, n_kv_heads, head_dim, block_size
        self.G = n_heads // n_kv_heads
        self.scale, self.window, self.softcap = scale, window, softcap
        self.sinks, self.bias_table = sinks, bias_table  # bias_table: (H, max_dist) float32

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                 seq_lens: torch.Tensor, out: torch.Tensor, num_splits: int = 1,
                 scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """q: (B, H, D); table: (B, max_pages) int32; seq_lens: (B,) keys per sequence (query at L-1)."""
        B = q.shape[0]
        H, D = self.H, self.D
        if num_splits > 1:
            if scratch is None:
                scratch = (torch.empty(B * H * num_splits, dtype=torch.float32, device=q.device),
                           torch.empty(B * H * num_splits, dtype=torch.float32, device=q.device),
                           torch.empty(B * H * num_splits * D, dtype=torch.float32, device=q.device))
            m, l, acc = scratch
        else:
            m = l = acc = out
        block_n = max(16, min(64, self.bs * max(1, 64 // self.bs)))
        bias = self.bias_table
        sinks = self.sinks
        _paged_attn_kernel[(B, self.Hkv, num_splits)](
            q, k_cache, v_cache, table, seq_lens, bias if bias is not None else q, m, l, acc, out,
            sinks if sinks is not None else q, self.scale, float(self.softcap or 1.0), table.stride(0),
            bias.shape[1] if bias is not None else 1, H=H, HKV=self.Hkv, G=self.G, GP=max(16, _np2(self.G)), D=D,
            BS=self.bs, BLOCK_N=block_n, WINDOW=self.window, NUM_SPLITS=num_splits,
            HAS_SOFTCAP=self.softcap is not None, HAS_BIAS=bias is not None, HAS_SINKS=sinks is not None,
            IEEE=q.dtype == torch.float32, num_warps=4, **_pdl())
        if num_splits > 1:
            _attn_reduce_kernel[(B * H,)](m, l, acc, out, sinks if sinks is not None else q, H=H, D=D,
                                          NUM_SPLITS=num_splits, HAS_SINKS=sinks is not None, **_pdl())
        return out


# ---- MXFP4 expert GEMV ------------------------------------------------------------------------
@triton.jit
def _e2m1(n):
    """FP4 E2M1 nibble (int32) -> float32 by building the bits: sign bit 3, exponent bits 2..1, mantissa
    bit 0; exponent 0 is the subnormal 0 / 0.5."""
    e = (n >> 1) & 3
    m = n & 1
    bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22)) | ((n & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_gemv_kernel(X, X_ROW, EXPERT, BLOCKS, SCALES, BIAS, Y, N_OUT, K, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Y[p, n] = sum_k X[X_ROW[p], k] * W[EXPERT[p], n, k] (+ BIAS[EXPERT[p], n]); W packed MXFP4: the
    nibbles are decoded in registers, products summed per 32-value block, then scaled once per block."""
    _grid_dep(PDL)
    p = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N_OUT
    e = tl.load(EXPERT + p).to(tl.int64)
    xr = tl.load(X_ROW + p).to(tl.int64)
    NB: tl.constexpr = BLOCK_K // 32
    j = tl.arange(0, BLOCK_K // 2)
    sb = tl.arange(0, NB)
    wrow = e * N_OUT + rows.to(tl.int64)
    acc = tl.zeros((BLOCK_N, NB), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + 2 * j  # even element of each byte
        km = kk < K
        byte = tl.load(BLOCKS + wrow[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=rm[:, None] & km[None, :],
                       other=0).to(tl.int32)
        xe = tl.load(X + xr * K + kk, mask=km, other=0.0).to(tl.float32)
        xo = tl.load(X + xr * K + kk + 1, mask=km, other=0.0).to(tl.float32)
        prod = _e2m1(byte & 15) * xe[None, :] + _e2m1(byte >> 4) * xo[None, :]  # (BLOCK_N, BLOCK_K/2)
        part = tl.sum(tl.reshape(prod, (BLOCK_N, NB, 16)), axis=2)  # one sum per 32-value block
        sm = (k0 // 32 + sb) < K // 32
        sc = tl.load(SCALES + wrow[:, None] * (K // 32) + (k0 // 32 + sb)[None, :], mask=rm[:, None] & sm[None, :],
                     other=0).to(tl.int32)
        acc += part * (sc << 23).to(tl.float32, bitcast=True)  # E8M0: 2 ** (sc - 127)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + e * N_OUT + rows, mask=rm, other=0.0).to(tl.float32)
    tl.store(Y + p * N_OUT + rows, y.to(Y.dtype.element_ty), mask=rm)


def mxfp4_gemv(x: torch.Tensor, x_row: torch.Tensor, expert: torch.Tensor, blocks: torch.Tensor,
               scales: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (M, K); x_row, expert: (P,) int; blocks (E, N, K/2) uint8; scales (E, N, K/32) -> (P, N)."""
    P = expert.shape[0]
    N, K = blocks.shape[1], x.shape[1]
    out = out if out is not None else torch.empty(P, N, dtype=x.dtype, device=x.device)
    BLOCK_N, BLOCK_K = 16, 512
    _mxfp4_gemv_kernel[(P, triton.cdiv(N, BLOCK_N))](x, x_row, expert, blocks, scales,
                                                     bias if bias is not None else x, out, N, K,
                                                     HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                                     num_warps=4, **_pdl())
    return out


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
                       SOFTMAX_BEFORE: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr):
    """The MoE layer's input at small batch in one kernel: h = rmsnorm(x + r) (program (b, 0) stores h and
    the new residual), the router logits of experts [EP * j, EP * (j + 1)) in program (b, j), and from the
    program that finishes row b last (a ticket from CNT[b]) its top-k and routing weights, as route_topk.
    Values are rounded where the separate norm, router linear and top-k kernels store them."""
    _grid_dep(PDL)
    b = tl.program_id(0)
    pj = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    x = tl.load(X + b * D + cols, mask=m, other=0.0)
    x = (x.to(tl.float32) + tl.load(R + b * D + cols, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    h = _rms_normed(x.to(tl.float32), NW, cols, m, D, eps, PLUS_ONE).to(H_OUT.dtype.element_ty)
    if pj == 0:
        tl.store(RES_OUT + b * D + cols, x, mask=m)
        tl.store(H_OUT + b * D + cols, h, mask=m)
    hf = h.to(tl.float32)
    for j in tl.static_range(EP):
        e = pj * EP + j
        if e < E:
            lg = tl.sum(tl.load(RW + e.to(tl.int64) * D + cols, mask=m, other=0.0).to(tl.float32) * hf, axis=0)
            if HAS_BIAS:
                lg += tl.load(RB + e).to(tl.float32)
            tl.store(LOGITS + b * E + e, lg.to(H_OUT.dtype.element_ty).to(tl.float32))
    tl.debug_barrier()  # whichever thread stored a logit, the ticket's release below orders it
    ticket = tl.atomic_add(CNT + b, 1, sem="acq_rel")
    if ticket == tl.num_programs(1) - 1:
        tl.store(CNT + b, 0)  # ready for the next layer
        ce = tl.arange(0, BLOCK_E)
        vals = tl.load(LOGITS + b * E + ce, mask=ce < E, other=float("-inf"), cache_modifier=".cg")
        _topk_route(vals, ce, W_OUT, IDX_OUT, b, K_TOP, BLOCK_KT, SOFTMAX_BEFORE, RENORM)


def norm_route(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, plus_one: bool,
               router_w: torch.Tensor, router_b: torch.Tensor | None, k_top: int, softmax_before: bool,
               renormalize: bool, counter: torch.Tensor, experts_per_program: int = 2
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (B, D); router_w (E, D); counter: (>= B,) int32 zeros (left zero).
    Returns h = rmsnorm(x + residual), x + residual, routing weights (B, K) in x's dtype, expert ids (B, K)
    int64: what rmsnorm, the router linear and route_topk give."""
    B, D = x.shape
    E = router_w.shape[0]
    if not (x.is_contiguous() and residual.is_contiguous() and router_w.is_contiguous()
            and router_w.shape[1] == D and counter.numel() >= B):
        raise ValueError(f"norm_route needs contiguous x, residual (B, {D}), router_w (E, {D}) and a counter of "
                         f">= {B} int32; got {tuple(x.shape)}, {tuple(router_w.shape)}, {counter.numel()}")
    h, res = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(B, E, dtype=torch.float32, device=x.device)
    weights = torch.empty(B, k_top, dtype=x.dtype, device=x.device)
    idx = torch.empty(B, k_top, dtype=torch.long, device=x.device)
    _norm_route_kernel[(B, triton.cdiv(E, experts_per_program))](
        x, residual, norm_weight, h, res, router_w, router_b if router_b is not None else router_w, logits, counter,
        weights, idx, D, E, eps, PLUS_ONE=plus_one, HAS_BIAS=router_b is not None, K_TOP=k_top,
        EP=experts_per_program, BLOCK_D=_np2(D), BLOCK_E=_np2(E), BLOCK_KT=_np2(k_top),
        SOFTMAX_BEFORE=softmax_before, RENORM=renormalize, num_warps=4, **_pdl())
    return h, res, weights, idx


def time_ms(fn, reps: int = 20) -> float:
    """GPU milliseconds per call of fn(i), i = 0..reps-1, from a CUDA graph of the reps calls (after one
    untimed call): back-to-back eager launches of a kernel of a few microseconds measure the host's launch
    rate, not the kernel. fn gets the call index so it can rotate over weight copies: a weight re-read
    while still in L2 would time faster than the cold read a decode step makes."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        graph.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / (3 * reps)


def cold_copies(w: torch.Tensor, min_bytes: int = 256 << 20) -> list[torch.Tensor]:
    """w and enough clones that cycling through them reads more than the L2 cache holds."""
    n = max(1, -(-min_bytes // (w.numel() * w.element_size())))
    return [w] + [w.clone() for _ in range(n - 1)]


def pick_config_timed(fn, configs: list[dict], reps: int = 20) -> tuple[dict, float]:
    """(fastest of `configs` for fn(i, **config), its milliseconds per call); configs that fail to compile
    are skipped."""
    best, best_t = configs[0], float("inf")
    for c in configs:
        try:
            t = time_ms(lambda i, c=c: fn(i, **c), reps)
        except Exception:  # noqa: BLE001 - a config that does not compile for this shape is skipped
            torch.cuda.synchronize()
            continue
        if t < best_t:
            best, best_t = c, t
    return best, best_t


# ---- batch-1 GEMV ---------------------------------------------------------------------------
@triton.jit
def _row_dots(X, W, rn, nm, N, K, GLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr):
    """(sum_k W[rn, k] X[k], and with GLU >= 0 the same over rows rn + N, else zeros) in fp32: one stream
    over the weight rows (rows outside nm read as zero), x loaded once per K tile for both."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    rk = tl.arange(0, BLOCK_K)
    w_ptr = W + rn.to(tl.int64)[:, None] * K + rk[None, :]
    u_ptr = W + (rn + N).to(tl.int64)[:, None] * K + rk[None, :]
    for k0 in range(0, K, BLOCK_K):
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
    return tl.sum(acc, axis=1), tl.sum(acc_u, axis=1)


@triton.jit
def _gemv_kernel(X, W, B, Y, R, NW, HX, SS, CNT, RSTD, S_IN, N, K, eps, alpha, limit, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_RES: tl.constexpr,
                 PLUS_ONE: tl.constexpr, SCALED: tl.constexpr, GLU: tl.constexpr, BLOCK_P: tl.constexpr,
                 PDL: tl.constexpr):
    """Y[n] = sum_k X[k] W[n, k] (+ B[n]) for one row x: a pure stream over W.

    SCALED: the sum is multiplied by S_IN[0] before the bias, so with X = x * nw and S_IN = rstd(x) this is
    linear(rmsnorm(x)) without a norm kernel. GLU >= 0: W holds [gate; up] (2N rows) and Y = act(gate, up).
    HAS_RES (the O and down projections of a chained layer): Y = round(round(y) + R), the new residual
    stream, as the norm kernel would add it; HX = round(Y * NW), the next norm's input times its weight;
    and the program that finishes last (a ticket from CNT) sums the per-program squares in SS in a fixed
    order and writes RSTD = 1 / sqrt(mean(Y^2) + eps), so the result is deterministic."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    _grid_dep(PDL)
    y, u = _row_dots(X, W, rn, nm, N, K, GLU, BLOCK_N, BLOCK_K, EVEN_K)
    if SCALED:
        y = y * tl.load(S_IN)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=nm, other=0.0).to(tl.float32)
    if GLU >= 0:
        if SCALED:
            u = u * tl.load(S_IN)
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
        tl.debug_barrier()  # whichever thread stored SS, the ticket's release below orders it
        # acq_rel: this program's SS store is visible to the program that draws the last ticket
        ticket = tl.atomic_add(CNT, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            rp = tl.arange(0, BLOCK_P)
            tot = tl.sum(tl.load(SS + rp, mask=rp < tl.num_programs(0), other=0.0, cache_modifier=".cg"), axis=0)
            tl.store(RSTD, tl.rsqrt(tot / N + eps))
            tl.store(CNT, 0)  # ready for the next chained GEMV (the counter is shared)
    else:
        tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=nm)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, scale: torch.Tensor | None = None,
         glu: str | None = None, alpha: float = 1.702, limit: float = 7.0,
         residual: tuple[torch.Tensor, torch.Tensor, float, bool, torch.Tensor] | None = None, block_n: int = 8,
         block_k: int = 512, num_warps: int = 4, num_stages: int = 4):
    """x: (1, K), w: (N, K) row-major -> (1, N); F.linear for a single row.

    scale: a (1,) fp32 factor on the product before the bias (the rstd of a chained norm, x its input
    times the norm weight); glu: w is [gate; up] (2N, K) and the result act(gate, up) (1, N).
    residual = (r (1, N), next norm weight (N,), eps, plus_one, counter (1,) int32 zeros): returns
    (r + linear, that times the norm weight, its rstd (1,) fp32) for the next chained GEMV."""
    N2, K = w.shape
    N = N2 // 2 if glu is not None else N2
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    grid = triton.cdiv(N, block_n)
    if residual is not None:
        r, nw, eps, plus_one, cnt = residual
        hx = torch.empty_like(y)
        ss = torch.empty(grid, dtype=torch.float32, device=x.device)
        rstd = torch.empty(1, dtype=torch.float32, device=x.device)
    else:
        r = nw = hx = ss = cnt = rstd = y
        eps, plus_one = 0.0, False
    _gemv_kernel[(grid,)](x, w, bias if bias is not None else w, y, r, nw, hx, ss, cnt, rstd,
                          scale if scale is not None else y, N, K, eps, alpha, limit, HAS_BIAS=bias is not None,
                          BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, HAS_RES=residual is not None,
                          PLUS_ONE=plus_one, SCALED=scale is not None, GLU=ACTS[glu] if glu is not None else -1,
                          BLOCK_P=_np2(grid) if residual is not None else 1, num_warps=num_warps,
                          num_stages=num_stages, **_pdl())
    return (y, hx, rstd) if residual is not None else y


@triton.jit
def _qkv_rope_gemv_kernel(X, W, B, S_IN, COS, SIN, Q_OUT, K_CACHE, V_CACHE, SLOT, K, H, HKV,
                          HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
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
    _grid_dep(PDL)
    y, _ = _row_dots(X, W, rn, tl.full((BLOCK_N,), 1, tl.int1), 0, K, -1, BLOCK_N, BLOCK_K, EVEN_K)
    if SCALED:
        y = y * tl.load(S_IN)
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


def qkv_rope_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                  cos: torch.Tensor | None, sin: torch.Tensor | None, q_out: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slots: torch.Tensor, H: int, Hkv: int, *, block_n: int = 8,
                  block_k: int = 512, num_warps: int = 4, num_stages: int = 4) -> None:
    """One row: qkv = x @ w.T (* scale) (+ bias), then what rope_kv_write does with it, in one kernel.
    x: (1, K); w: ((H + 2 Hkv) D, K); cos/sin (1, D/2) or None; q_out (1, H, D); caches (blocks, bs, Hkv, D)."""
    D = q_out.shape[-1]
    K = w.shape[1]
    if block_n % 2 or (D // 2) % (block_n // 2) or w.shape[0] != (H + 2 * Hkv) * D or x.shape != (1, K):
        raise ValueError(f"qkv_rope_gemv: block_n {block_n} must be even and split D/2 = {D // 2}; w "
                         f"{tuple(w.shape)} must be (({H} + 2 * {Hkv}) * {D}, K), x {tuple(x.shape)} (1, K)")
    grid = (H + 2 * Hkv) * (D // block_n)
    _qkv_rope_gemv_kernel[(grid,)](
        x, w, bias if bias is not None else w, scale if scale is not None else x, cos if cos is not None else x,
        sin if sin is not None else x, q_out, k_cache, v_cache, slots, K, H, Hkv, HAS_BIAS=bias is not None,
        SCALED=scale is not None, HAS_ROPE=cos is not None, HALF=D // 2, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=K % block_k == 0, num_warps=num_warps, num_stages=num_stages, **_pdl())


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
