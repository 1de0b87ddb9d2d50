"""The parity test can see every feature: on the weights it compares with transformers (hf_utils' parity regime),
switching any one feature of a family off (config.replace, same weights) moves the logits by more than 100 x the
parity tolerance. A feature that barely moved them (Gemma 2's attention soft-cap at the plain init: 7e-6 against a
1e-4 tolerance) would pass parity whether implemented or not."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from giants import ModelConfig, Transformer, build, get_config
from giants.checkpoint.hf_map import hf_to_giants

from hf_utils import (
    MLP_SCALE,
    PARITY_ATOL,
    QK_SCALE,
    hf_model_from_config,
    load_hf_safetensors,
    parity_weights,
    save_hf,
)

MARGIN = 100 * PARITY_ATOL  # 1e-2
T = 40  # as the parity test: longer than the 16-token windows, within the 64-token original rope context

# (family, feature, switched off, parameters the switched-off model does not have)
FEATURES = [
    ("tiny-gemma2", "attention soft-cap", dict(attn_softcap=None), None),
    ("tiny-gemma2", "final soft-cap", dict(final_softcap=None), None),
    ("tiny-gemma2", "sliding windows", dict(layer_windows=()), None),
    ("tiny-gemma2", "sandwich (post) norms", dict(post_norms=False), r"attn_post_norm|mlp_post_norm"),
    ("tiny-gemma2", "embed_scale", dict(embed_scale=None), None),
    ("tiny-gemma2", "rmsnorm_plus_one", dict(norm_kind="rmsnorm"), None),
    ("tiny-gemma2", "query_scale", dict(query_scale=None), None),
    ("tiny-gemma2", "GELU-tanh GLU", dict(activation="silu_glu"), None),
    ("tiny-llama", "llama3 rope scaling", dict(rope_scaling="none"), None),
    ("tiny-mixtral", "sliding window", dict(layer_windows=()), None),
    ("tiny-mixtral", "router renormalisation", dict(router_renormalize=False), None),
    ("tiny-gpt-oss", "sinks", dict(attn_sinks=False), r"attn\.sinks"),
    ("tiny-gpt-oss", "qkv biases", dict(attn_qkv_bias=False), r"attn\.[qkv]_proj\.bias"),
    ("tiny-gpt-oss", "out bias", dict(attn_out_bias=False), r"attn\.o_proj\.bias"),
    ("tiny-gpt-oss", "expert (mlp) biases", dict(mlp_bias=False), r"mlp\.b_(gate|up|down)"),
    ("tiny-gpt-oss", "router bias", dict(router_bias=False), r"mlp\.router\.bias"),
    ("tiny-gpt-oss", "YaRN", dict(rope_scaling="none"), None),
    ("tiny-gpt-oss", "YaRN attention factor", dict(yarn_attention_factor=1.0), None),
    ("tiny-gpt-oss", "sliding windows", dict(layer_windows=()), None),
    ("tiny-gpt-oss", "SwiGLU clamp", dict(swiglu_limit=float("inf")), None),
    ("tiny-gpt-oss", "clamped SwiGLU (alpha, u+1)", dict(activation="silu_glu"), None),
    ("tiny-gpt-oss", "routing: softmax after top-k", dict(router_softmax_before_topk=True, router_renormalize=False),
     None),
]


def _ours(cfg: ModelConfig, state: dict[str, torch.Tensor], dropped: str | None) -> Transformer:
    model = build(cfg, device="meta").materialize("cpu", torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not missing, missing
    # only the switched-off feature's own parameters are left over
    assert all(dropped and re.search(dropped, k) for k in unexpected), unexpected
    assert bool(unexpected) == bool(dropped)
    return model.eval()


@pytest.fixture(scope="module")
def regime(tmp_path_factory):
    """family -> (config, giants-named parity weights, ids, logits with every feature on); built once per family."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cfg = get_config(name)
            _, state = parity_weights(cfg, tmp_path_factory.mktemp(name))
            ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                cache[name] = (cfg, state, ids, _ours(cfg, state, None)(ids))
        return cache[name]

    return get


@pytest.mark.parametrize("name,feature,off,dropped", FEATURES, ids=[f"{n}-{f}" for n, f, _, _ in FEATURES])
def test_switching_a_feature_off_moves_logits_beyond_the_parity_tolerance(regime, name, feature, off, dropped):
    cfg, state, ids, on = regime(name)
    with torch.no_grad():
        moved = (_ours(cfg.replace(**off), state, dropped)(ids) - on).abs().max().item()
    assert moved > MARGIN, f"{name}: switching off {feature} moves the logits by only {moved:.2e}"


def test_every_family_feature_is_listed():
    """Each architectural field an HF twin sets away from ModelConfig's default has a case above (a new feature
    needs one). Sizes, token ids, rope_theta and the parameters of a listed scaling are not switches."""
    not_switches = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                    "max_context", "norm_eps", "rope_theta", "rope_factor", "rope_original_max_context",
                    "yarn_truncate", "n_experts", "experts_per_token", "moe_aux_loss_coef", "moe_z_loss_coef",
                    "bos_token_id", "eos_token_id", "pad_token_id", "init_std", "tie_embeddings"}
    covered = {(n, k) for n, _, off, _ in FEATURES for k in off}
    base = ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, ffn_dim=8)
    for name in ("tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss"):
        cfg = get_config(name)
        for f in dataclasses.fields(cfg):
            if f.name not in not_switches and getattr(cfg, f.name) != getattr(base, f.name):
                assert (name, f.name) in covered, (name, f.name)


def test_softmax_before_topk_with_renormalisation_is_softmax_after(regime):
    """Why Mixtral's case switches renormalisation: softmax over all experts, top-k, renormalised is exactly
    softmax over the top-k logits, so that pair of settings cannot be told apart (and need not be)."""
    cfg, state, ids, on = regime("tiny-mixtral")
    with torch.no_grad():
        after = _ours(cfg.replace(router_softmax_before_topk=False), state, None)(ids)
    assert (after - on).abs().max().item() <= PARITY_ATOL


def test_the_regime_is_what_makes_soft_caps_and_the_clamp_bite(tmp_path):
    """At the plain init (std 0.05) the attention soft-cap and the SwiGLU clamp were invisible to parity."""
    assert QK_SCALE > 1 and MLP_SCALE > 1
    for name, off in (("tiny-gemma2", dict(attn_softcap=None)), ("tiny-gpt-oss", dict(swiglu_limit=float("inf")))):
        cfg = get_config(name)
        state = dict(hf_to_giants(load_hf_safetensors(save_hf(hf_model_from_config(cfg), tmp_path / name)), cfg))
        ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            moved = (_ours(cfg.replace(**off), state, None)(ids) - _ours(cfg, state, None)(ids)).abs().max().item()
        assert moved < PARITY_ATOL, (name, moved)


def test_t5_relative_bias_moves_logits():
    """gpt-oss-described (no transformers twin): the T5 bias table, off (position "none") on the same weights.
    Its init is zeros, where the table is invisible; random entries of std 1 (per bucket and head) are what a
    trained model's look like in size."""
    cfg = get_config("tiny-gpt-oss-described")
    model = build(cfg, seed=0).eval()
    with torch.no_grad():
        model.rel_bias.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
        for layer in model.layers:
            layer.attn.q_proj.weight.mul_(QK_SCALE)
            layer.attn.k_proj.weight.mul_(QK_SCALE)
    state = model.state_dict()
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on = model(ids)
        moved = (_ours(cfg.replace(position="none"), state, r"rel_bias\.weight")(ids) - on).abs().max().item()
        assert moved > MARGIN, moved
        # and the buckets matter, not only the table's mean: a shuffled table moves them too
        shuffled = dict(state, **{"rel_bias.weight": state["rel_bias.weight"].flip(0)})
        moved = (_ours(cfg, shuffled, None)(ids) - on).abs().max().item()
    assert moved > MARGIN, moved
