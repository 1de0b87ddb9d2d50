"""Rank functions for tests/test_parallel_init.py (spawned by tests/dist_utils.run_ranks, so module level).

Each case builds a tiny twin on the meta device, applies a layout there (plan.parallelize, or the pipeline split
with the plan on each stage part), materialises this rank's shards (giants.parallel.init.materialize_sharded) and
reports how its weights compare with the one-device `giants.build(cfg, seed=SEED)`, what it allocated, and the
largest tensor any op produced while materialising."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SEED = 7
VOCAB = 512


class LargestTensor(TorchDispatchMode):
    """The largest plain (non-meta) tensor any op returns while active (a DTensor's local pieces are plain)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0  # of the storage behind it (a byte view of a bf16 tensor is not a new tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if type(t) is torch.Tensor and not t.is_meta:
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.untyped_storage().nbytes())
        return out


def _config(name: str, n_layers: int | None = None) -> Any:
    import giants

    cfg = giants.get_config(name).replace(vocab_size=VOCAB)
    return cfg if n_layers is None else cfg.replace(n_layers=n_layers)


def _case(case: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    import giants
    from giants.parallel.init import is_meta, local_chunk, materialize_sharded
    from giants.parallel.layout import ParallelDims
    from giants.parallel.mesh import build_mesh
    from giants.parallel.plan import parallelize

    cfg = _config(case["model"], case.get("n_layers"))
    dims = ParallelDims.infer(torch.distributed.get_world_size(), **case["dims"])
    mesh = build_mesh(dims, "cpu")
    model = giants.build(cfg, device="meta")
    meta_after_build = is_meta(model) and all(p.is_meta for p in model.parameters())

    def apply(part: torch.nn.Module) -> torch.nn.Module:
        return parallelize(part, dims, mesh)

    track = LargestTensor()
    stats: list[Any] = []
    if dims.pp == 1:
        apply(model)
        meta_after_plan = is_meta(model)
        with track:
            stats.append(materialize_sharded(model, cfg, SEED, "cpu"))
        parts: list[torch.nn.Module] = [model]
    else:
        from giants.parallel.pipeline import pipeline_model

        def materialize(ps: list[torch.nn.Module]) -> None:
            nonlocal meta_after_plan
            meta_after_plan = all(is_meta(p) for p in ps)
            with track:
                stats.append(materialize_sharded(ps, cfg, SEED, "cpu"))

        meta_after_plan = False
        pp = pipeline_model(model, dims, mesh["pp"], lambda out, y: out.sum(), dims.pp, parallelize_fn=apply,
                            materialize_fn=materialize)
        parts = pp.model_parts
    rng_after = torch.rand(4)
    ref = giants.build(cfg, seed=SEED)
    rng_ref = torch.rand(4)
    want = dict(ref.named_parameters())
    worst, names, manual_worst, n_manual = 0.0, [], 0.0, 0
    seen: set[str] = set()
    for part in parts:
        for name, p in part.named_parameters():
            if name in seen:
                continue
            seen.add(name)
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            worst = max(worst, float((full - want[name]).abs().max()))
            names.append(name)
            if isinstance(p, DTensor) and all(type(pl) in (Shard, Replicate) for pl in p.placements):
                # the hand slicing kept for torch < 2.7 against distribute_tensor's local split
                a, b = local_chunk(want[name].detach(), p, manual=True), local_chunk(want[name].detach(), p)
                manual_worst = max(manual_worst, float((a - b).abs().max()) if a.shape == b.shape else float("inf"))
                n_manual += 1
    st = stats[0]
    tied = want["embed.weight"].numel() if cfg.tie_embeddings else 0
    n_dtensor = sum(isinstance(p, DTensor) for part in parts for p in part.parameters())
    return dict(meta_after_build=meta_after_build, meta_after_plan=meta_after_plan, worst=worst, names=names,
                all_names=list(want), rng_equal=torch.equal(rng_after, rng_ref), local_numel=st.local_numel,
                full_numel=st.full_numel, largest_scratch=st.largest_scratch_numel, largest_op=track.largest,
                tied_embed_numel=tied, largest_param=max(p.numel() for p in want.values()),
                manual_worst=manual_worst, n_manual=n_manual, n_dtensor=n_dtensor)


def cases_worker(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        try:
            out.append(_case(case))
        finally:
            torch.distributed.barrier()
    return out


def trainer_worker(rank: int, world: int, data: str, out: str, dims: dict[str, int]) -> dict[str, Any]:
    """The trainer's scale-out path: the model it trains starts as the one-device build's slices."""
    from torch.distributed.tensor import DTensor

    import giants
    from giants.train import TrainConfig
    from giants.train.trainer import Trainer

    cfg = TrainConfig(preset="tiny-llama", tokenizer="bytes", data=data, out=out, seq_len=32, batch_size=4,
                      steps=1, eval_every=0, overrides={"vocab_size": 320}, device="cpu", seed=SEED,
                      **dims)
    tr = Trainer(cfg)
    want = dict(giants.build(tr.model_config, seed=SEED).named_parameters())
    worst = 0.0
    for name, p in tr.model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        worst = max(worst, float((full - want[name]).abs().max()))
    st = tr.dist.materialized
    res = dict(worst=worst, notes=list(tr.dist.notes), local_numel=st.local_numel, full_numel=st.full_numel)
    tr.dist.barrier()
    return res


def _ckpt_case(case: dict[str, Any]) -> dict[str, Any]:
    """Build on meta from the checkpoint's config, apply the layout, fill the shards from the checkpoint
    (giants.parallel.init_checkpoint) and compare with `giants.load(path, dtype=float32)`."""
    from torch.distributed.tensor import DTensor

    import giants
    from giants.checkpoint.loading import load_config, meta_model
    from giants.parallel.init import is_meta
    from giants.parallel.init_checkpoint import materialize_from_checkpoint
    from giants.parallel.layout import ParallelDims
    from giants.parallel.mesh import build_mesh
    from giants.parallel.plan import parallelize

    path = case["path"]
    cfg = load_config(path)
    dims = ParallelDims.infer(torch.distributed.get_world_size(), **case["dims"])
    mesh = build_mesh(dims, "cpu")
    model = meta_model(cfg)
    meta_after_build = all(p.is_meta for p in model.parameters())
    track = LargestTensor()
    stats: list[Any] = []
    meta_after_plan = False

    def apply(part: torch.nn.Module) -> torch.nn.Module:
        return parallelize(part, dims, mesh)

    def materialize(ps: Any) -> None:
        nonlocal meta_after_plan
        meta_after_plan = all(is_meta(p) for p in (ps if isinstance(ps, list) else [ps]))
        with track:
            stats.append(materialize_from_checkpoint(ps, path, cfg, "cpu"))

    if dims.pp == 1:
        apply(model)
        materialize(model)
        parts: list[torch.nn.Module] = [model]
    else:
        from giants.parallel.pipeline import pipeline_model

        parts = pipeline_model(model, dims, mesh["pp"], lambda out, y: out.sum(), dims.pp, parallelize_fn=apply,
                               materialize_fn=materialize).model_parts
    want = dict(giants.load(path, dtype=torch.float32).named_parameters())
    worst, names, n_dtensor = 0.0, set(), 0
    for part in parts:
        for name, p in part.named_parameters():
            n_dtensor += isinstance(p, DTensor)
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            assert full.dtype == torch.float32, name
            worst = max(worst, float((full - want[name]).abs().max().detach()))
            names.add(name)
    st = stats[0]
    return dict(meta_after_build=meta_after_build, meta_after_plan=meta_after_plan, worst=worst, names=sorted(names),
                all_names=sorted(want), largest_op_bytes=track.largest_bytes, largest_scratch=st.largest_scratch_numel,
                largest_param=max(p.numel() for p in want.values()), local_numel=st.local_numel,
                largest_param_bytes=max(p.nbytes for p in want.values()), full_numel=st.full_numel, n_dtensor=n_dtensor,
                read_numel=st.read_numel, pp_numel=sum(p.numel() for part in parts for p in part.parameters()))


def checkpoint_cases_worker(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        try:
            out.append(_ckpt_case(case))
        finally:
            torch.distributed.barrier()
    return out
