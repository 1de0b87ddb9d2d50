"""Gated MLP and the sparse mixture of experts built from the same activation.

Legend: N tokens (B*T flattened), D d_model, F ffn_dim, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from giants.config import ModelConfig


def gated_activation(gate: torch.Tensor, up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if cfg.activation == "silu_glu":
        return F.silu(gate) * up
    if cfg.activation == "gelu_tanh_glu":
        return F.gelu(gate, approximate="tanh") * up
    # gpt-oss clamped SwiGLU: gate clamped from above, linear part both ways, then +1 on the linear part.
    gate = gate.clamp(max=cfg.swiglu_limit)
    up = up.clamp(min=-cfg.swiglu_limit, max=cfg.swiglu_limit)
    return gate * torch.sigmoid(cfg.swiglu_alpha * gate) * (up + 1)


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), self.cfg))


def _autocast_bf16(x: torch.Tensor) -> bool:
    """CUDA bf16 autocast (mixed-precision training over fp32 weights)."""
    return (x.device.type == "cuda" and torch.is_autocast_enabled("cuda")
            and torch.get_autocast_dtype("cuda") == torch.bfloat16)


def _grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm: CUDA (with autograd) or CPU inference, 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        # bf16 rows must be 16-byte aligned (grouped_mm refuses other strides): every dim a multiple of 8
        aligned = all(s % 8 == 0 for s in (x.shape[-1], w.shape[-1], w.shape[-2]))
        return aligned and ((x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16) or _autocast_bf16(x))
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        return all(s * x.element_size() % 16 == 0 for s in (x.shape[-1], w.shape[-1], w.shape[-2]))
    return False


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
                   bias: torch.Tensor | None, expert_of_row: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert; row block e uses w[e]: (out, in). x: (M, in) -> (M, out)."""
    if _grouped_ok(x, w):
        if _autocast_bf16(x):  # autocast does not cover _grouped_mm: cast the operands as it would for a matmul
            x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
        y = torch._grouped_mm(x, w.transpose(-1, -2), offs=offsets)
    else:
        # Fallback (CPU training): one matmul per non-empty expert segment.
        parts = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                parts.append(x[start:start + n] @ w[e].t())
            start += n
        y = torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])
    if bias is not None:
        y = y + bias[expert_of_row]
    return y


class MoE(nn.Module):
    """Router -> top-k -> dropless expert compute over tokens sorted by expert -> weighted combine."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, Fd = cfg.n_experts, cfg.d_model, cfg.ffn_dim
        self.router = nn.Linear(D, E, bias=cfg.router_bias)
        self.w_gate = nn.Parameter(torch.empty(E, Fd, D))  # (E, F, D), nn.Linear layout per expert
        self.w_up = nn.Parameter(torch.empty(E, Fd, D))
        self.w_down = nn.Parameter(torch.empty(E, D, Fd))
        if cfg.mlp_bias:
            self.b_gate = nn.Parameter(torch.zeros(E, Fd))
            self.b_up = nn.Parameter(torch.zeros(E, Fd))
            self.b_down = nn.Parameter(torch.zeros(E, D))
        else:
            self.b_gate = self.b_up = self.b_down = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D) -> router logits (N, E), weights (N, K), expert ids (N, K)."""
        logits = self.router(x)
        k = self.cfg.experts_per_token
        if self.cfg.router_softmax_before_topk:
            probs = torch.softmax(logits.float(), dim=-1)
            weights, idx = torch.topk(probs, k, dim=-1)
            if self.cfg.router_renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            top, idx = torch.topk(logits, k, dim=-1)
            weights = torch.softmax(top.float(), dim=-1)
        return logits, weights.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, D) -> out (B, T, D), router logits (B*T, E)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, idx = self.route(x)
        N, K = idx.shape
        flat = idx.reshape(-1)  # (N*K,)
        order = torch.argsort(flat, stable=True)
        expert_of_row = flat[order]
        token_of_row = order // K
        counts = torch.bincount(flat, minlength=self.cfg.n_experts)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[token_of_row]  # (N*K, D), grouped by expert
        g = grouped_linear(xs, self.w_gate, counts, offsets, self.b_gate, expert_of_row)
        u = grouped_linear(xs, self.w_up, counts, offsets, self.b_up, expert_of_row)
        h = gated_activation(g, u, self.cfg)
        y = grouped_linear(h, self.w_down, counts, offsets, self.b_down, expert_of_row)
        y = y * weights.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, token_of_row, y.to(x.dtype))
        return out.view(shape), logits
