"""Forward and training FLOPs from a ModelConfig.

Convention (the one `torch.utils.flop_counter.FlopCounterMode` uses, so the two can be compared):
- a matmul of (M, K) @ (K, N) costs 2*M*K*N; bias adds, norms, activations, softmax, rotary and the
  embedding lookup cost nothing;
- attention costs 4 * heads * head_dim per (query, key) pair: 2 for q.k and 2 for p.v.

What differs between "prefill" flavours is only which (query, key) pairs are counted:
- `causal` (default): each query meets the keys it may see, min(position + 1, window) of them; the
  work a causal / sliding-window kernel that skips masked blocks does;
- `dense`: the full T x T score matrix, masked entries included; what a masked dense kernel computes and
  what FlopCounterMode reports for SDPA without a cache (it ignores `is_causal`).
A decode step at context c meets min(c, window) keys either way.

Training = forward + backward = 3 x forward (backward does two matmuls per forward matmul), the
convention MFU figures are quoted in (PaLM, Megatron-LM).
"""

from __future__ import annotations

from dataclasses import dataclass

from giants.analysis.params import attention_layer_params, expert_layer_params
from giants.config import ModelConfig


@dataclass(frozen=True)
class Flops:
    matmul: int  # projections, MLP/experts, router, output head
    attention: int  # q.k and p.v

    @property
    def total(self) -> int:
        return self.matmul + self.attention

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.matmul + other.matmul, self.attention + other.attention)

    def scale(self, k: int) -> Flops:
        return Flops(self.matmul * k, self.attention * k)


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights one token multiplies by: attention projections, the routed experts (or the MLP), the
    router and the output head. No biases, norms, sinks or embedding lookups."""
    attn_w, _ = attention_layer_params(cfg)
    exp_w, _ = expert_layer_params(cfg)
    per_layer = attn_w + exp_w * (cfg.experts_per_token if cfg.is_moe else 1)
    per_layer += cfg.d_model * cfg.n_experts if cfg.is_moe else 0
    return cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model


def attention_pair_flops(cfg: ModelConfig) -> int:
    """FLOPs of one (query, key) pair in one layer."""
    return 4 * cfg.n_heads * cfg.head_dim


def spans(cfg: ModelConfig, context: int) -> list[int]:
    """Keys the token at position context-1 attends to, per layer (windows cap the span)."""
    return [min(context, w) if w else context for w in cfg.windows]


def forward_flops_per_token(cfg: ModelConfig, context: int) -> Flops:
    """One token decoded with `context` tokens visible (itself included)."""
    if context < 1:
        raise ValueError(f"context must be >= 1 (got {context})")
    return Flops(2 * matmul_params_per_token(cfg), attention_pair_flops(cfg) * sum(spans(cfg, context)))


def _causal_pairs(T: int, window: int) -> int:
    """Number of (query, key) pairs of a causal prefill of T tokens, each query seeing <= window keys."""
    if not window or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def prefill_flops(cfg: ModelConfig, tokens: int, batch: int = 1, attention: str = "causal") -> Flops:
    """All FLOPs of a forward pass over `tokens` tokens (no cache), for `batch` sequences."""
    if tokens < 1 or batch < 1:
        raise ValueError(f"tokens and batch must be >= 1 (got {tokens}, {batch})")
    if attention == "causal":
        pairs = sum(_causal_pairs(tokens, w) for w in cfg.windows)
    elif attention == "dense":
        pairs = cfg.n_layers * tokens * tokens
    else:
        raise ValueError(f"attention must be 'causal' or 'dense' (got {attention!r})")
    return Flops(2 * matmul_params_per_token(cfg) * tokens * batch, attention_pair_flops(cfg) * pairs * batch)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs per trained token for sequences of `seq_len` (causal attention)."""
    return 3 * prefill_flops(cfg, seq_len).total // seq_len
