"""Paged decode attention (GQA-packed, sliding window, soft-cap, sinks, T5 relative bias; split-K, the splits
combined by a reduce kernel or by the split program that finishes last)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from giants.inference.kernels.common import _grid_dep, _np2, _pdl


# ---- paged decode attention -------------------------------------------------------------------
@triton.jit
def _paged_attn_kernel(Q, K_CACHE, V_CACHE, TABLE, SEQ_LEN, BIAS, M_OUT, L_OUT, ACC_OUT, OUT, SINKS, CNT,
                       scale, softcap, stride_table, max_dist, H: tl.constexpr, HKV: tl.constexpr,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                       BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SINKS: tl.constexpr,
                       IEEE: tl.constexpr, FUSED_REDUCE: tl.constexpr, PDL: tl.constexpr):
    """One (sequence, kv head, key split) program: its G query heads over its share of the keys. With
    NUM_SPLITS > 1 it stores (max, sum, unnormalized output) per head; with FUSED_REDUCE the split that draws
    the last ticket from CNT[b, kv head] combines them (no reduce kernel, one launch less per layer)."""
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
        # issued with K: at decode the loop runs once or twice, so the V load's latency would not be hidden
        v = tl.load(V_CACHE + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
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
        if FUSED_REDUCE:
            tl.debug_barrier()  # every thread's partial stores precede the ticket's release
            # acq_rel: the last program sees every split's stores
            ticket = tl.atomic_add(CNT + b * HKV + hk, 1, sem="acq_rel")
            if ticket == NUM_SPLITS - 1:
                rows = (b * H + heads) * NUM_SPLITS
                o = _combine_splits(M_OUT, L_OUT, ACC_OUT, SINKS, rows, heads, gm, GP, D, NUM_SPLITS, HAS_SINKS)
                tl.store(OUT + (b * H + heads)[:, None] * D + d[None, :], o.to(OUT.dtype.element_ty),
                         mask=gm[:, None])
                tl.store(CNT + b * HKV + hk, 0)  # ready for the next layer (the counters are shared)


@triton.jit
def _combine_splits(M_IN, L_IN, ACC_IN, SINKS, rows, heads, gm, GP: tl.constexpr, D: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, HAS_SINKS: tl.constexpr):
    """(GP, D) attention output of heads from their NUM_SPLITS partials at rows .. rows + NUM_SPLITS - 1,
    read past L1 (.cg: other programs wrote them); what _attn_reduce_kernel computes for one head."""
    s = tl.arange(0, NUM_SPLITS)
    at = rows[:, None] + s[None, :]
    m = tl.load(M_IN + at, mask=gm[:, None], other=float("-inf"), cache_modifier=".cg")  # (GP, NUM_SPLITS)
    l = tl.load(L_IN + at, mask=gm[:, None], other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, axis=1)
    if HAS_SINKS:
        sink = tl.load(SINKS + heads, mask=gm, other=0.0).to(tl.float32)
        m_max = tl.maximum(m_max, sink)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # padding heads: zeros, not NaNs
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max[:, None]))
    denom = tl.sum(w * l, axis=1)
    if HAS_SINKS:
        denom += tl.exp(sink - m_max)
    d = tl.arange(0, D)
    o = tl.zeros((GP, D), tl.float32)
    for j in tl.static_range(NUM_SPLITS):
        wj = tl.sum(tl.where(s[None, :] == j, w, 0.0), axis=1)
        a = tl.load(ACC_IN + (rows + j)[:, None] * D + d[None, :], mask=gm[:, None], other=0.0,
                    cache_modifier=".cg")
        o += a * wj[:, None]
    return o / tl.where(gm, denom, 1.0)[:, None]


@triton.jit
def _attn_reduce_kernel(M_IN, L_IN, ACC_IN, OUT, SINKS, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                        D: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_SINKS: tl.constexpr, PDL: tl.constexpr):
    """The splits' combine as a kernel of its own (no counter given): one program per (sequence, kv head)."""
    _grid_dep(PDL)
    b = tl.program_id(0)
    g = tl.arange(0, GP)
    gm = g < G
    heads = tl.program_id(1) * G + g
    o = _combine_splits(M_IN, L_IN, ACC_IN, SINKS, (b * H + heads) * NUM_SPLITS, heads, gm, GP, D, NUM_SPLITS,
                        HAS_SINKS)
    d = tl.arange(0, D)
    tl.store(OUT + (b * H + heads)[:, None] * D + d[None, :], o.to(OUT.dtype.element_ty), mask=gm[:, None])


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
                 scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 counter: torch.Tensor | None = None) -> torch.Tensor:
        """q: (B, H, D); table: (B, max_pages) int32; seq_lens: (B,) keys per sequence (query at L-1).
        counter: with num_splits > 1, int32 zeros of at least B * n_kv_heads: the last split of each (sequence,
        kv head) combines the splits (no reduce kernel); the kernel leaves them zero again."""
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
        fused = num_splits > 1 and counter is not None
        if fused and (counter.dtype != torch.int32 or counter.numel() < B * self.Hkv):
            raise ValueError(f"PagedAttention: counter must be int32 with at least {B * self.Hkv} elements, got "
                             f"{counter.dtype} with {counter.numel()}")
        block_n = max(16, min(64, self.bs * max(1, 64 // self.bs)))
        bias = self.bias_table
        sinks = self.sinks
        _paged_attn_kernel[(B, self.Hkv, num_splits)](
            q, k_cache, v_cache, table, seq_lens, bias if bias is not None else q, m, l, acc, out,
            sinks if sinks is not None else q, counter if fused else q, self.scale, float(self.softcap or 1.0),
            table.stride(0), bias.shape[1] if bias is not None else 1, H=H, HKV=self.Hkv, G=self.G,
            GP=max(16, _np2(self.G)), D=D, BS=self.bs, BLOCK_N=block_n, WINDOW=self.window, NUM_SPLITS=num_splits,
            HAS_SOFTCAP=self.softcap is not None, HAS_BIAS=bias is not None, HAS_SINKS=sinks is not None,
            IEEE=q.dtype == torch.float32, FUSED_REDUCE=fused, num_warps=4, **_pdl())
        if num_splits > 1 and not fused:
            _attn_reduce_kernel[(B, self.Hkv)](m, l, acc, out, sinks if sinks is not None else q, H=H, G=self.G,
                                               GP=_np2(self.G), D=D, NUM_SPLITS=num_splits,
                                               HAS_SINKS=sinks is not None, **_pdl())
        return out
