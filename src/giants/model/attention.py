"""Attention: q/k/v/o projections, rotary or relative bias, GQA, windows, soft-cap, sinks.

Legend: B batch, T query tokens, S key tokens, H query heads, Hkv key/value heads, G = H // Hkv,
D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from giants.config import ModelConfig
from giants.model.positions import RelativeBias, apply_rotary


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """allowed[b, t, s]: key s is filled (pos >= 0), not in the future, and inside the window."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = (k_pos[:, None, :] >= 0) & (diff >= 0)
    if window:
        allowed &= diff < window
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, *,
           scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, Hkv, S, D); allowed: (B, T, S) or None for plain causal (T == S);
    bias: (B, H, T, S); sinks: (H,). Returns (B, H, T, D)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if softcap is None and sinks is None:
        # SDPA handles GQA, masks and additive bias; the fused kernels apply when there is no bias.
        mask = None if allowed is None else allowed[:, None]
        if bias is not None:
            if mask is None:
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None, None]
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=Hkv != H)
    # Math path for soft-capped or sink attention: scores (B, Hkv, G, T, S) without repeating k/v.
    G = H // Hkv
    qg = q.view(B, Hkv, G, T, D)
    acc = torch.promote_types(q.dtype, torch.float32)  # soft-cap and softmax in fp32 (fp64 in tests)
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)).to(acc) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(acc).view(B, Hkv, G, T, S)
    if allowed is None:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    if sinks is not None:
        # The sink is an extra logit in each row's softmax denominator whose value is dropped.
        sink = sinks.to(acc).view(1, Hkv, G, 1, 1).expand(B, Hkv, G, T, 1)
        scores = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v[:, :, None])
    return out.view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.window = cfg.layer_window(layer)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.attn_qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attn_qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attn_qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.attn_out_bias)
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attn_sinks else None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None, cache=None,
                rel_bias: RelativeBias | None = None, causal_no_cache: bool = False) -> torch.Tensor:
        # x: (B, T, d_model); positions: (B, T)
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v, k_pos = cache.update(k, v, positions)
        else:
            k_pos = positions
        # Plain causal training/prefill with no window lets SDPA use its fused causal kernels.
        allowed = None if (causal_no_cache and cache is None and not self.window) else \
            attention_mask(positions, k_pos, self.window)
        bias = rel_bias(positions, k_pos) if rel_bias is not None else None
        out = attend(q, k, v, allowed, scale=self.cfg.attn_scale, softcap=self.cfg.attn_softcap,
                     sinks=self.sinks, bias=bias)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
