"""Parameter counts in closed form from a ModelConfig (checked against the meta-device model in tests)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from giants.config import ModelConfig


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

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d.update(total=self.total, active=self.active, active_with_embedding=self.active_with_embedding)
        return d


def count_params(cfg: ModelConfig) -> ParamCount:
    D, L = cfg.d_model, cfg.n_layers
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attn = D * q + 2 * D * kv + q * D
    if cfg.attn_qkv_bias:
        attn += q + 2 * kv
    if cfg.attn_out_bias:
        attn += D
    if cfg.attn_sinks:
        attn += cfg.n_heads
    expert = 3 * D * cfg.ffn_dim + ((2 * cfg.ffn_dim + D) if cfg.mlp_bias else 0)
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
        attention=L * attn,
        mlp=L * mlp,
        router=L * router,
        norms=L * norms_per_layer * norm + norm,
        position=cfg.rel_buckets * cfg.n_heads if cfg.position == "t5_bias" else 0,
        unembedding=0 if cfg.tie_embeddings else cfg.vocab_size * D,
        active_mlp=L * active_mlp,
    )
