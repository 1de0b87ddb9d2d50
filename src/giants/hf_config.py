"""HF config.json <-> ModelConfig, for model_type llama, gemma2, mixtral and gpt_oss.

Reads both the transformers 5 layout (`rope_parameters` holding `rope_theta`) and the older one
(`rope_theta` + `rope_scaling`). The HF family a ModelConfig exports to is decided by its fields.
"""

from __future__ import annotations

import math
from typing import Any

from giants.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "gemma2", "mixtral", "gpt_oss")


def _req(hf: dict[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"HF config ({hf.get('model_type')}): missing field {key!r}")
    return hf[key]


def _flag(hf: dict[str, Any], key: str, default: bool) -> bool:
    v = hf.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"HF config: {key} must be true or false, got {v!r}")
    return v


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_context=int(params["original_max_position_embeddings"]))
    elif kind == "yarn":
        out.update(rope_scaling="yarn", rope_factor=float(params["factor"]),
                   rope_original_max_context=int(params["original_max_position_embeddings"]),
                   yarn_beta_fast=float(params.get("beta_fast") or 32.0),
                   yarn_beta_slow=float(params.get("beta_slow") or 1.0),
                   yarn_truncate=bool(params.get("truncate", True)),
                   yarn_attention_factor=params.get("attention_factor"))
        if params.get("mscale") or params.get("mscale_all_dim"):
            m, mad, f = params.get("mscale") or 1, params.get("mscale_all_dim") or 0, out["rope_factor"]
            def g(s: float, m: float) -> float:
                return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
            if params.get("attention_factor") is None and m and mad:
                out["yarn_attention_factor"] = g(f, m) / g(f, mad)
    else:
        raise ValueError(f"HF config: unsupported rope_type {kind!r} (supported: default, llama3, yarn)")
    return out


def _windows(hf: dict[str, Any], n_layers: int) -> tuple[int, ...]:
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if not window:
        return ()
    if types:
        if len(types) != n_layers:
            raise ValueError(f"HF config: layer_types has {len(types)} entries, num_hidden_layers={n_layers}")
        return _shortest_pattern([int(window) if t == "sliding_attention" else 0 for t in types])
    return (int(window),)


def _shortest_pattern(ws: list[int]) -> tuple[int, ...]:
    """The shortest prefix that repeats to give `ws` (layer_windows cycle): its length is the sequence's
    smallest period, len - the longest proper border (KMP prefix function), found in linear time so a long
    `layer_types` in an untrusted config.json cannot stall the reader."""
    if not ws:
        return ()
    border = [0] * len(ws)
    k = 0
    for i in range(1, len(ws)):
        while k and ws[i] != ws[k]:
            k = border[k - 1]
        if ws[i] == ws[k]:
            k += 1
        border[i] = k
    return tuple(ws[:len(ws) - border[-1]])


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"HF config: unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    d_model = int(_req(hf, "hidden_size"))
    n_heads = int(_req(hf, "num_attention_heads"))
    n_layers = int(_req(hf, "num_hidden_layers"))
    common: dict[str, Any] = dict(
        vocab_size=int(_req(hf, "vocab_size")), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        ffn_dim=int(_req(hf, "intermediate_size")),
        max_context=int(_req(hf, "max_position_embeddings")),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=_flag(hf, "tie_word_embeddings", mt == "gemma2"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), init_std=float(hf.get("initializer_range", 0.02)),
        **_rope(hf),
    )
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if mt in ("llama", "mixtral"):
        if act != "silu":
            raise ValueError(f"HF config ({mt}): unsupported hidden_act {act!r}")
        common.update(attn_qkv_bias=_flag(hf, "attention_bias", False),
                      attn_out_bias=_flag(hf, "attention_bias", False),
                      mlp_bias=_flag(hf, "mlp_bias", False),
                      layer_windows=_windows(hf, n_layers))
    if mt == "mixtral":
        common.update(n_experts=int(_req(hf, "num_local_experts")),
                      experts_per_token=int(_req(hf, "num_experts_per_tok")),
                      moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)),
                      router_softmax_before_topk=True, router_renormalize=True)
    elif mt == "gemma2":
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"HF config (gemma2): unsupported hidden_activation {act!r}")
        common.update(activation="gelu_tanh_glu", norm_kind="rmsnorm_plus_one", post_norms=True,
                      attn_qkv_bias=_flag(hf, "attention_bias", False),
                      attn_out_bias=_flag(hf, "attention_bias", False),
                      layer_windows=_windows(hf, n_layers),
                      attn_softcap=hf.get("attn_logit_softcapping"),
                      final_softcap=hf.get("final_logit_softcapping"),
                      query_scale=float(hf.get("query_pre_attn_scalar", 256)),
                      embed_scale=float(d_model) ** 0.5)
    elif mt == "gpt_oss":
        common.update(activation="clamped_swiglu", swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                      swiglu_limit=float(hf.get("swiglu_limit", 7.0)), mlp_bias=True,
                      attn_qkv_bias=_flag(hf, "attention_bias", True),
                      attn_out_bias=_flag(hf, "attention_bias", True),
                      attn_sinks=True, layer_windows=_windows(hf, n_layers),
                      n_experts=int(_req(hf, "num_local_experts")),
                      experts_per_token=int(_req(hf, "num_experts_per_tok")),
                      router_bias=True, router_softmax_before_topk=False,
                      moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))
    return ModelConfig(**common)


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF family able to express `cfg`, decided by its fields; ValueError if none can."""
    if cfg.position != "rope":
        raise ValueError(f"ModelConfig.position={cfg.position!r}: no transformers family expresses it "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)} all use rope)")
    if cfg.attn_sinks or cfg.activation == "clamped_swiglu":
        return "gpt_oss"
    if cfg.post_norms or cfg.activation == "gelu_tanh_glu":
        return "gemma2"
    if cfg.is_moe:
        return "mixtral"
    return "llama"


def _layer_types(cfg: ModelConfig) -> tuple[int | None, list[str]]:
    ws = cfg.windows
    sizes = {w for w in ws if w}
    if len(sizes) > 1:
        raise ValueError(f"ModelConfig.layer_windows: HF configs hold one sliding window size, got {sorted(sizes)}")
    window = sizes.pop() if sizes else None
    return window, ["sliding_attention" if w else "full_attention" for w in ws]


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    p: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling == "llama3":
        p.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                 high_freq_factor=cfg.rope_high_freq_factor,
                 original_max_position_embeddings=cfg.rope_original_max_context)
    elif cfg.rope_scaling == "yarn":
        p.update(rope_type="yarn", factor=cfg.rope_factor, beta_fast=cfg.yarn_beta_fast,
                 beta_slow=cfg.yarn_beta_slow, truncate=cfg.yarn_truncate,
                 original_max_position_embeddings=cfg.rope_original_max_context)
        if cfg.yarn_attention_factor is not None:
            p["attention_factor"] = cfg.yarn_attention_factor
    return p


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _unexpressible(cfg: ModelConfig, mt: str) -> list[str]:
    """Fields set to values the target HF family has no way to express."""
    gemma = mt == "gemma2"
    want = {
        "activation": {"llama": "silu_glu", "mixtral": "silu_glu", "gemma2": "gelu_tanh_glu",
                       "gpt_oss": "clamped_swiglu"}[mt],
        "norm_kind": "rmsnorm_plus_one" if gemma else "rmsnorm",
        "post_norms": gemma,
        "embed_scale": float(cfg.d_model) ** 0.5 if gemma else None,
    }
    out = [f"{k}={getattr(cfg, k)!r} (HF {mt} needs {v!r})" for k, v in want.items()
           if (getattr(cfg, k) != v if not isinstance(v, float) else abs((getattr(cfg, k) or 0) - v) > 1e-6)]
    if not gemma:
        out += [f"{k}={getattr(cfg, k)!r} (HF {mt} has none)" for k in ("attn_softcap", "final_softcap")
                if getattr(cfg, k) is not None]
        if cfg.query_scale not in (None, float(cfg.head_dim)):
            out.append(f"query_scale={cfg.query_scale!r} (HF {mt} scales by head_dim)")
    return out


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    mt = hf_model_type(cfg)
    hf: dict[str, Any] = dict(
        model_type=mt, architectures=[{"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                                       "mixtral": "MixtralForCausalLM", "gpt_oss": "GptOssForCausalLM"}[mt]],
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_context, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=_rope_to_hf(cfg),
        rope_theta=cfg.rope_theta, initializer_range=cfg.init_std,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        attention_dropout=0.0, use_cache=True,
    )
    window, types = _layer_types(cfg)
    mismatch = _unexpressible(cfg, mt)
    if mt in ("llama", "mixtral"):
        if cfg.attn_qkv_bias != cfg.attn_out_bias:
            mismatch.append("attn_qkv_bias/attn_out_bias must be equal")
        hf.update(hidden_act="silu", attention_bias=cfg.attn_qkv_bias)
        if mt == "llama":
            hf["mlp_bias"] = cfg.mlp_bias
            if window:
                mismatch.append("layer_windows (llama has no sliding window)")
        else:
            if len(set(cfg.windows)) > 1:
                mismatch.append("layer_windows (mixtral applies one window to every layer)")
            hf.update(sliding_window=window, num_local_experts=cfg.n_experts,
                      num_experts_per_tok=cfg.experts_per_token,
                      router_aux_loss_coef=cfg.moe_aux_loss_coef)
            if cfg.router_bias or cfg.mlp_bias or not cfg.router_softmax_before_topk:
                mismatch.append("router_bias/mlp_bias/router_softmax_before_topk")
    elif mt == "gemma2":
        hf.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                  attention_bias=cfg.attn_qkv_bias,
                  query_pre_attn_scalar=_int_if_whole(cfg.query_scale or cfg.head_dim),
                  sliding_window=window or cfg.max_context, layer_types=types,
                  attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
        if cfg.is_moe or cfg.norm_kind != "rmsnorm_plus_one":
            mismatch.append("n_experts/norm_kind")
    elif mt == "gpt_oss":
        hf.update(hidden_act="silu", attention_bias=cfg.attn_qkv_bias, sliding_window=window or cfg.max_context,
                  layer_types=types, num_local_experts=cfg.n_experts,
                  num_experts_per_tok=cfg.experts_per_token, swiglu_alpha=cfg.swiglu_alpha,
                  swiglu_limit=cfg.swiglu_limit, router_aux_loss_coef=cfg.moe_aux_loss_coef)
        if not (cfg.is_moe and cfg.attn_sinks and cfg.mlp_bias and cfg.router_bias):
            mismatch.append("gpt_oss needs n_experts>0, attn_sinks, mlp_bias and router_bias")
    if mismatch:
        raise ValueError(f"ModelConfig cannot be written as HF {mt}: {'; '.join(mismatch)}")
    return hf
