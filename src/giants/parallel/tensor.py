"""Tensor + sequence parallelism applied to the built model from outside (DTensor `parallelize_module`).

The plan (torchtitan's, for one decoder that covers every family), over a 1-D "tp" mesh of n ranks:

    embed            RowwiseParallel(input_layouts=Replicate()): vocab-parallel lookup; output Shard(1) (sequence
                     parallel: each rank keeps T/n positions of the residual stream) or Replicate()
    *norm            SequenceParallel: norms run on the rank's T/n positions (weights Replicate DTensors);
                     Gemma 2's sandwich norms (attn_post_norm, mlp_post_norm) too
    attn             first input Shard(1) -> Replicate (all-gather), then q/k/v ColwiseParallel (each rank its
                     n_heads/n query and n_kv_heads/n KV heads: the attention reshapes with view(B, T, -1, head_dim)
                     and sees only local heads), o_proj RowwiseParallel(output_layouts=Shard(1)) (reduce-scatter)
    attn.sinks       Shard(0) with their heads; rel_bias.weight (buckets, H) Shard(1) with its heads
    mlp (dense)      first input Shard(1) -> Replicate, gate/up ColwiseParallel, down RowwiseParallel -> Shard(1)
    mlp (MoE)        inside every expert, F columns split (w_gate/w_up/b_gate/b_up dim 1, w_down dim 2), router
                     and b_down replicated: each rank runs every token's experts on its F slice (see _MoEParallel)
    norm (final)     SequenceParallel, output all-gathered to a Replicate DTensor: the head reads it
    lm_head          ColwiseParallel: weight Shard(0) (vocab-parallel head); logits a Shard(-1) DTensor
                     (`loss_parallel=True`: the loss reads the vocab shards, full logits are never gathered;
                     giants.parallel.loss.cross_entropy) or gathered to a plain tensor at the model's output

Which dim each parameter splits is not decided here: `giants.parallel.layout.tp_split` is the one table; the
Linear styles are derived from it (split 0 -> colwise, 1 -> rowwise) and `check_tp_placements` verifies every
parameter's placement against it after the plan is applied.

The model's head is `F.linear(hidden, model.output_weight)` (Transformer.logits), not `lm_head.forward`, and with
tied embeddings (Gemma 2) the head weight is the embedding's: so the head's input must already be a DTensor, which is
why the final norm's output is a Replicate DTensor; DTensor's sharding propagation then gives Shard(-1) logits
(also for the tied, vocab-parallel embedding weight) and the final soft-cap (Gemma 2) is pointwise on those shards.

Under sequence parallelism, the residual stream between blocks is a plain local tensor (B, T/n, d_model): T must be
divisible by n, and a pipeline stage sends/receives these shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from giants.parallel.layout import LayoutError, check_tp, tp_split


# ---- plain-tensor conjugate collectives (Megatron's f / g), used at the MoE boundary ---------------------------
def _wait(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


def _redistribute_local(t: torch.Tensor, mesh: DeviceMesh, src: Placement, dst: Placement) -> torch.Tensor:
    """One collective on a plain local tensor, by DTensor (no autograd: called inside Functions below)."""
    out = DTensor.from_local(t, mesh, (src,), run_check=False).redistribute(mesh, (dst,)).to_local()
    return _wait(out)


class _EnterPartialRegion(torch.autograd.Function):
    """Forward: the rank's input (Shard(seq) or Replicate) made whole on every rank. Backward: the gradients every
    rank computed are its share of the true one (see _MoEParallel): summed, and scattered back to Shard(seq)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mesh: DeviceMesh, layout: Placement) -> torch.Tensor:  # type: ignore[override]
        ctx.mesh, ctx.layout = mesh, layout
        return x if layout.is_replicate() else _redistribute_local(x, mesh, layout, Replicate())

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return _redistribute_local(g.contiguous(), ctx.mesh, Partial(), ctx.layout), None, None


class _LeavePartialRegion(torch.autograd.Function):
    """Forward: the per-rank partial sums added up (all-reduce, or reduce-scatter to Shard(seq)). Backward: each
    rank's partial output receives the whole gradient (gathered from Shard(seq))."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, mesh: DeviceMesh, layout: Placement) -> torch.Tensor:  # type: ignore[override]
        ctx.mesh, ctx.layout = mesh, layout
        return _redistribute_local(y.contiguous(), mesh, Partial(), layout)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        g = g if ctx.layout.is_replicate() else _redistribute_local(g.contiguous(), ctx.mesh, ctx.layout, Replicate())
        return g, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies by `scale`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g * ctx.scale, None


class _ReplicatedPartialGrad(torch.autograd.Function):
    """A Replicate DTensor parameter as its local tensor whose gradient on each rank is only that rank's share:
    backward sums the shares over the mesh (all-reduce) and hands the parameter a Replicate gradient."""

    @staticmethod
    def forward(ctx: Any, p: DTensor) -> torch.Tensor:  # type: ignore[override]
        ctx.mesh, ctx.shape, ctx.stride = p.device_mesh, p.shape, p.stride()
        local = p.to_local()
        return local.view_as(local)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> DTensor:  # type: ignore[override]
        total = _redistribute_local(g.contiguous(), ctx.mesh, Partial(), Replicate())
        return DTensor.from_local(total, ctx.mesh, (Replicate(),), run_check=False, shape=ctx.shape,
                                  stride=ctx.stride)


# ---- parameters the model's math reads as local tensors -------------------------------------------------------
class LocalParams(ParallelStyle):
    """Distribute some parameters of a module (name -> placement) and let the module's own forward see them as
    plain local tensors.

    Attention reads `self.sinks` (H,) inside `attend`, RelativeBias indexes `self.weight` (buckets, H), the MoE
    reads its expert matrices directly: math on local heads / local F columns that must not become DTensor ops
    (mixing a DTensor parameter with the plain activations raises). A forward pre-hook shadows each such
    parameter with a local view in the module's instance `__dict__` (attribute lookup finds `__dict__` before
    nn.Module.__getattr__ reaches `_parameters`), and a forward hook (always_call: it also runs when forward
    raises) removes the shadow again, so `named_parameters`, `state_dict`, the optimizer, FSDP and checkpoints
    only ever see the DTensor parameter. The view is made anew on every call (FSDP swaps the registered parameter
    between its sharded and unsharded forms; activation checkpointing re-runs forward, and the hooks with it), from
    `module._parameters` (never a stale shadow). FSDP registers its pre-hook with prepend=True, so the parameter
    is already unsharded when ours runs.

    Gradients: a sharded parameter's view is `to_local()` (differentiable; the local gradient is complete for
    the local shard: sinks and the bias table only touch their own heads, an expert's F slice only its own columns).
    A replicated one read in a partial-gradient region (MoE router, b_down) goes through _ReplicatedPartialGrad, which
    sums the ranks' shares. `rank0_only` names replicated parameters to add once (a bias applied to partial sums
    before their all-reduce): other ranks see zeros, with the autograd node kept so every rank runs the same
    collectives in backward."""

    def __init__(self, placements: dict[str, Placement], *, partial_grads: bool = False,
                 rank0_only: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.placements, self.partial_grads, self.rank0_only = placements, partial_grads, rank0_only

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        names = []
        for name, placement in self.placements.items():
            p = module._parameters.get(name)
            if p is None:
                continue
            if not isinstance(p, DTensor):
                module.register_parameter(name, nn.Parameter(distribute_tensor(p.data, device_mesh, [placement]),
                                                             requires_grad=p.requires_grad))
            names.append(name)
        if not names:
            return module
        is_rank0 = device_mesh.get_local_rank() == 0
        partial, rank0_only = self.partial_grads, set(self.rank0_only)

        def view(name: str, p: torch.Tensor) -> torch.Tensor:
            if not isinstance(p, DTensor):
                return p
            if partial and all(pl.is_replicate() for pl in p.placements):
                local = _ReplicatedPartialGrad.apply(p)
                return local if (is_rank0 or name not in rank0_only) else local * 0.0
            return p.to_local()

        def shadow(mod: nn.Module, args: Any) -> None:
            for name in names:
                p = mod._parameters[name]
                if p is not None:
                    mod.__dict__[name] = view(name, p)

        def unshadow(mod: nn.Module, args: Any, out: Any) -> None:
            for name in names:
                mod.__dict__.pop(name, None)

        module.register_forward_pre_hook(shadow)
        module.register_forward_hook(unshadow, always_call=True)
        return module


class FirstInput(ParallelStyle):
    """PrepareModuleInput for the first positional argument only (Attention.forward also takes positions, rope,
    a cache and the relative-bias module, which pass through untouched): a plain tensor is read as `layout`, then
    redistributed to `desired`."""

    def __init__(self, layout: Placement, desired: Placement, *, use_local_output: bool = False) -> None:
        super().__init__()
        self.layout, self.desired, self.use_local_output = layout, desired, use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        layout, desired, local = self.layout, self.desired, self.use_local_output

        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, (layout,), run_check=False)
            if tuple(x.placements) != (desired,):
                x = x.redistribute(device_mesh, (desired,))
            return (x.to_local() if local else x, *args[1:])

        module.register_forward_pre_hook(hook)
        return module


class OutputToReplicate(ParallelStyle):
    """The module's output as a Replicate DTensor (from a DTensor of any placement, or a plain tensor that is
    already the same on every rank). Used on the final norm: the head's F.linear then meets a DTensor weight."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            if isinstance(out, DTensor):
                return out if all(p.is_replicate() for p in out.placements) else \
                    out.redistribute(device_mesh, (Replicate(),))
            return DTensor.from_local(out, device_mesh, (Replicate(),), run_check=False)

        module.register_forward_hook(hook)
        return module


class _MoEParallel(ParallelStyle):
    """Tensor parallelism inside every expert of a MoE layer (the experts' F columns split, as a dense MLP's are).

    MoE.forward is one function of local tensors (routing, sort, grouped matmuls, combine), so the layer runs as a
    "partial region": the input is made whole on every rank, every rank routes every token identically (the
    router is replicated) and computes its experts' outputs on its own F slice, so its output is a partial sum;
    the layer's output is then summed over the ranks (reduce-scatter to Shard(seq) under sequence parallelism,
    else all-reduce). b_down is added on rank 0 only (it must be added once to the sum).

    In backward, every rank's output receives the full gradient, so every gradient inside the region is that rank's
    share of the true one: the input gradient is summed on the way out (_EnterPartialRegion), replicated parameters'
    gradients are summed (_ReplicatedPartialGrad), and the router logits the layer returns (read by the
    load-balancing / z losses, which every rank computes identically on the whole logits) take 1/n of their
    gradient on each rank, so that the sum counts those losses once."""

    def __init__(self, placements: dict[str, Placement], router_placements: dict[str, Placement],
                 sequence_parallel: bool) -> None:
        super().__init__()
        self.placements, self.router_placements = placements, router_placements
        self.layout: Placement = Shard(1) if sequence_parallel else Replicate()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        LocalParams(self.placements, partial_grads=True, rank0_only=("b_down",))._apply(module, device_mesh)
        LocalParams(self.router_placements, partial_grads=True)._apply(module.router, device_mesh)
        layout, n = self.layout, device_mesh.size()

        def enter(mod: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if isinstance(x, DTensor):
                x = x.redistribute(device_mesh, (layout,)).to_local()
            return (_EnterPartialRegion.apply(x, device_mesh, layout), *args[1:])

        def leave(mod: nn.Module, args: Any, out: Any) -> Any:
            y, router_logits = out
            return _LeavePartialRegion.apply(y, device_mesh, layout), _ScaleGrad.apply(router_logits, 1.0 / n)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
        return module


# ---- the plan -------------------------------------------------------------------------------------------------
def _placement(name: str) -> Placement:
    dim = tp_split(name)
    return Replicate() if dim is None else Shard(dim)


def _linear_style(name: str, *, out_layout: Placement, use_local_output: bool = True) -> ParallelStyle | None:
    """Colwise for a weight split on dim 0 (its outputs), rowwise for dim 1 (its inputs), per tp_split."""
    dim = tp_split(f"{name}.weight")
    if dim == 0:
        return ColwiseParallel(use_local_output=use_local_output)
    if dim == 1:
        return RowwiseParallel(output_layouts=out_layout, use_local_output=use_local_output)
    return None


def _norm_style(name: str, sequence_parallel: bool, *, use_local_output: bool = True) -> ParallelStyle:
    """SequenceParallel; without sequence parallelism the norm sees the whole (replicated) sequence and its
    weights are Replicate DTensors read as local tensors (every parameter a DTensor: a foreach optimizer refuses
    to mix DTensor and plain parameters). Either way each rank's gradient is the whole one."""
    for leaf in ("weight", "bias"):
        if tp_split(f"{name}.{leaf}") is not None:
            raise LayoutError(f"apply_tp: norms are replicated, but tp_split({name}.{leaf!r}) splits them")
    if sequence_parallel:
        return SequenceParallel(use_local_output=use_local_output)
    return LocalParams({"weight": Replicate(), "bias": Replicate()})


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, block) of the model's layers: a ModuleList, or a ModuleDict of a pipeline stage."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return iter(())
    return ((f"layers.{k}", b) for k, b in layers.named_children())


def _config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"apply_tp needs the giants Transformer (or a stage of it with .config), got "
                        f"{type(model).__name__}")
    return cfg


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True,
             loss_parallel: bool = True) -> nn.Module:
    """Tensor (and sequence) parallelism over the 1-D `tp_mesh`, in place; returns the model.

    Works on the whole Transformer or a pipeline stage of it (any of embed / rel_bias / norm / lm_head may be
    None or absent, `layers` may hold a subset). loss_parallel=True leaves the logits a Shard(-1) DTensor for
    giants.parallel.loss.cross_entropy; False gathers them at the model's output (a plain tensor)."""
    from giants.model.mlp import MoE

    cfg = _config(model)
    n = tp_mesh.size()
    has_vocab = getattr(model, "embed", None) is not None or getattr(model, "lm_head", None) is not None
    check_tp(cfg, n, vocab=has_vocab)
    if n == 1:
        return model
    seq: Placement = Shard(1) if sequence_parallel else Replicate()

    embed = getattr(model, "embed", None)
    if embed is not None:
        if tp_split("embed.weight") != 0:
            raise LayoutError("apply_tp implements a vocab-parallel embedding (tp_split('embed.weight') == 0)")
        parallelize_module(embed, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=seq))
        if sequence_parallel:
            def check_len(mod: nn.Module, args: tuple) -> None:
                T = args[0].shape[-1]
                if T % n:
                    raise ValueError(f"sequence parallel over {n} tensor-parallel ranks needs the sequence length "
                                     f"divisible by {n}, got {T} (pad the batch, or apply_tp(sequence_parallel=False))")

            embed.register_forward_pre_hook(check_len, prepend=True)

    rel_bias = getattr(model, "rel_bias", None)
    if rel_bias is not None:
        parallelize_module(rel_bias, tp_mesh, LocalParams({"weight": _placement("rel_bias.weight")}))

    for prefix, block in _blocks(model):
        norms = [k for k in ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm")
                 if getattr(block, k, None) is not None]
        for k in norms:
            # local outputs: the sandwich norms' outputs are added to the (local) residual stream
            parallelize_module(getattr(block, k), tp_mesh, _norm_style(f"{prefix}.{k}", sequence_parallel))
        attn = block.attn
        plan: dict[str, ParallelStyle] = {}
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            style = _linear_style(f"{prefix}.attn.{k}", out_layout=seq)
            if style is not None:
                plan[k] = style
        parallelize_module(attn, tp_mesh, FirstInput(seq, Replicate()))
        parallelize_module(attn, tp_mesh, plan)
        if getattr(attn, "sinks", None) is not None:
            parallelize_module(attn, tp_mesh, LocalParams({"sinks": _placement(f"{prefix}.attn.sinks")}))
        mlp = block.mlp
        if isinstance(mlp, MoE):
            names = [k for k in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
                     if getattr(mlp, k, None) is not None]
            placements = {k: _placement(f"{prefix}.mlp.{k}") for k in names}
            router = {k: _placement(f"{prefix}.mlp.router.{k}") for k, p in mlp.router.named_parameters()}
            if any(not pl.is_replicate() for pl in router.values()) or \
                    (mlp.b_down is not None and not placements["b_down"].is_replicate()):
                raise LayoutError("MoE under tensor parallelism needs the router and b_down replicated in tp_split")
            parallelize_module(mlp, tp_mesh, _MoEParallel(placements, router, sequence_parallel))
        else:
            plan = {}
            for k in ("gate_proj", "up_proj", "down_proj"):
                style = _linear_style(f"{prefix}.mlp.{k}", out_layout=seq)
                if style is not None:
                    plan[k] = style
            parallelize_module(mlp, tp_mesh, FirstInput(seq, Replicate()))
            parallelize_module(mlp, tp_mesh, plan)

    norm = getattr(model, "norm", None)
    if norm is not None:
        parallelize_module(norm, tp_mesh, _norm_style("norm", sequence_parallel, use_local_output=False))
        parallelize_module(norm, tp_mesh, OutputToReplicate())
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        # Only the weight's distribution matters to the model (Transformer.logits reads lm_head.weight); the hooks
        # serve a caller that runs lm_head(hidden) itself.
        if tp_split("lm_head.weight") != 0:
            raise LayoutError("apply_tp implements a vocab-parallel head (tp_split('lm_head.weight') == 0)")
        parallelize_module(lm_head, tp_mesh, ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                                             use_local_output=False))
    if not loss_parallel:
        model.register_forward_hook(_gather_outputs)
    model._giants_tp = dict(mesh=tp_mesh, sequence_parallel=sequence_parallel,  # type: ignore[assignment]
                            loss_parallel=loss_parallel)
    check_tp_placements(model)
    return model


def _gather_outputs(mod: nn.Module, args: Any, out: Any) -> Any:
    """Every DTensor in the model's output (logits, hidden) as the whole plain tensor."""
    if isinstance(out, DTensor):
        return _wait(out.full_tensor())
    if isinstance(out, tuple):
        return tuple(_gather_outputs(mod, args, o) for o in out)
    if isinstance(out, list):
        return [_gather_outputs(mod, args, o) for o in out]
    return out


def tp_placement_of(p: torch.Tensor, mesh_dim_name: str = "tp") -> Placement | None:
    """The placement of parameter `p` over the tensor-parallel mesh dim: its only placement on a 1-D mesh, the one
    of the dim named `mesh_dim_name` on an N-D mesh (FSDP x TP), Replicate() when that dim is absent; None for a
    plain tensor (held whole: every rank the same)."""
    if not isinstance(p, DTensor):
        return None
    names = p.device_mesh.mesh_dim_names
    if not names:
        if p.device_mesh.ndim != 1:
            raise ValueError("tp_placement_of: an unnamed N-D mesh; name its dims")
        return p.placements[0]
    if mesh_dim_name not in names:
        return Replicate()  # e.g. FSDP alone: whole over tp
    return p.placements[names.index(mesh_dim_name)]


def check_tp_placements(model: nn.Module, mesh_dim_name: str = "tp") -> None:
    """Every parameter's tensor-parallel placement must be the one `tp_split` gives its name: Shard(d) for a split
    dim d, Replicate (or a plain tensor) for None. Raises LayoutError listing the mismatches."""
    bad = []
    for name, p in model.named_parameters():
        want = tp_split(name)
        got = tp_placement_of(p, mesh_dim_name)
        if want is None:
            ok = got is None or got.is_replicate()
        else:
            ok = isinstance(got, Shard) and got.dim % p.dim() == want % p.dim()
        if not ok:
            bad.append(f"{name}: {got} (tp_split says {'Replicate' if want is None else f'Shard({want})'})")
    if bad:
        raise LayoutError("tensor-parallel placements differ from giants.parallel.layout.tp_split:\n  "
                          + "\n  ".join(bad))
