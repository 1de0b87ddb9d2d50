"""Parallelism applied from outside to the one model: layouts, plans, meshes. `model/` stays plain."""

from giants.parallel.layout import LayoutError, ParallelDims, check_tp, ep_split, shard_range, tp_split

__all__ = ["LayoutError", "ParallelDims", "check_tp", "ep_split", "shard_range", "tp_split"]
