"""The arena: matched active budgets, and a miniature run that writes the report and plots."""

from __future__ import annotations

import json

import pytest

from giants.presets import TINY_PRESETS, get_config
from giants.train.arena import ArenaConfig, active_body, arena_configs, match_budget, run_arena


@pytest.mark.parametrize("scale,layers", [(1, 4), (1, 2), (4, 4)])
def test_twins_match_the_active_budget(scale, layers):
    cfgs = arena_configs(ArenaConfig(scale=scale, n_layers=layers))
    assert set(cfgs) == set(TINY_PRESETS)
    target = active_body(cfgs["tiny-llama"])
    for name, cfg in cfgs.items():
        assert abs(active_body(cfg) - target) / target <= 0.03, name
        assert cfg.d_model == 64 * scale
        ref = get_config(name)
        # only depth and FFN/expert width move; the family's defining features stay
        for field in ("n_experts", "experts_per_token", "position", "attn_sinks", "attn_softcap", "activation",
                      "post_norms", "n_heads", "n_kv_heads", "layer_windows", "vocab_size"):
            assert getattr(cfg, field) == getattr(ref, field), (name, field)


def test_match_budget_moves_depth_when_width_cannot():
    cfg = get_config("tiny-gpt-oss")
    huge = active_body(get_config("tiny-llama").replace(n_layers=4, ffn_dim=4096))
    matched = match_budget(cfg, huge, n_layers=4, tolerance=0.03)
    assert abs(active_body(matched) - huge) / huge <= 0.03


def test_mini_arena_writes_report(tmp_path):
    ac = ArenaConfig(out=str(tmp_path / "arena"), steps=3, batch_size=2, seq_len=32, n_layers=2, eval_every=2,
                     eval_batches=1, isolate=False, progress=False)
    report = run_arena(ac)
    out = tmp_path / "arena"
    assert set(report["results"]) == set(TINY_PRESETS)
    for name, s in report["results"].items():
        vals = [h["val_loss"] for h in s["history"] if "val_loss" in h]
        assert len(vals) == 2 and all(v < 11.5 for v in vals), name
        assert s["tokens"] == 3 * 2 * 32 and s["tokens_per_s"] > 0
        if s["n_experts"]:
            util = s["history"][-1]["router"]["utilisation"]
            assert len(util) == s["n_layers"] and abs(sum(util[0]) - 1) < 1e-5
    md = (out / "report.md").read_text()
    assert all(n in md for n in TINY_PRESETS) and "![arena.png](arena.png)" in md
    for png in ("arena.png", "experts.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["tokens_per_twin"] == 192
