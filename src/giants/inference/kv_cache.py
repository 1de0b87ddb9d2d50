"""Paged KV cache: fixed-size blocks, one block table per sequence, a free list, prefix caching.

Layers are grouped by attention window. Each group owns a pool of `num_blocks` blocks per layer
(k and v: (num_blocks, block_size, Hkv, D)) and its own allocator, because a sliding-window group
releases a sequence's blocks once they fall out of the window while a full-attention group keeps all
of them. A block's identity is the same across the layers of its group.

Prefix caching: a full block is keyed by a SHA-256 chain (`block_key`): the digest of the previous block's
key and the block's token ids, so equal keys mean equal prefixes (a collision would need a SHA-256
collision, where a 64-bit `hash` chain could be made to collide on purpose and serve one prompt's KV to
another). A block whose last user leaves stays in the cache (an LRU of
evictable blocks) until its slot is needed. A prefix hit needs, in every full-attention group, all
blocks of the prefix and, in every sliding group, the blocks that the window still reaches.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from giants.config import ModelConfig

BlockKey = bytes  # a SHA-256 digest (32 bytes), see block_key
ROOT_KEY = bytes(32)  # the parent of a sequence's first block


class BlockPool:
    """Reference-counted blocks of one layer group; cached blocks with no user are evictable (LRU)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.key: list[BlockKey | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[BlockKey, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)  # least recently used cached block
            del self.cached[self.key[b]]
            self.key[b] = None
        self.ref[b] = 1
        return b

    def release(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.key[b] is not None:
                self.evictable[b] = None
            else:
                self.free.append(b)

    def lookup(self, key: BlockKey) -> int | None:
        return self.cached.get(key)

    def take(self, b: int) -> None:
        """Add a user to a cached block (a prefix hit)."""
        if self.ref[b] == 0:
            del self.evictable[b]
        self.ref[b] += 1

    def register(self, b: int, key: BlockKey) -> None:
        if self.key[b] is None and key not in self.cached:
            self.cached[key] = b
            self.key[b] = key


@dataclass
class LayerGroup:
    window: int  # 0 = full attention (or a window no sequence can exceed)
    layers: list[int]
    pool: BlockPool
    k: list[torch.Tensor] = field(default_factory=list)  # per layer: (num_blocks, block_size, Hkv, D)
    v: list[torch.Tensor] = field(default_factory=list)


class SeqBlocks:
    """A sequence's block tables (one per group, -1 = released) and its prefix-cache keys."""

    def __init__(self, n_groups: int) -> None:
        self.tables: list[list[int]] = [[] for _ in range(n_groups)]
        self.keys: list[BlockKey] = []
        self.registered = 0  # number of leading full blocks already offered to the prefix cache


def block_key(parent: BlockKey | None, tokens: tuple[int, ...]) -> BlockKey:
    """sha256(parent key (32 bytes; ROOT_KEY, all zeros, for the first block) || token ids as int64
    little-endian).digest(): the fixed-length parent makes the byte string unambiguous, and the key names the
    whole prefix up to and including this block."""
    data = (ROOT_KEY if parent is None else parent) + struct.pack(f"<{len(tokens)}q", *tokens)
    return hashlib.sha256(data).digest()


class KVCacheManager:
    def __init__(self, cfg: ModelConfig, *, block_size: int, num_blocks: int | list[int], max_model_len: int,
                 dtype: torch.dtype, device: torch.device, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1 (got {block_size})")
        self.cfg, self.block_size, self.device, self.dtype = cfg, block_size, device, dtype
        self.enable_prefix_caching = enable_prefix_caching
        by_window: dict[int, list[int]] = {}
        for i, w in enumerate(cfg.windows):
            by_window.setdefault(w if w and w < max_model_len else 0, []).append(i)
        counts = num_blocks if isinstance(num_blocks, list) else [num_blocks] * len(by_window)
        self.groups: list[LayerGroup] = []
        self.group_of_layer = [0] * cfg.n_layers
        shape_tail = (block_size, cfg.n_kv_heads, cfg.head_dim)
        for gi, ((w, layers), nb) in enumerate(zip(sorted(by_window.items()), counts)):
            if nb < 1:
                raise ValueError(f"num_blocks: must be >= 1 (got {nb})")
            g = LayerGroup(w, layers, BlockPool(nb))
            for layer in layers:
                # One block past the pool's end is scratch: padded rows of a CUDA-graph batch write there.
                g.k.append(torch.zeros((nb + 1, *shape_tail), dtype=dtype, device=device))
                g.v.append(torch.zeros((nb + 1, *shape_tail), dtype=dtype, device=device))
                self.group_of_layer[layer] = gi
            self.groups.append(g)
        self.has_windows = any(g.window for g in self.groups)
        self.layer_index = {layer: g.layers.index(layer) for g in self.groups for layer in g.layers}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, n_layers: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()

    # ---- accounting -------------------------------------------------------------
    @property
    def num_blocks_total(self) -> int:
        return sum(g.pool.num_blocks for g in self.groups)

    @property
    def num_blocks_free(self) -> int:
        return sum(g.pool.num_free for g in self.groups)

    def first_needed_block(self, g: LayerGroup, next_pos: int) -> int:
        """Lowest block index a query at position >= next_pos can still attend to."""
        if not g.window:
            return 0
        return max(0, next_pos - g.window + 1) // self.block_size

    def _needed(self, g: LayerGroup, blocks: SeqBlocks, gi: int, start: int, end: int) -> int:
        """New blocks group g needs so that positions [start, end) have slots."""
        have = len(blocks.tables[gi])
        want = -(-end // self.block_size)
        return max(0, want - max(have, self.first_needed_block(g, start)))

    def fits_at_all(self, length: int, chunk: int) -> bool:
        """Could one sequence of `length` tokens be processed (chunks of <= `chunk`) with every block free?"""
        for g in self.groups:
            if g.window:
                need = -(-(g.window + chunk) // self.block_size) + 1
                need = min(need, -(-length // self.block_size))
            else:
                need = -(-length // self.block_size)
            if need > g.pool.num_blocks:
                return False
        return True

    # ---- per-sequence operations ---------------------------------------------
    def release_outside_window(self, blocks: SeqBlocks, next_pos: int) -> None:
        if not self.has_windows:
            return
        for gi, g in enumerate(self.groups):
            if not g.window:
                continue
            table = blocks.tables[gi]
            for j in range(min(self.first_needed_block(g, next_pos), len(table))):
                if table[j] >= 0:
                    g.pool.release(table[j])
                    table[j] = -1

    def allocate(self, blocks: SeqBlocks, start: int, end: int) -> bool:
        """Give the sequence slots for positions [start, end); all-or-nothing."""
        want = -(-end // self.block_size)
        if all(len(t) >= want for t in blocks.tables):
            return True  # the usual decode step: the token lands in a block it already has
        needs = [self._needed(g, blocks, gi, start, end) for gi, g in enumerate(self.groups)]
        if any(n > g.pool.num_free for n, g in zip(needs, self.groups)):
            return False
        for gi, (g, n) in enumerate(zip(self.groups, needs)):
            table = blocks.tables[gi]
            first = self.first_needed_block(g, start)
            while len(table) < first:
                table.append(-1)  # never-needed blocks of a sliding group
            for _ in range(n):
                table.append(g.pool.allocate())
        return True

    def truncate(self, blocks: SeqBlocks, length: int) -> None:
        """Release the blocks past the first `length` positions (the slots of rejected speculative tokens). Blocks
        offered to the prefix cache hold computed tokens only, so they always lie within `length`."""
        keep = -(-length // self.block_size)
        for gi, g in enumerate(self.groups):
            table = blocks.tables[gi]
            while len(table) > keep:
                b = table.pop()
                if b >= 0:
                    g.pool.release(b)

    def free(self, blocks: SeqBlocks) -> None:
        for gi, g in enumerate(self.groups):
            for b in blocks.tables[gi]:
                if b >= 0:
                    g.pool.release(b)
            blocks.tables[gi] = []
        blocks.registered = 0

    def _keys(self, blocks: SeqBlocks, token_ids: list[int], n_full: int) -> list[BlockKey]:
        bs = self.block_size
        while len(blocks.keys) < n_full:
            i = len(blocks.keys)
            parent = blocks.keys[-1] if blocks.keys else None
            blocks.keys.append(block_key(parent, tuple(token_ids[i * bs:(i + 1) * bs])))
        return blocks.keys[:n_full]

    def match_prefix(self, blocks: SeqBlocks, token_ids: list[int]) -> int:
        """Take cached blocks for the longest usable prefix; returns the number of tokens covered.
        The last token is always left to compute (its logits are needed)."""
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        self.prefix_queries += max_blocks * bs
        if max_blocks == 0:
            return 0
        keys = self._keys(blocks, token_ids, max_blocks)
        hits = [[g.pool.lookup(k) for k in keys] for g in self.groups]
        best = 0
        for k in range(max_blocks, 0, -1):
            ok = True
            for g, h in zip(self.groups, hits):
                lo = self.first_needed_block(g, k * bs)
                if any(b is None for b in h[lo:k]):
                    ok = False
                    break
            if ok:
                best = k
                break
        if not best:
            return 0
        for gi, (g, h) in enumerate(zip(self.groups, hits)):
            lo = self.first_needed_block(g, best * bs)
            table = [-1] * lo
            for b in h[lo:best]:
                g.pool.take(b)
                table.append(b)
            blocks.tables[gi] = table
        blocks.registered = best
        self.prefix_hits += best * bs
        return best * bs

    def register_full_blocks(self, blocks: SeqBlocks, token_ids: list[int], num_computed: int) -> None:
        """Offer blocks whose KV is now complete to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        n_full = num_computed // self.block_size
        if n_full <= blocks.registered:
            return
        keys = self._keys(blocks, token_ids, n_full)
        for i in range(blocks.registered, n_full):
            for gi, g in enumerate(self.groups):
                table = blocks.tables[gi]
                if i < len(table) and table[i] >= 0:
                    g.pool.register(table[i], keys[i])
        blocks.registered = n_full
