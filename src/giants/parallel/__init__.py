"""Parallelism applied from outside to the one model: layouts, plans, meshes. `model/` stays plain.

The layout names (ParallelDims, tp_split, ...) import no torch.distributed; the plan functions (build_mesh,
parallelize, apply_tp, apply_fsdp, cross_entropy, ...) are imported on first use."""

from giants.parallel.layout import LayoutError, ParallelDims, check_tp, ep_split, shard_range, tp_split

_LAZY = {
    **dict.fromkeys(("DistInfo", "init_distributed", "build_mesh", "mesh_dim", "dp_coords", "fsdp_mesh"),
                    "giants.parallel.mesh"),
    **dict.fromkeys(("apply_tp", "check_tp_placements"), "giants.parallel.tensor"),
    "apply_fsdp": "giants.parallel.fsdp",
    "materialize_sharded": "giants.parallel.init",
    **dict.fromkeys(("parallelize", "check_plan"), "giants.parallel.plan"),
    **dict.fromkeys(("cross_entropy", "token_count", "data_parallel_loss"), "giants.parallel.loss"),
}

__all__ = ["LayoutError", "ParallelDims", "check_tp", "ep_split", "shard_range", "tp_split", *_LAZY]


def __getattr__(name: str):  # PEP 562: the torch.distributed-backed parts load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'giants.parallel' has no attribute {name!r}")
