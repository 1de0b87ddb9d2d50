"""Tensor parallel, FSDP, HSDP and FSDP x TP (giants.parallel.plan) against one process: the same per-step loss,
the same gradients after 5 steps and the same parameters, for every family's tiny twin (fp32, gloo on the CPU).

One spawn per world size runs every family and layout (tests/parallel_workers.py); a module-scoped fixture shares
it between the assertions."""

from __future__ import annotations

import pytest
import torch

import giants
from dist_utils import run_ranks
from giants.parallel import LayoutError, ParallelDims, tp_split
from giants.parallel.loss import cross_entropy
from giants.train.losses import causal_lm_loss
from parallel_workers import FAMILIES, layout_keys, world_checks

RTOL = 1e-5


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(world_checks, 2, timeout=900)


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_ranks(world_checks, 4, timeout=1500)


def _check(results: dict, world: int) -> None:
    assert sorted(results) == sorted(layout_keys(world))
    problems = []
    for key, r in sorted(results.items()):
        if r["placement"]:
            problems.append(f"{key}: {r['placement']}")
        if r["loss"] > RTOL:
            problems.append(f"{key}: loss differs by {r['loss']:.2e} (got {r['losses']}, one process "
                            f"{r['ref_losses']})")
        for what in ("grad", "param"):
            err, name = r[what]
            if err > RTOL:
                problems.append(f"{key}: {what} of {name} differs by {err:.2e} (relative norm)")
    assert not problems, "\n".join(problems)


def test_world2_fsdp_tp_match_one_process(world2):
    _check(world2[0]["layouts"], 2)


def test_world4_fsdp_tp_hsdp_2d_match_one_process(world4):
    _check(world4[0]["layouts"], 4)


def test_mesh_names_and_sizes(world4):
    r = [x["mesh"] for x in world4]
    ep, hsdp_tp = r[0]["ep"], r[0]["hsdp_tp"]
    assert ep["names"] == ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")
    assert ep["sizes"] == dict(pp=None, dp_replicate=None, dp_shard=4, dp_shard_mod_ep=2, ep=2, tp=None, dp=4)
    assert ep["fsdp"] == (("dp_shard",), (4,))
    assert hsdp_tp["names"] == ("pp", "dp_replicate", "dp_shard", "tp")
    assert hsdp_tp["sizes"] == dict(pp=None, dp_replicate=2, dp_shard=None, dp_shard_mod_ep=None, ep=None, tp=2, dp=2)
    assert hsdp_tp["fsdp"] == (("dp_replicate", "dp_shard"), (2, 1))
    # data-parallel coordinates: ranks (dp_replicate, tp) = (0,0),(0,1),(1,0),(1,1) -> dp index 0,0,1,1
    assert [x["hsdp_tp"]["dp"] for x in r] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [x["ep"]["dp"] for x in r] == [(i, 4) for i in range(4)]


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_cross_entropy(world, request):
    for rank_out in request.getfixturevalue(f"world{world}"):
        r = rank_out["vocab_loss"]
        for reduction in ("mean", "sum", "none"):
            assert r[reduction] < 1e-6, (reduction, r[reduction])
            assert r[f"{reduction}_type"] == "Tensor"  # a plain tensor, the same on every rank


def test_init_distributed_and_sequence_length_check(world2):
    for rank, r in enumerate(x["misc"] for x in world2):
        assert r["info"] == (rank, 2, rank, "cpu")
        assert r["odd_len"] is not None and "divisible by 2, got 15" in r["odd_len"]


def test_orderly_shutdown_waits_for_every_rank_then_ends_the_group(world2):
    """(through the rendezvous store, not a gloo barrier: see giants.parallel.mesh.shutdown_distributed)"""
    r = [x["shutdown"] for x in world2]
    assert r[0]["waited_s"] > 0.8  # rank 0 waited for rank 1, a second late
    assert not r[0]["initialized_after"] and not r[1]["initialized_after"]


def test_cross_entropy_plain_matches_trainer_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 33, generator=g)
    y = torch.randint(0, 33, (2, 7), generator=g)
    y[0, :4] = -100
    assert torch.allclose(cross_entropy(logits, y), causal_lm_loss(logits, y), rtol=1e-6)
    per_token = cross_entropy(logits, y, reduction="none")
    assert per_token.shape == y.shape and bool((per_token[0, :4] == 0).all())
    assert torch.allclose(cross_entropy(logits, y, reduction="sum"), per_token.sum())
    all_ignored = torch.full_like(y, -100)
    assert cross_entropy(logits, all_ignored).item() == 0.0  # count clamped at 1, as the trainer's CUDA path


@pytest.mark.parametrize("field, kw, words", [
    ("tp", dict(tp=3), ["3", "n_kv_heads=8"]),  # 48 query heads divide by 3, 8 KV heads do not
    ("tp", dict(tp=5), ["5", "n_heads=48"]),
    ("ep", dict(ep=3, dp_shard=3), ["--ep 3", "n_experts=8"]),
    ("pp", dict(pp=4, dp_shard=1), ["--pp 4", "n_layers=2"]),
])
def test_bad_layout_refused_before_build(field, kw, words):
    cfg = giants.get_config("mixtral-8x22b").replace(n_layers=2)  # 48 heads, 8 KV heads, 8 experts
    dims = ParallelDims(**kw)
    with pytest.raises(LayoutError) as e:
        dims.check_model(cfg)  # a config only: nothing is allocated
    for w in words:
        assert w in str(e.value), (field, str(e.value))


def test_tp_with_ep_on_moe_refused():
    from giants.parallel.plan import check_plan

    with pytest.raises(LayoutError, match="--tp 2 with --ep 2"):
        check_plan(ParallelDims(dp_shard=2, tp=2, ep=2), giants.get_config("tiny-mixtral"))


def test_every_parameter_has_a_tp_rule():
    # the placement test proper runs in the spawned workers (check_tp_placements after the plan, every family)
    for fam in FAMILIES:
        model = giants.build(giants.get_config(fam), device="meta")
        for name, p in model.named_parameters():
            dim = tp_split(name)
            assert dim is None or 0 <= dim < p.dim(), (fam, name, dim)
