"""FSDP2 (`fully_shard`) applied to the built model from outside: ZeRO-3 over "dp_shard", HSDP over
("dp_replicate", "dp_shard"), composed with tensor parallelism (parameters already DTensors on the "tp" mesh of
the same root mesh).

Units (each one all-gather before its forward / backward and one reduce-scatter after its backward):
    every block            resharded after forward (reshard_after_forward=True; ZeRO-3) unless told otherwise
    embed                  its own unit, when the head does not share its weight
    root                   everything left: the final norm, lm_head (or the tied embedding), rel_bias

The final norm and the head sit in the root unit, not in one of their own: the model's head is
`F.linear(hidden, model.output_weight)` in Transformer.logits (the trainer also calls model.logits after
forward), which never runs lm_head.forward, so a unit holding lm_head would never see the forward hooks that
gather it. FSDP2 gathers the root's parameters at the root's pre-forward and, by its root heuristic, does not
reshard them after forward (backward needs them first): the head is "not resharded after forward", as torchtitan
arranges for its norm + output unit, at the cost of being held gathered through the whole forward. A tied
embedding (Gemma 2) is read by the head too, so it stays in the root unit as well.

Mixed precision: MixedPrecisionPolicy(param_dtype, reduce_dtype) casts the gathered parameters (bf16 compute over
fp32 sharded masters, fp32 gradient reduction). The rotary tables are computed in the dtype of
`model.embed.weight`, which outside the embedding's forward is the sharded (fp32) parameter: a forward hook on
`model.rotary` casts them to param_dtype.

Experts under expert parallelism (giants.parallel.expert): `expert_mesh` shards each MoE layer's expert parameters
over "dp_shard_mod_ep" (with "dp_replicate" for HSDP) in a unit of their own, the router in another one over the
dense mesh (its gradient must be reduced over every data-parallel rank, ep's included). The expert unit averages
over its own mesh (FSDP's default): giants.parallel.expert.apply_ep already scales the experts' gradients by 1/ep
(their gradient is a sum over the EP group), so both kinds of gradient end up averaged over all dp ranks. A caller
that leaves the experts' gradients unscaled (apply_ep(grad_divide=1)) passes expert_gradient_divide_factor = the
dense mesh's size instead (torchtitan's convention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def _blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    return [] if layers is None else list(layers.children())


def _set_divide_factor(module: Any, factor: float) -> None:
    if hasattr(module, "set_gradient_divide_factor"):  # torch >= 2.8
        module.set_gradient_divide_factor(factor)
    else:  # torch 2.6 / 2.7
        module.set_reduce_scatter_divide_factor(factor)


def _tied(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_embeddings", False))


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
               expert_mesh: DeviceMesh | None = None, expert_gradient_divide_factor: float | None = None,
               offload_policy: Any = None) -> nn.Module:
    """fully_shard the model (a Transformer or a pipeline stage of it: layers may be a subset, embed / norm /
    lm_head None or absent) over `dp_mesh`, in place; returns it.

    dp_mesh: 1-D ("dp_shard": FSDP) or 2-D (("dp_replicate", "dp_shard"): HSDP, replicas outermost).
    expert_mesh: for expert parallelism, the mesh the MoE expert parameters are sharded over instead
    (("dp_replicate",) "dp_shard_mod_ep"); their reduced gradients are divided by expert_gradient_divide_factor
    when given (FSDP's default otherwise: the expert mesh's size). offload_policy: passed to fully_shard (e.g.
    CPUOffloadPolicy())."""
    from giants.model.mlp import MoE

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw: dict[str, Any] = dict(mesh=dp_mesh, mp_policy=mp)
    if offload_policy is not None:
        kw["offload_policy"] = offload_policy
    for block in _blocks(model):
        mlp = getattr(block, "mlp", None)
        if expert_mesh is not None and isinstance(mlp, MoE):
            fully_shard(mlp.router, **kw, reshard_after_forward=reshard_after_forward)
            fully_shard(mlp, **{**kw, "mesh": expert_mesh}, reshard_after_forward=reshard_after_forward)
            if expert_gradient_divide_factor is not None:
                _set_divide_factor(mlp, float(expert_gradient_divide_factor))
        fully_shard(block, **kw, reshard_after_forward=reshard_after_forward)
    embed = getattr(model, "embed", None)
    if embed is not None and not _tied(model):
        fully_shard(embed, **kw, reshard_after_forward=reshard_after_forward)
    fully_shard(model, **kw, reshard_after_forward=reshard_after_forward)
    rotary = getattr(model, "rotary", None)
    if param_dtype is not None and rotary is not None:
        def cast(mod: nn.Module, args: Any, out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            return tuple(t.to(param_dtype) for t in out)

        rotary.register_forward_hook(cast)
    return model
