"""Caller-owned, preallocated, position-indexed KV caches (gpt-fast / mlx-lm style).

The model says which cache each layer needs (`Transformer.make_cache`): a full-length buffer for
global layers, a ring buffer of `window` slots for sliding-window layers. Every cache answers
`update(k, v, positions) -> (k_all, v_all, k_positions)`; attention masks by positions, so empty
slots (position -1), stale ring slots and the window are all handled by one rule.

Shapes: k, v: (B, Hkv, T, D); positions: (B, T); k_all: (B, Hkv, S, D); k_positions: (B, S).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.max_len = max_len
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, max_len), -1, dtype=torch.long, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"KV cache: position {int(positions.max())} beyond its length {self.max_len}")
        idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))
        self.pos.scatter_(1, positions, positions)
        return self.k, self.v, self.pos

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class SlidingKVCache:
    """Ring buffer holding the last `window` positions; slot = position % window."""

    def __init__(self, batch: int, n_kv_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.window = window
        self.k = torch.zeros(batch, n_kv_heads, window, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, window), -1, dtype=torch.long, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        # Attend over what the ring held *before* this chunk plus the chunk itself, then keep the
        # chunk's last `window` tokens: a long prefill chunk never overwrites keys it still needs.
        k_all = torch.cat([self.k, k.to(self.k.dtype)], dim=2)
        v_all = torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        pos_all = torch.cat([self.pos, positions], dim=1)
        tail = min(positions.shape[1], self.window)
        kt, vt, pt = k[:, :, -tail:], v[:, :, -tail:], positions[:, -tail:]
        slot = pt % self.window
        idx = slot[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, idx, kt.to(self.k.dtype))
        self.v.scatter_(2, idx, vt.to(self.v.dtype))
        self.pos.scatter_(1, slot, pt)
        return k_all, v_all, pos_all

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


KVCache = StaticKVCache | SlidingKVCache


def cache_nbytes(cache: list[KVCache]) -> int:
    return sum(c.nbytes for c in cache)
