"""ModelConfig: one flat dataclass; every architectural switch is an explicit field.

Behaviour is chosen from these fields only, never from a model's name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIVATIONS = ("silu_glu", "gelu_tanh_glu", "clamped_swiglu")
NORM_KINDS = ("rmsnorm", "rmsnorm_plus_one", "layernorm")
POSITIONS = ("rope", "t5_bias", "none")
ROPE_SCALINGS = ("none", "llama3", "yarn")


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # dense FFN width, or the width of one expert when n_experts > 0
    max_context: int = 8192
    # MLP
    activation: str = "silu_glu"
    swiglu_alpha: float = 1.702  # clamped_swiglu only: out = g*sigmoid(alpha*g)*(u+1)
    swiglu_limit: float = 7.0  # clamped_swiglu only: g <= limit, -limit <= u <= limit
    mlp_bias: bool = False
    # attention
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    # per-layer sliding window, 0 = full attention; a tuple shorter than n_layers repeats as a pattern
    layer_windows: tuple[int, ...] = ()
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None  # scores scaled by query_scale**-0.5; None = head_dim
    attn_sinks: bool = False  # one learned logit per head joined to the softmax denominator
    # norms
    norm_kind: str = "rmsnorm"
    norm_eps: float = 1e-5
    post_norms: bool = False  # "sandwich": extra norms after attention and after the MLP
    # positions
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_original_max_context: int = 8192
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_truncate: bool = True
    yarn_attention_factor: float | None = None  # None = 0.1*ln(factor)+1
    rel_buckets: int = 32  # t5_bias
    rel_max_distance: int = 128  # t5_bias
    # embeddings
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(d_model)
    tie_embeddings: bool = False
    # mixture of experts (n_experts = 0: dense)
    n_experts: int = 0
    experts_per_token: int = 0
    router_bias: bool = False
    router_softmax_before_topk: bool = True  # Mixtral: softmax then top-k; gpt-oss: top-k then softmax
    router_renormalize: bool = True  # only with softmax before top-k: renormalise the k weights
    moe_aux_loss_coef: float = 0.0
    moe_z_loss_coef: float = 0.0
    # special tokens (carried for checkpoint round trips)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.layer_windows = tuple(int(w) for w in self.layer_windows)
        self.validate()

    # ---- validation -------------------------------------------------------
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_context"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "must be a positive integer")
        for f in dataclasses.fields(self):
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise bad(f.name, "must be true or false")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", f"n_heads={self.n_heads} must be divisible by n_kv_heads")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"must be one of {ACTIVATIONS}")
        if self.norm_kind not in NORM_KINDS:
            raise bad("norm_kind", f"must be one of {NORM_KINDS}")
        if not self.norm_eps > 0:
            raise bad("norm_eps", "must be > 0")
        if self.position not in POSITIONS:
            raise bad("position", f"must be one of {POSITIONS}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise bad("rope_scaling", f"must be one of {ROPE_SCALINGS}")
        if self.position == "rope":
            if self.head_dim % 2:
                raise bad("head_dim", "must be even for rotary embeddings")
            if not self.rope_theta > 0:
                raise bad("rope_theta", "must be > 0")
            if self.rope_scaling != "none" and not self.rope_factor >= 1:
                raise bad("rope_factor", "must be >= 1 when rope_scaling is set")
            if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
                raise bad("rope_high_freq_factor", "must be greater than rope_low_freq_factor")
        elif self.rope_scaling != "none":
            raise bad("rope_scaling", f"needs position='rope' (position={self.position!r})")
        if self.position == "t5_bias":
            if self.rel_buckets < 2:
                raise bad("rel_buckets", "must be >= 2")
            if self.rel_max_distance <= self.rel_buckets // 2:
                raise bad("rel_max_distance", "must exceed rel_buckets // 2")
        if len(self.layer_windows) > self.n_layers:
            raise bad("layer_windows", f"has more entries than n_layers={self.n_layers}")
        for w in self.layer_windows:
            if w < 0:
                raise bad("layer_windows", "windows must be >= 0 (0 = full attention)")
            if w > self.max_context:
                raise bad("layer_windows", f"window {w} is larger than max_context={self.max_context}")
        for name in ("attn_softcap", "final_softcap", "query_scale", "embed_scale"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise bad(name, "must be > 0 or None")
        if self.n_experts < 0:
            raise bad("n_experts", "must be >= 0")
        if self.n_experts:
            if not 1 <= self.experts_per_token <= self.n_experts:
                raise bad("experts_per_token", f"must be in [1, n_experts={self.n_experts}]")
        elif self.experts_per_token:
            raise bad("experts_per_token", "must be 0 for a dense model (n_experts=0)")
        if self.moe_aux_loss_coef < 0 or self.moe_z_loss_coef < 0:
            raise ValueError("ModelConfig.moe_aux_loss_coef / moe_z_loss_coef: must be >= 0")

    # ---- derived ----------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def layer_window(self, layer: int) -> int:
        """Sliding window of `layer` (0 = full attention)."""
        if not self.layer_windows:
            return 0
        return self.layer_windows[layer % len(self.layer_windows)]

    @property
    def windows(self) -> list[int]:
        return [self.layer_window(i) for i in range(self.n_layers)]

    @property
    def attn_scale(self) -> float:
        return (self.query_scale if self.query_scale is not None else self.head_dim) ** -0.5

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_windows"] = list(self.layer_windows)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
        if missing:
            raise ValueError(f"ModelConfig: missing required fields {missing}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """A giants config JSON or an HF config.json (recognised by its `model_type`)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read config JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: config JSON must be an object")
        try:
            return cls.from_hf(d) if "model_type" in d else cls.from_dict(d)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        from giants.hf_config import config_from_hf

        return config_from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        from giants.hf_config import config_to_hf

        return config_to_hf(self)

    @property
    def hf_model_type(self) -> str:
        from giants.hf_config import hf_model_type

        return hf_model_type(self)


__all__ = ["ModelConfig", "ACTIVATIONS", "NORM_KINDS", "POSITIONS", "ROPE_SCALINGS", "field"]
