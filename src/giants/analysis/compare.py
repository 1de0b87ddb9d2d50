"""Per-model summary records (what `giants compare` prints) and model lookup by preset name or path."""

from __future__ import annotations

from pathlib import Path

from giants.analysis.flops import forward_flops_per_token
from giants.analysis.memory import default_kv_dtype, dtype_bytes, kv_cache_bytes, serving_memory, weight_bytes_all
from giants.analysis.params import count_params
from giants.analysis.tables import Column, human_bytes, human_count, human_flops
from giants.config import ModelConfig
from giants.presets import ARTICLE_PRESETS, PRESETS, TINY_PRESETS, get_preset

REAL_PRESETS = tuple(n for n in PRESETS if n not in TINY_PRESETS)

# Weight formats the makers publish, where not bf16: gpt-oss ships MXFP4 experts (model card, "Quantization").
# Storing such a model in a wider format adds bytes but no quality, so fits start from this format.
PUBLISHED_FORMAT = {"gpt-oss-120b": "mxfp4", "gpt-oss-20b": "mxfp4"}


def published_format(name: str) -> str:
    return PUBLISHED_FORMAT.get(name, "bf16")


def resolve_model(spec: str) -> tuple[str, ModelConfig, str]:
    """(label, config, source) for a preset name, a config.json path (giants or HF layout) or a model folder
    holding a config.json."""
    looks_like_path = spec.endswith(".json") or "/" in spec or "\\" in spec
    path = Path(spec)
    if path.is_dir() and not (spec in PRESETS and not looks_like_path):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"folder {spec!r} has no config.json")
        path = path / "config.json"
    if path.is_file() or looks_like_path:
        if not path.is_file():
            raise FileNotFoundError(f"config file {spec!r} not found")
        label = path.stem if path.name != "config.json" else path.resolve().parent.name or spec
        return label, ModelConfig.from_json(path), str(path)
    p = get_preset(spec)
    return p.name, p.config, p.source


def compare_record(label: str, cfg: ModelConfig, context: int = 8192, dtype: str = "bf16",
                   kv_dtype: str | None = None, source: str = "") -> dict:
    kv_dtype = kv_dtype or default_kv_dtype(dtype)
    dtype_bytes(kv_dtype)  # validate
    pc = count_params(cfg)
    rec = {
        "preset": label,
        "params_total": pc.total,
        "params_active": pc.active,
        "params_active_with_embedding": pc.active_with_embedding,
        "params_embedding": pc.embedding,
        "params_components": pc.components(),
        "flops_per_token_forward": forward_flops_per_token(cfg, context).total,
        "kv_cache_bytes": kv_cache_bytes(cfg, context, 1, kv_dtype),
        "weights_bytes": weight_bytes_all(cfg),
        "serving_bytes": serving_memory(cfg, context, 1, dtype, kv_dtype).total,
        "context": context,
        "dtype": dtype,
        "kv_dtype": kv_dtype,
        "layers": cfg.n_layers,
        "heads": f"{cfg.n_heads}/{cfg.n_kv_heads}",
        "experts": f"{cfg.experts_per_token}/{cfg.n_experts}" if cfg.is_moe else "dense",
        "max_context": cfg.max_context,
        "source": source,
    }
    if context > cfg.max_context:
        rec["note"] = f"context {context} is beyond the model's max_context {cfg.max_context}"
    return rec


def compare_records(specs: list[str] | None, context: int = 8192, dtype: str = "bf16",
                    kv_dtype: str | None = None) -> list[dict]:
    out = []
    for spec in specs or list(ARTICLE_PRESETS):
        label, cfg, source = resolve_model(spec)
        out.append(compare_record(label, cfg, context, dtype, kv_dtype, source))
    return out


def compare_columns(context: int, kv_dtype: str, dtype: str) -> list[Column]:
    return [
        Column("model", "preset"),
        Column("experts", "experts"),
        Column("q/kv heads", "heads"),
        Column("params", "params_total", human_count),
        Column("active", "params_active", human_count),
        Column("active+emb", "params_active_with_embedding", human_count),
        Column("embedding", "params_embedding", human_count),
        Column(f"fwd FLOPs/token @{context}", "flops_per_token_forward", human_flops),
        Column(f"KV @{context} ({kv_dtype})", "kv_cache_bytes", human_bytes),
        Column("bf16", "weights_bytes.bf16", human_bytes),
        Column("fp8", "weights_bytes.fp8", human_bytes),
        Column("int8", "weights_bytes.int8", human_bytes),
        Column("int4", "weights_bytes.int4", human_bytes),
        Column("mxfp4 (MLP only)", "weights_bytes.mxfp4", human_bytes),
        Column(f"serve 1 seq ({dtype})", "serving_bytes", human_bytes),
    ]
