"""Named configs as data. Each entry names its source; shared/docs/model-facts.md has the table."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from giants.config import ModelConfig


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    config: ModelConfig
    family: str  # for display and grouping only; behaviour never depends on it


_LLAMA = dict(activation="silu_glu", norm_kind="rmsnorm", norm_eps=1e-5, position="rope")
_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling="llama3", rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_context=8192)
_GEMMA2 = dict(activation="gelu_tanh_glu", norm_kind="rmsnorm_plus_one", norm_eps=1e-6, post_norms=True,
               attn_softcap=50.0, final_softcap=30.0, rope_theta=10000.0, tie_embeddings=True,
               max_context=8192, vocab_size=256000, bos_token_id=2, eos_token_id=1, pad_token_id=0)
_MIXTRAL = dict(activation="silu_glu", norm_eps=1e-5, rope_theta=1e6, n_experts=8, experts_per_token=2,
                router_softmax_before_topk=True, moe_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2)
_GPT_OSS = dict(vocab_size=201088, d_model=2880, ffn_dim=2880, n_heads=64, n_kv_heads=8, head_dim=64,
                max_context=131072, activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=7.0,
                mlp_bias=True, attn_qkv_bias=True, attn_out_bias=True, attn_sinks=True,
                layer_windows=(128, 0), rope_theta=150000.0, rope_scaling="yarn", rope_factor=32.0,
                rope_original_max_context=4096, yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_truncate=False,
                norm_eps=1e-5, experts_per_token=4, router_bias=True, router_softmax_before_topk=False,
                eos_token_id=200002, pad_token_id=199999)
_SMOLLM2_VOCAB = 49152

PRESETS: dict[str, Preset] = {}


def _add(name: str, family: str, source: str, **fields: object) -> None:
    PRESETS[name] = Preset(name, source, ModelConfig(**fields), family)  # type: ignore[arg-type]


# --- Llama 3 ---------------------------------------------------------------
_add("llama-3-70b", "llama", "meta-llama/Meta-Llama-3-70B config.json", **_LLAMA, vocab_size=128256,
     d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, ffn_dim=28672, max_context=8192,
     rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
_add("llama-3.1-8b", "llama", "meta-llama/Llama-3.1-8B config.json", **_LLAMA, **_LLAMA3_ROPE,
     rope_factor=8.0, vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
     ffn_dim=14336, max_context=131072, bos_token_id=128000, eos_token_id=128001)
_add("llama-3.2-1b", "llama", "meta-llama/Llama-3.2-1B config.json", **_LLAMA, **_LLAMA3_ROPE,
     rope_factor=32.0, vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
     ffn_dim=8192, max_context=131072, tie_embeddings=True, bos_token_id=128000, eos_token_id=128001)
_add("smollm2-135m", "llama", "HuggingFaceTB/SmolLM2-135M-Instruct config.json", **_LLAMA,
     vocab_size=_SMOLLM2_VOCAB, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
     max_context=8192, rope_theta=100000.0, tie_embeddings=True, bos_token_id=1, eos_token_id=2,
     pad_token_id=2)
# --- Gemma 2 ---------------------------------------------------------------
_add("gemma-2-27b", "gemma2", "google/gemma-2-27b config.json; Gemma 2 paper (arXiv 2408.00118)", **_GEMMA2,
     d_model=4608, n_layers=46, n_heads=32, n_kv_heads=16, head_dim=128, ffn_dim=36864, query_scale=144.0,
     layer_windows=(4096, 0), embed_scale=4608**0.5)
_add("gemma-2-9b", "gemma2", "google/gemma-2-9b config.json", **_GEMMA2, d_model=3584, n_layers=42,
     n_heads=16, n_kv_heads=8, head_dim=256, ffn_dim=14336, query_scale=256.0, layer_windows=(4096, 0),
     embed_scale=3584**0.5)
_add("gemma-2-2b", "gemma2", "google/gemma-2-2b config.json", **_GEMMA2, d_model=2304, n_layers=26,
     n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=9216, query_scale=256.0, layer_windows=(4096, 0),
     embed_scale=2304**0.5)
# --- Mixtral ---------------------------------------------------------------
_add("mixtral-8x22b", "mixtral", "mistralai/Mixtral-8x22B-v0.1 config.json", **_MIXTRAL, vocab_size=32000,
     d_model=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, ffn_dim=16384, max_context=65536)
_add("mixtral-8x7b", "mixtral", "mistralai/Mixtral-8x7B-v0.1 config.json", **_MIXTRAL, vocab_size=32000,
     d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336, max_context=32768)
# --- gpt-oss ---------------------------------------------------------------
_add("gpt-oss-120b", "gpt-oss", "openai/gpt-oss-120b config.json; gpt-oss model card (arXiv 2508.10925)",
     **_GPT_OSS, n_layers=36, n_experts=128)
_add("gpt-oss-20b", "gpt-oss", "openai/gpt-oss-20b config.json; gpt-oss model card (arXiv 2508.10925)",
     **_GPT_OSS, n_layers=24, n_experts=32)
# --- the article's description of GPT-OSS-120B ------------------------------
# Dense decoder, multi-head attention (no GQA), T5-style learned relative position bias instead of
# rotary, SwiGLU FFN 4 x d_model, RMSNorm pre-norm, the gpt-oss vocabulary. The article gives no
# dimensions; we chose d_model 10240 (80 heads of 128) and 70 layers, which lands at ~121.6B
# parameters: 16 * L * d^2 for attention + FFN, plus untied 201088 x 10240 embedding and head.
_add("gpt-oss-120b-described", "gpt-oss-described",
     "the comparison article's prose (dense ~120B, MHA, T5 relative bias, SwiGLU 4x, RMSNorm); "
     "dimensions chosen by giants", vocab_size=201088, d_model=10240, n_layers=70, n_heads=80,
     n_kv_heads=80, head_dim=128, ffn_dim=40960, max_context=131072, activation="silu_glu",
     norm_kind="rmsnorm", norm_eps=1e-5, position="t5_bias", rel_buckets=32, rel_max_distance=128,
     eos_token_id=200002)

# --- tiny twins: same code paths, CPU sized, SmolLM2 vocabulary so they train on real text ----
_TINY = dict(vocab_size=_SMOLLM2_VOCAB, d_model=64, head_dim=16, max_context=2048, bos_token_id=1,
             eos_token_id=2, pad_token_id=2)
_add("tiny-llama", "llama", "giants: Llama 3 shape (GQA, llama3 rope scaling) at width 64", **_TINY,
     **{**_LLAMA, **_LLAMA3_ROPE, "rope_original_max_context": 64}, rope_factor=8.0, n_layers=2, n_heads=4,
     n_kv_heads=2, ffn_dim=192)
_add("tiny-gemma2", "gemma2", "giants: Gemma 2 shape (soft-caps, alternating window 16, sandwich norms)",
     **{**_GEMMA2, **_TINY}, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=192, query_scale=24.0,
     layer_windows=(16, 0), embed_scale=8.0)
_add("tiny-mixtral", "mixtral", "giants: Mixtral shape (8 experts top-2, window 16) at width 64",
     **{**_MIXTRAL, **_TINY}, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, layer_windows=(16,))
_add("tiny-gpt-oss", "gpt-oss", "giants: gpt-oss shape (sinks, YaRN, clamped SwiGLU, 8 experts top-4)",
     **{**_GPT_OSS, **_TINY, "rope_original_max_context": 64, "layer_windows": (16, 0), "n_heads": 8,
        "n_kv_heads": 2, "ffn_dim": 64}, n_layers=2, n_experts=8)
_add("tiny-gpt-oss-described", "gpt-oss-described",
     "giants: the article's described GPT-OSS (MHA, T5 bias, SwiGLU 4x) at width 64", **_TINY,
     n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256, activation="silu_glu", norm_kind="rmsnorm",
     norm_eps=1e-5, position="t5_bias", rel_buckets=32, rel_max_distance=128)

ARTICLE_PRESETS = ("gpt-oss-120b", "llama-3-70b", "gemma-2-27b", "mixtral-8x22b", "gpt-oss-120b-described")
TINY_PRESETS = ("tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss", "tiny-gpt-oss-described")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} (known: {', '.join(PRESETS)})") from None


def get_config(name: str) -> ModelConfig:
    return get_preset(name).config
