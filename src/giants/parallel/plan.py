"""The one entry point that parallelizes a built model (or one pipeline stage of it) from outside, in torchtitan's
order: tensor parallel, expert parallel, activation checkpointing, per-block compile, FSDP.

Pipeline splitting happens before this: giants.parallel.pipeline cuts the model into stage modules and calls
`parallelize` on each (a stage's `layers` holds its subset of blocks; embed / norm / lm_head may be None).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from giants.config import ModelConfig
from giants.parallel.fsdp import apply_fsdp
from giants.parallel.layout import LayoutError, ParallelDims
from giants.parallel.mesh import _get, fsdp_mesh, mesh_dim
from giants.parallel.tensor import apply_tp


def expert_fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """Under expert parallelism, the mesh FSDP shards expert parameters over: ("dp_replicate", "dp_shard_mod_ep")
    for HSDP, "dp_shard_mod_ep" alone otherwise (possibly of size 1: the experts are then only EP-sharded)."""
    if mesh_dim(mesh, "dp_replicate") is not None:
        return _get(mesh, ("dp_replicate", "dp_shard_mod_ep"))
    return _get(mesh, ("dp_shard_mod_ep",))


def check_plan(dims: ParallelDims, cfg: ModelConfig) -> None:
    """ParallelDims.check_model plus what this plan does not implement: tensor parallel inside experts together
    with expert parallel (both would split the same expert weights)."""
    dims.check_model(cfg)
    if dims.tp > 1 and dims.ep > 1 and cfg.is_moe:
        raise LayoutError(f"--tp {dims.tp} with --ep {dims.ep}: tensor parallelism inside the experts together with "
                          f"expert parallelism is not supported; use --tp 1 with --ep, or --ep 1 with --tp")


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, *,
                param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
                compile: bool = False, activation_checkpointing: bool = False, sequence_parallel: bool = True,
                loss_parallel: bool = True, reshard_after_forward: bool = True,
                fsdp_always: bool = False) -> nn.Module:
    """Apply `dims` to `model` over `mesh` (giants.parallel.mesh.build_mesh(dims, ...)), in place; returns it.

    1. tensor parallel over "tp" (apply_tp: sequence_parallel, loss_parallel)
    2. expert parallel over "ep" (giants.parallel.expert.apply_ep) when dims.ep > 1
    3. activation checkpointing: model.gradient_checkpointing = True (the Transformer recomputes each block in
       backward; a pipeline stage module reads the same attribute)
    4. compile: each block's nn.Module.compile() (in place: parameter names unchanged)
    5. FSDP over ("dp_replicate", "dp_shard") (apply_fsdp: param_dtype / reduce_dtype mixed precision); under
       expert parallelism the experts over ("dp_replicate", "dp_shard_mod_ep")

    The layout is checked against the model first (ParallelDims.check_model: a LayoutError names the field and the
    numbers). The model may be on the target device or still on the meta device (then each rank allocates and fills
    only its shards afterwards: giants.parallel.init.materialize_sharded). param_dtype /
    reduce_dtype act through FSDP's MixedPrecisionPolicy: without data parallelism (no FSDP) they do nothing and
    the caller casts or autocasts itself; fsdp_always wraps with FSDP over the size-1 "dp_shard" dim then too."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        check_plan(dims, cfg)
    tp_mesh = mesh_dim(mesh, "tp")
    if tp_mesh is not None:
        apply_tp(model, tp_mesh, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    if dims.ep > 1:
        from giants.parallel.expert import apply_ep  # written alongside (expert parallel)

        apply_ep(model, mesh_dim(mesh, "ep"))
    if activation_checkpointing:
        model.gradient_checkpointing = True
    if compile:
        layers = getattr(model, "layers", None)
        for block in ([] if layers is None else layers.children()):
            block.compile()
    dp_mesh = fsdp_mesh(mesh)
    if dp_mesh is None and fsdp_always and mesh is not None:
        dp_mesh = _get(mesh, ("dp_shard",) if dims.ep == 1 else ("dp_shard_mod_ep",))
    if dp_mesh is not None or dims.ep > 1:
        assert mesh is not None
        if dp_mesh is None:  # ep > 1 borrows dp_shard ranks, so there is a dp_shard dim
            dp_mesh = _get(mesh, ("dp_shard",))
        apply_fsdp(model, dp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                   reshard_after_forward=reshard_after_forward,
                   expert_mesh=expert_fsdp_mesh(mesh) if dims.ep > 1 else None)
    return model
