"""Position encodings: rotary (plain, llama3-scaled, YaRN) and T5 relative position buckets."""

from __future__ import annotations

import math

import torch
from torch import nn

from giants.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale ("attention factor", YaRN only)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_scaling == "llama3":
        # Llama 3.1: long wavelengths divided by factor, short kept, a smooth ramp between.
        factor, orig = cfg.rope_factor, cfg.rope_original_max_context
        low_wavelen = orig / cfg.rope_low_freq_factor
        high_wavelen = orig / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return torch.where(is_mid, mid, scaled).float(), 1.0
    if cfg.rope_scaling == "yarn":
        # YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, ramp between.
        factor, orig, base = cfg.rope_factor, cfg.rope_original_max_context, cfg.rope_theta

        def corr_dim(rot: float) -> float:
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr_dim(cfg.yarn_beta_fast), corr_dim(cfg.yarn_beta_slow)
        if cfg.yarn_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrap = 1 - ramp  # 1 keeps the original frequency
        pos_freqs = cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
        attn_factor = cfg.yarn_attention_factor
        if attn_factor is None:
            attn_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv, float(attn_factor)
    return inv_freq.float(), 1.0


class Rotary(nn.Module):
    """cos/sin for given positions; rotate-half layout (first half pairs with second half)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Computed on the CPU, then moved: a few floats, and arange on the meta device would import
        # torch._dynamo (~3 s, ~75 MB) the first time a model is built there (every checkpoint load).
        with torch.device("cpu"):
            inv_freq, self.scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq.to(torch.empty(0).device), persistent=False)
        self.cfg = cfg

    def reset_buffers(self) -> None:
        self.inv_freq = rope_inv_freq(self.cfg)[0].to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) -> cos, sin: (B, 1, T, head_dim/2)
        freqs = positions[..., None].float() * self.inv_freq.float()
        return ((freqs.cos() * self.scale).to(dtype)[:, None], (freqs.sin() * self.scale).to(dtype)[:, None])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (B, 1, T, D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def t5_relative_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal (unidirectional) bucket of `key_pos - query_pos`: exact for small distances,
    logarithmic up to max_distance, everything farther in the last bucket."""
    n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return torch.where(is_small, n, large)


class RelativeBias(nn.Module):
    """T5-style learned bias, one scalar per (bucket, head), shared by all layers."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance
        self.weight = nn.Parameter(torch.zeros(cfg.rel_buckets, cfg.n_heads))

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        # q_pos: (B, T), k_pos: (B, S) -> bias: (B, H, T, S)
        rel = k_pos[:, None, :] - q_pos[:, :, None]
        bucket = t5_relative_bucket(rel, self.num_buckets, self.max_distance)
        return bias_lookup(self.weight, bucket).permute(0, 3, 1, 2)


def bias_lookup(weight: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
    """weight[bucket]: (nb, H) rows picked by bucket ids (...) -> (..., H), with a deterministic gradient.

    The backward of `weight[bucket]` is index_put_(accumulate=True), which on the CPU with more than one
    thread adds with atomics in whatever order the threads race (the table's gradient then differs run to
    run in the last bits, and a resumed run drifts from an uninterrupted one). On the CPU this is a gather
    instead, whose backward is scatter_add_, deterministic there (stable-sorted per row) and faster; the
    forward values are the same copies. On CUDA indexing stays: its accumulate is sort-based and
    deterministic, while scatter_add_ uses atomics there."""
    if weight.device.type != "cpu":
        return weight[bucket]
    idx = bucket.reshape(-1, 1).expand(-1, weight.shape[1])
    return weight.gather(0, idx).view(*bucket.shape, weight.shape[1])
