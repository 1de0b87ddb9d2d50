"""Weight bytes, serving and training memory, GPU table, fits, roofline and the claims."""

from __future__ import annotations

import math

import pytest

from giants.analysis import claims as claims_mod
from giants.analysis.claims import check_claims
from giants.analysis.hardware import GPUS, get_gpu, parse_budget
from giants.analysis.memory import (
    GIB,
    WEIGHT_FORMATS,
    kv_cache_bytes,
    mlp_weight_bytes,
    serving_memory,
    training_memory,
    weight_bytes,
    weight_bytes_breakdown,
)
from giants.analysis.params import count_params
from giants.analysis.perf import FitError, decode, expected_experts_touched, fit, tp_candidates, training_gpu_days
from giants.config import ModelConfig
from giants.presets import get_config

H100 = GPUS["h100-80gb"]


# ---- weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,gib", [("gpt-oss-120b", 60.8), ("gpt-oss-20b", 12.8)])
def test_mxfp4_matches_gpt_oss_checkpoint_size(name, gib):
    # gpt-oss model card (arXiv:2508.10925), Table 1 "Checkpoint Size": 60.8 GiB (120b), 12.8 GiB (20b):
    # MXFP4 experts (4-bit values + one e8m0 scale per 32), everything else bf16.
    assert round(weight_bytes(get_config(name), "mxfp4") / GIB, 1) == gib


def test_gpt_oss_experts_are_over_90_percent():
    # Model card: "MoE weights ... account for over 90% of the total parameter count".
    for name in ("gpt-oss-120b", "gpt-oss-20b"):
        pc = count_params(get_config(name))
        assert pc.mlp / pc.total > 0.9


def test_format_arithmetic_on_a_toy_model():
    D, F, V, L = 256, 512, 1000, 2
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=4, head_dim=64, ffn_dim=F,
                      max_context=64)
    total = count_params(cfg).total
    attn = L * 4 * D * D
    mlp = L * 3 * D * F
    rows = L * (4 * D + 2 * F + D)  # output rows: q, k, v, o, gate, up, down
    assert weight_bytes(cfg, "bf16") == 2 * total
    assert weight_bytes(cfg, "int8") == (attn + mlp) + 2 * rows + 2 * (total - attn - mlp)
    assert weight_bytes(cfg, "fp8") == weight_bytes(cfg, "int8")
    groups = L * (4 * D * (D // 128) + 2 * F * (D // 128) + D * (F // 128))
    assert weight_bytes(cfg, "int4") == (attn + mlp) // 2 + 2 * groups + 2 * (total - attn - mlp)
    assert weight_bytes(cfg, "mxfp4") == mlp // 2 + mlp // 32 + 2 * (total - mlp)  # 4.25 bits on the MLP only
    assert weight_bytes(cfg, "mxfp4") - 2 * (total - mlp) == mlp_weight_bytes(cfg, "mxfp4")
    b = weight_bytes_breakdown(cfg, "int4")
    assert b.total == weight_bytes(cfg, "int4") and b.quantized_params == attn + mlp


def test_weight_format_errors():
    with pytest.raises(ValueError, match="mxfp8"):
        weight_bytes(get_config("tiny-llama"), "mxfp8")


# ---- serving memory ------------------------------------------------------------------------------

def test_serving_memory_shards_over_tensor_parallel():
    cfg = get_config("llama-3-70b")  # 8 KV heads
    one = serving_memory(cfg, 8192, 4)
    two = serving_memory(cfg, 8192, 4, tp=2)
    assert two.weights == math.ceil(one.weights / 2) and two.kv_cache == one.kv_cache // 2
    sixteen = serving_memory(cfg, 8192, 4, tp=16)  # more GPUs than KV heads: one head replicated each
    assert sixteen.kv_cache == one.kv_cache // 8
    assert one.total == one.weights + one.kv_cache + one.workspace
    assert serving_memory(cfg, 8192, 1, "int4").kv_cache == kv_cache_bytes(cfg, 8192, 1, "bf16")
    assert serving_memory(cfg, 8192, 1, "fp8").kv_cache == kv_cache_bytes(cfg, 8192, 1, "fp8")


# ---- training memory -----------------------------------------------------------------------------

@pytest.mark.parametrize("stage,expected", [(0, lambda n, d: 16 * n), (1, lambda n, d: 4 * n + 12 * n / d),
                                            (2, lambda n, d: 2 * n + 14 * n / d), (3, lambda n, d: 16 * n / d)])
def test_zero_stages_follow_the_zero_paper(stage, expected):
    # ZeRO (Rajbhandari et al., SC'20, arXiv:1910.02054), Figure 1: mixed-precision Adam keeps 16 bytes per
    # parameter: stage 1 = 4N + 12N/d, stage 2 = 2N + 14N/d, stage 3 = 16N/d.
    cfg = get_config("llama-3.1-8b")
    n, d = count_params(cfg).total, 8
    m = training_memory(cfg, zero_stage=stage, dp=d)
    assert abs((m.params + m.grads + m.optimizer) - expected(n, d)) <= 3


def test_checkpointing_and_tp_cut_activations():
    cfg = get_config("llama-3-70b")
    full = training_memory(cfg, checkpointing=False, seq_len=4096)
    ckpt = training_memory(cfg, checkpointing=True, seq_len=4096)
    assert ckpt.activations < full.activations / 10
    assert training_memory(cfg, checkpointing=False, tp=8).activations < full.activations
    assert training_memory(cfg, micro_batch=2).activations == 2 * ckpt.activations
    with pytest.raises(ValueError, match="zero_stage"):
        training_memory(cfg, zero_stage=4)


def test_training_gpu_days_scale():
    cfg = get_config("llama-3-70b")
    d = training_gpu_days(cfg, H100, 1e12, 0.4)
    assert training_gpu_days(cfg, H100, 2e12, 0.4) == pytest.approx(2 * d)
    assert training_gpu_days(cfg, H100, 1e12, 0.2) == pytest.approx(2 * d)
    # 6 x params per token is the floor (attention adds on top).
    floor = 1e12 * 6 * count_params(cfg).active / (0.4 * H100.bf16_flops) / 86400
    assert floor < d < 1.2 * floor
    with pytest.raises(ValueError, match="mfu"):
        training_gpu_days(cfg, H100, 1e12, 0)


# ---- GPUs, fit, roofline -------------------------------------------------------------------------

def test_gpu_table_is_complete_and_sourced():
    for name in ("h100-80gb", "h200-141gb", "a100-80gb", "a100-40gb", "l40s-48gb", "rtx-4090-24gb", "mi300x-192gb"):
        g = GPUS[name]
        assert g.memory_bytes > 0 and g.bandwidth > 0 and g.bf16_flops > 0
        assert "datasheet" in g.source.lower() or "whitepaper" in g.source.lower()
    assert get_gpu("H100").name == "h100-80gb" and get_gpu("mi300x").memory_bytes == 192 * 10**9
    assert GPUS["a100-80gb"].peak_flops("fp8") == GPUS["a100-80gb"].bf16_flops  # no fp8 tensor cores
    with pytest.raises(ValueError, match="known: h100-80gb"):
        get_gpu("tpu-v5")
    assert parse_budget("2x a100-80gb") == (2, GPUS["a100-80gb"])
    assert parse_budget("8 x H100") == (8, GPUS["h100-80gb"])
    assert parse_budget("l40s") == (1, GPUS["l40s-48gb"])


def test_fit_is_minimal_and_within_memory():
    for name in ("llama-3-70b", "gemma-2-27b", "mixtral-8x22b", "gpt-oss-120b", "llama-3.1-8b"):
        cfg = get_config(name)
        for g in GPUS.values():
            try:
                f = fit(cfg, g, 8192, 1, "bf16")
            except FitError:
                continue
            assert f.memory.total <= g.memory_bytes
            smaller = [n for n in tp_candidates(cfg) if n < f.gpus]
            assert all(serving_memory(cfg, 8192, 1, "bf16", tp=n).total > g.memory_bytes for n in smaller)


def test_fit_known_answers():
    assert fit(get_config("gpt-oss-120b"), H100, 131072, 1, "mxfp4").gpus == 1
    assert fit(get_config("gpt-oss-120b"), H100, 8192, 1, "bf16").gpus == 4
    assert fit(get_config("llama-3-70b"), H100, 8192, 1, "bf16").gpus == 2
    assert fit(get_config("gemma-2-27b"), GPUS["a100-80gb"], 8192, 1, "bf16").gpus == 1
    with pytest.raises(FitError, match="one node"):
        fit(get_config("mixtral-8x22b"), GPUS["rtx-4090-24gb"], 8192, 1, "bf16")
    with pytest.raises(ValueError, match="max_context"):
        fit(get_config("llama-3-70b"), H100, 100_000)


def test_roofline_decode():
    cfg = get_config("llama-3-70b")
    d1 = decode(cfg, H100, 2, 8192, 1)
    assert d1.bound == "memory"
    assert d1.tokens_per_s < 2 * H100.bandwidth / weight_bytes(cfg, "bf16")
    d64 = decode(cfg, H100, 2, 8192, 64)
    assert d64.tokens_per_s > 10 * d1.tokens_per_s and d64.tokens_per_s_per_seq < d1.tokens_per_s_per_seq
    assert decode(cfg, H100, 2, 512, 4096).bound == "compute"
    moe = get_config("gpt-oss-120b")
    assert expected_experts_touched(moe, 1) == pytest.approx(4)
    assert expected_experts_touched(moe, 10_000) == pytest.approx(128)
    # MoE decode at batch 1 reads only 4 of 128 experts: far faster than reading every weight.
    assert decode(moe, H100, 1, 8192, 1, "mxfp4").tokens_per_s > 5 * H100.bandwidth / weight_bytes(moe, "mxfp4")


def test_decode_reads_embedding_rows_not_the_table():
    """An untied input embedding is a lookup: a step reads one row per sequence, not the whole table; a tied
    table is read in full anyway, as the output head."""
    cfg = get_config("llama-3-70b")  # untied, dense, bf16: bytes = weights - table + rows + KV
    V, D = cfg.vocab_size, cfg.d_model
    for batch in (1, 8):
        d = decode(cfg, H100, 2, 8192, batch)
        expected = weight_bytes(cfg) - 2 * V * D + 2 * batch * D + kv_cache_bytes(cfg, 8192, batch)
        assert d.bytes_per_step == pytest.approx(expected, rel=1e-12)
    tied = get_config("gemma-2-27b")
    d = decode(tied, H100, 1, 8192, 1)
    assert d.bytes_per_step == pytest.approx(weight_bytes(tied) + kv_cache_bytes(tied, 8192), rel=1e-12)
    # gpt-oss-120b at batch 1: attention + router + head + 4 of 128 experts + KV, no input table
    moe = get_config("gpt-oss-120b")
    pc = count_params(moe)
    mlp = mlp_weight_bytes(moe, "mxfp4")
    d = decode(moe, H100, 1, 8192, 1, "mxfp4")
    expected = (weight_bytes(moe, "mxfp4") - mlp - 2 * pc.embedding + 2 * moe.d_model + mlp * 4 / 128
                + kv_cache_bytes(moe, 8192))
    assert d.bytes_per_step == pytest.approx(expected, rel=1e-9)


def test_fit_error_states_the_real_limit():
    """Tensor parallelism only uses 1, 2, 4 or 8 GPUs: a budget of 3 or 16 must not promise 3 or 16."""
    mix = get_config("mixtral-8x22b")
    with pytest.raises(FitError) as e:
        fit(mix, GPUS["l40s-48gb"], 8192, 1, "bf16", max_gpus=3)
    msg = str(e.value)
    assert "the 3 GPU(s) given" in msg and "the limit is 2 (tensor parallelism over 1, 2, 4 or 8" in msg
    with pytest.raises(FitError) as e:
        fit(mix, GPUS["rtx-4090-24gb"], 8192, 1, "bf16", max_gpus=16)
    msg = str(e.value)
    assert "does not fit one node" in msg and "at least 14 x" in msg and "the limit is 8 (" in msg
    assert "limit is 16" not in msg
    with pytest.raises(FitError, match=r"the limit is 8; try"):  # the plain one-node case stays short
        fit(mix, GPUS["rtx-4090-24gb"], 8192, 1, "bf16")
    with pytest.raises(ValueError, match="max_gpus"):
        fit(mix, H100, 8192, max_gpus=0)


# ---- claims --------------------------------------------------------------------------------------

EXPECTED = {  # /work/shared/docs/model-facts.md, "The article's claims, checked"
    "gpt-oss-dense": "false", "gpt-oss-t5-bias": "false", "gpt-oss-swiglu-rmsnorm": "true", "llama-gqa": "true",
    "gemma-mha": "false", "mixtral-params": "true", "mixtral-top2": "true", "mixtral-22b-experts": "misleading",
    "gpt-oss-8xh100": "false", "gemma-1xa100": "true",
}


def test_claims_verdicts():
    got = {c.id: c for c in check_claims()}
    assert {k: c.verdict for k, c in got.items()} == EXPECTED
    assert "8x smaller" in got["llama-gqa"].evidence
    assert "1 x H100" in got["gpt-oss-8xh100"].evidence


def test_claims_are_computed_not_written(monkeypatch):
    """Change the configs and the verdicts follow."""
    real = claims_mod.get_config

    def fake(name: str):
        cfg = real(name)
        if name == "gemma-2-27b":
            return cfg.replace(n_kv_heads=cfg.n_heads, d_model=16384)  # MHA and far too big for one A100
        if name == "gpt-oss-120b":
            # dense, T5 bias, and 8x deeper: even MXFP4 needs a full node
            return cfg.replace(n_experts=0, experts_per_token=0, position="t5_bias", rope_scaling="none",
                               n_layers=8 * cfg.n_layers, ffn_dim=cfg.ffn_dim * cfg.n_experts)
        return cfg

    monkeypatch.setattr(claims_mod, "get_config", fake)
    got = {c.id: c.verdict for c in check_claims()}
    assert got["gemma-mha"] == "true" and got["gemma-1xa100"] == "false"
    assert got["gpt-oss-t5-bias"] == "true" and got["gpt-oss-8xh100"] == "true"


def test_every_format_has_bytes():
    cfg = get_config("mixtral-8x7b")
    sizes = {f: weight_bytes(cfg, f) for f in WEIGHT_FORMATS}
    assert sizes["bf16"] > sizes["fp8"] > sizes["mxfp4"] > sizes["int4"]
