"""Parameter counts in closed form from a ModelConfig (checked against the meta-device model in tests).

Conventions (each matches a maker's published figure, see tests/test_analysis_params.py):
- `total` counts every stored tensor once (a tied embedding table once).
- `active` is what one token uses, excluding the input embedding table, the way the gpt-oss model card
  counts "active parameters"; with tied embeddings the shared table still counts, as the output head.
- `active_with_embedding` adds the input table back (the convention behind Mixtral's "12.9B active").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from giants.config import ModelConfig

COMPONENTS = ("embedding", "attention", "mlp", "router", "norms", "position", "unembedding")


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    attention: int
    mlp: int  # dense MLP, or all experts of an MoE model
    router: int
    norms: int
    position: int  # T5 relative bias table
    unembedding: int  # 0 when tied
    active_mlp: int  # MLP parameters one token uses (the routed experts only)
    expert: int = 0  # one expert summed over all layers (MoE only): what "8x22B" would call "22B"

    @property
    def total(self) -> int:
        return (self.embedding + self.attention + self.mlp + self.router + self.norms + self.position
                + self.unembedding)

    @property
    def active(self) -> int:
        """Per-token parameters, excluding the input embedding table (gpt-oss model card convention).
        With tied embeddings the shared table still counts once, as the output projection."""
        head = self.unembedding or self.embedding
        return self.attention + self.active_mlp + self.router + self.norms + self.position + head

    @property
    def active_with_embedding(self) -> int:
        return self.active + (self.embedding if self.unembedding else 0)

    @property
    def non_embedding(self) -> int:
        """Everything but the embedding and unembedding tables (the Gemma 2 paper's split)."""
        return self.total - self.embedding - self.unembedding

    @property
    def shared(self) -> int:
        """Parameters outside the experts: what every token uses whichever experts it picks."""
        return self.total - self.mlp if self.expert else self.total

    def components(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COMPONENTS}

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d.update(total=self.total, active=self.active, active_with_embedding=self.active_with_embedding,
                 non_embedding=self.non_embedding)
        return d


def attention_layer_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matrix weights, biases + sinks) of one attention block."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    weights = cfg.d_model * q + 2 * cfg.d_model * kv + q * cfg.d_model
    extra = (q + 2 * kv if cfg.attn_qkv_bias else 0) + (cfg.d_model if cfg.attn_out_bias else 0)
    extra += cfg.n_heads if cfg.attn_sinks else 0
    return weights, extra


def expert_layer_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matrix weights, biases) of one gated MLP: the dense MLP or one expert."""
    D, F = cfg.d_model, cfg.ffn_dim
    return 3 * D * F, (2 * F + D) if cfg.mlp_bias else 0


def count_params(cfg: ModelConfig) -> ParamCount:
    D, L = cfg.d_model, cfg.n_layers
    attn_w, attn_b = attention_layer_params(cfg)
    exp_w, exp_b = expert_layer_params(cfg)
    expert = exp_w + exp_b
    if cfg.is_moe:
        mlp, active_mlp = cfg.n_experts * expert, cfg.experts_per_token * expert
        router = D * cfg.n_experts + (cfg.n_experts if cfg.router_bias else 0)
    else:
        mlp = active_mlp = expert
        router = 0
    norm = D * (2 if cfg.norm_kind == "layernorm" else 1)
    norms_per_layer = 4 if cfg.post_norms else 2
    return ParamCount(
        embedding=cfg.vocab_size * D,
        attention=L * (attn_w + attn_b),
        mlp=L * mlp,
        router=L * router,
        norms=L * norms_per_layer * norm + norm,
        position=cfg.rel_buckets * cfg.n_heads if cfg.position == "t5_bias" else 0,
        unembedding=0 if cfg.tie_embeddings else cfg.vocab_size * D,
        active_mlp=L * active_mlp,
        expert=L * expert if cfg.is_moe else 0,
    )


def component_of(name: str) -> str:
    """Which COMPONENTS entry a giants parameter name belongs to."""
    if name == "embed.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "unembedding"
    if name.startswith("rel_bias."):
        return "position"
    leaf_owner = name.split(".")[-2] if "." in name else ""
    if "norm" in leaf_owner:
        return "norms"
    if ".mlp.router." in name:
        return "router"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attention"
    raise ValueError(f"parameter {name!r}: no component matches")


def measure_params(named: Iterable[tuple[str, object]]) -> dict[str, int]:
    """Per-component counts of a built model's `named_parameters()` (works on the meta device)."""
    out = dict.fromkeys(COMPONENTS, 0)
    for name, p in named:
        out[component_of(name)] += p.numel()  # type: ignore[attr-defined]
    return out
