"""Core: config validation, presets, unusual ops against reference formulas, meta construction."""

from __future__ import annotations

import math
import time

import pytest
import torch

from giants import ModelConfig, build, get_config
from giants.model.attention import attend
from giants.model.mlp import gated_activation
from giants.model.positions import RelativeBias, rope_inv_freq, t5_relative_bucket
from giants.presets import PRESETS, TINY_PRESETS

from conftest import ALL_TINY

REAL_HF_PRESETS = [n for n, p in PRESETS.items() if not n.startswith("tiny") and p.config.position == "rope"]


# ---- T5 relative position buckets --------------------------------------------------------
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (16, 64), (8, 20)])
def test_t5_bucket_equals_transformers(buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    q = torch.arange(0, 600)[:, None]
    k = torch.arange(0, 600)[None, :]
    rel = k - q  # memory - query, as T5 computes it
    ref = T5Attention._relative_position_bucket(rel, bidirectional=False, num_buckets=buckets,
                                                max_distance=max_distance)
    assert torch.equal(t5_relative_bucket(rel, buckets, max_distance), ref)


def test_described_preset_forward_backward():
    cfg = get_config("tiny-gpt-oss-described")
    model = build(cfg, seed=0)
    with torch.no_grad():
        model.rel_bias.weight.normal_()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert model.rel_bias.weight.grad is not None and model.rel_bias.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())
    # the relative bias really changes attention: zeroing it changes the logits
    with torch.no_grad():
        before = model(ids)
        model.rel_bias.weight.zero_()
        assert (model(ids) - before).abs().max() > 1e-4


def test_relative_bias_shape_and_sharing():
    cfg = get_config("tiny-gpt-oss-described")
    bias = RelativeBias(cfg)
    out = bias(torch.arange(5)[None], torch.arange(7)[None])
    assert out.shape == (1, cfg.n_heads, 5, 7)
    model = build(cfg)
    assert [n for n, _ in model.named_parameters() if "rel_bias" in n] == ["rel_bias.weight"]


# ---- parameter counts against transformers on the meta device ------------------------------
@pytest.mark.parametrize("name", REAL_HF_PRESETS)
def test_param_count_equals_transformers_meta(name):
    import transformers

    cfg = get_config(name)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    ours = build(cfg, device="meta")
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf


def test_meta_construction_is_fast_and_allocates_nothing():
    for name in ("gpt-oss-120b", "gpt-oss-120b-described", "mixtral-8x22b", "llama-3-70b"):
        t = time.perf_counter()
        model = build(get_config(name), device="meta")
        assert time.perf_counter() - t < 10
        assert all(p.is_meta for p in model.parameters())


def test_described_preset_is_about_120b_dense_mha():
    cfg = get_config("gpt-oss-120b-described")
    n = sum(p.numel() for p in build(cfg, device="meta").parameters())
    assert 115e9 < n < 125e9
    assert cfg.n_kv_heads == cfg.n_heads and not cfg.is_moe and cfg.position == "t5_bias"
    assert cfg.ffn_dim == 4 * cfg.d_model and cfg.vocab_size == 201088 and cfg.activation == "silu_glu"


def test_every_preset_names_its_source_and_tiny_twins_fit_the_brief():
    for p in PRESETS.values():
        assert p.source
    for name in TINY_PRESETS:
        c = get_config(name)
        assert 2 <= c.n_layers <= 4 and c.d_model <= 64 and c.vocab_size == 49152
        if c.is_moe:
            assert c.n_experts >= 4


# ---- unusual ops against reference formulas, gradients included ---------------------------
def _grads(fn, *xs):
    xs = [x.clone().double().requires_grad_(True) for x in xs]
    y = fn(*xs)
    (g,) = torch.autograd.grad(y.sum(), xs[:1])
    return y, g


def test_clamped_swiglu_reference_with_grad():
    cfg = get_config("tiny-gpt-oss")
    gate = torch.linspace(-10, 10, 101).repeat(3, 1)
    up = torch.linspace(-9, 11, 101).flip(0).repeat(3, 1)

    def ref(g, u):
        g = torch.where(g > 7.0, torch.full_like(g, 7.0), g)
        u = torch.where(u > 7.0, torch.full_like(u, 7.0), torch.where(u < -7.0, torch.full_like(u, -7.0), u))
        return g * (1 / (1 + torch.exp(-1.702 * g))) * (u + 1)

    y, gy = _grads(lambda g, u: gated_activation(g, u, cfg), gate, up)
    r, gr = _grads(ref, gate, up)
    assert torch.allclose(y, r, atol=1e-12) and torch.allclose(gy, gr, atol=1e-12)
    # clamped region has zero gradient through the gate
    assert (gy[:, gate[0] > 7.0] == 0).all()


def test_softcap_and_sinks_reference_with_grad():
    B, H, Hkv, T, D = 2, 4, 2, 6, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    sinks = torch.randn(H)
    cap, scale = 5.0, D ** -0.5

    def ref(q, k, v, sinks):
        kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        s = (q @ kk.transpose(-1, -2)) * scale
        s = cap * torch.tanh(s / cap)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True))
        sink = torch.exp(sinks.view(1, H, 1, 1) - s.amax(-1, keepdim=True))
        p = e / (e.sum(-1, keepdim=True) + sink)
        return p @ vv

    xs = [t.double().requires_grad_(True) for t in (q, k, v, sinks)]
    ys = [t.double().requires_grad_(True) for t in (q, k, v, sinks)]
    out = attend(*xs[:3], None, scale=scale, softcap=cap, sinks=xs[3])
    expect = ref(*ys)
    assert torch.allclose(out, expect, atol=1e-10)
    out.square().sum().backward()
    expect.square().sum().backward()
    for a, b in zip(xs, ys):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


def test_final_softcap_bounds_logits():
    cfg = get_config("tiny-gemma2")
    model = build(cfg, seed=0)
    with torch.no_grad():
        model.embed.weight.mul_(1000)
        logits = model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert logits.abs().max() <= cfg.final_softcap + 1e-4


def test_yarn_reference_formula():
    cfg = get_config("gpt-oss-20b")
    inv, attn_factor = rope_inv_freq(cfg)
    d, base, factor, orig = cfg.head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_context
    # YaRN paper, eq. for the ramp; gpt-oss keeps the un-truncated correction range
    lo = d * math.log(orig / (32 * 2 * math.pi)) / (2 * math.log(base))
    hi = d * math.log(orig / (1 * 2 * math.pi)) / (2 * math.log(base))
    expect = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        expect.append(theta / factor * ramp + theta * (1 - ramp))
    assert torch.allclose(inv.double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-5)
    assert attn_factor == pytest.approx(0.1 * math.log(32) + 1)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "gpt-oss-20b", "gemma-2-2b"])
def test_rope_frequencies_equal_transformers(name):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = get_config(name)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    kind = hf_cfg.rope_parameters["rope_type"]
    if kind == "default":
        ref = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        factor = 1.0
    else:
        ref, factor = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    inv, scale = rope_inv_freq(cfg)
    assert torch.allclose(inv, ref.float(), rtol=1e-6) and scale == pytest.approx(factor)


def test_yarn_grad_flows_through_rotary():
    cfg = get_config("tiny-gpt-oss")
    model = build(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    model(ids).sum().backward()
    assert model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0


# ---- MoE ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-gpt-oss"])
def test_moe_equals_dense_per_token_reference(name):
    cfg = get_config(name)
    moe = build(cfg, seed=0).layers[0].mlp
    with torch.no_grad():
        for p in (moe.b_gate, moe.b_up, moe.b_down):
            if p is not None:
                p.normal_()
    x = torch.randn(3, 5, cfg.d_model)
    out, logits = moe(x)
    flat = x.reshape(-1, cfg.d_model)
    _, w, idx = moe.route(flat)
    ref = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for j in range(cfg.experts_per_token):
            e = idx[n, j]
            g = moe.w_gate[e] @ flat[n] + (moe.b_gate[e] if moe.b_gate is not None else 0)
            u = moe.w_up[e] @ flat[n] + (moe.b_up[e] if moe.b_up is not None else 0)
            y = moe.w_down[e] @ gated_activation(g, u, cfg) + (moe.b_down[e] if moe.b_down is not None else 0)
            ref[n] += w[n, j] * y
    assert logits.shape == (15, cfg.n_experts)
    assert torch.allclose(out.reshape(-1, cfg.d_model), ref, atol=1e-5)
    out.sum().backward()
    assert moe.w_gate.grad is not None and moe.router.weight.grad is not None


def test_router_logits_exposed_for_training():
    cfg = get_config("tiny-mixtral")
    model = build(cfg, seed=0)
    logits, router = model(torch.randint(0, cfg.vocab_size, (2, 9)), output_router_logits=True)
    assert len(router) == cfg.n_layers and router[0].shape == (18, cfg.n_experts)


# ---- bad input -----------------------------------------------------------------------------
BASE = dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
            max_context=128)


@pytest.mark.parametrize("change,field", [
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=0), "d_model"),
    (dict(n_layers=-1), "n_layers"),
    (dict(activation="relu"), "activation"),
    (dict(layer_windows=(256,)), "layer_windows"),
    (dict(norm_kind="batchnorm"), "norm_kind"),
    (dict(position="alibi"), "position"),
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(n_experts=4, experts_per_token=5), "experts_per_token"),
    (dict(experts_per_token=2), "experts_per_token"),
    (dict(head_dim=7), "head_dim"),
    (dict(attn_softcap=-1.0), "attn_softcap"),
    (dict(layer_windows=(4, 0, 4)), "layer_windows"),
])
def test_invalid_config_names_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**BASE, **change})


def test_from_hf_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match="llama, gemma2, mixtral, gpt_oss"):
        ModelConfig.from_hf({"model_type": "bert"})


def test_from_hf_missing_field_named():
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10})


def test_unknown_preset_suggests():
    with pytest.raises(ValueError, match="did you mean.*llama-3-70b"):
        get_config("llama-3-70")


@pytest.mark.parametrize("name", ALL_TINY)
def test_bad_tokens_and_long_sequences(name):
    cfg = get_config(name).replace(max_context=32)
    model = build(cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, cfg.vocab_size]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_context"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="max_context"):
        model.make_cache(1, 64)


def test_config_json_round_trip(tmp_path):
    import json

    for name in PRESETS:
        cfg = get_config(name)
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(cfg.to_dict()))
        assert ModelConfig.from_json(p) == cfg


def test_to_hf_refuses_what_the_family_cannot_express():
    cfg = get_config("tiny-llama")
    with pytest.raises(ValueError, match="attn_softcap"):
        cfg.replace(attn_softcap=30.0).to_hf()
    with pytest.raises(ValueError, match="norm_kind"):
        cfg.replace(norm_kind="layernorm").to_hf()
    with pytest.raises(ValueError, match="position"):
        get_config("tiny-gpt-oss-described").to_hf()


def test_from_hf_flags_must_be_booleans():
    hf = get_config("tiny-llama").to_hf()
    hf["tie_word_embeddings"] = "yes"
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        ModelConfig.from_hf(hf)
    with pytest.raises(ValueError, match="tie_embeddings"):
        get_config("tiny-llama").replace(tie_embeddings=1).validate()
