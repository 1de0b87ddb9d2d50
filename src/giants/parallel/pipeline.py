"""Pipeline parallelism through torch.distributed.pipelining, applied from outside the one model.

`split_model` cuts a built Transformer into `dims.n_stages` stage modules (`StagePart`) and returns the ones this
pipeline rank runs (loop order: rank r runs stages r, r + pp, r + 2pp, ...); each part can then be parallelised
(TP / EP / FSDP, giants.parallel.plan) like a whole model; `build_schedule` wraps the parts in PipelineStages and
the schedule named by `dims.pp_schedule` (gpipe, 1f1b, interleaved1f1b). `pipeline_model` does the three.

A part holds the same modules as the model (no copies): stage 0 the embedding, the last stage the final norm and
the head, every stage its contiguous run of blocks (a ModuleDict keyed by the global layer index, so parameter
names are the whole model's: `layers.5.attn.q_proj.weight` on whichever rank holds layer 5). `StagePart.forward`
runs its blocks exactly as Transformer.forward does (embedding scale on stage 0, rotary tables from the default
positions 0..T-1 on every stage, the causal no-cache path, gradient checkpointing when the model has it on).

Shared tensors across stages:
- T5 relative bias (gpt-oss-described): the table (buckets, heads) lives on the Transformer and every layer
  reads it. Stage 0 owns the parameter; each stage passes the table on to the next as a second activation next
  to the hidden state (a few hundred floats per micro-batch), and later stages read the table they received.
  Its gradient therefore flows back through the pipeline's own backward: each stage's input-gradient for the
  table is its layers' share plus everything after it, and stage 0 accumulates the total into the one parameter.
  No extra collective, no duplicate parameter for data-parallel reduction or gradient clipping.
- Tied embeddings (Gemma 2): the head's weight is the embedding table, needed on the first and the last stage.
  Both hold the `embed` module (equal at the start: every rank draws the same seeded weights, see
  giants.parallel.init, or loads the same checkpoint); after the schedule's backward, `PipelineParts.step`
  exchanges the two gradients between the first and the last pipeline rank and both set first + last
  (Megatron-LM's embedding group), so the two copies take identical optimizer steps. A gradient-norm over the
  pipeline ranks counts this table twice.

Loss. The schedule calls `loss_fn(logits, labels)` on the last stage once per micro-batch; the wrapper multiplies
it by `loss_scale` (default 1 / n_microbatches) and the schedule's own gradient scaling is off, so with a
micro-batch-mean loss over micro-batches of equal token counts the step's objective is the mean over the rank's
batch (pass a loss normalised by the global count and loss_scale=1.0 when counts differ). Data-parallel averaging
(FSDP over dp) then makes it the global mean.

MoE router losses. The router logits never leave their stage. With `aux_loss_fn`, each stage computes its layers'
share of the router losses (`moe_router_loss_fn`: coefficient x sum over the stage's MoE layers / all MoE
layers, i.e. its share of the mean over layers) and attaches it to its hidden state with an identity whose
backward feeds the loss_scale gradient into it (the auxiliary loss joins the backward without reaching the last
stage). The losses are those of each micro-batch (as with gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from giants.model.positions import RelativeBias
from giants.model.transformer import Transformer
from giants.parallel.layout import LayoutError, ParallelDims

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B}


class _CarriedBias:
    """RelativeBias over a table received from the previous stage (RelativeBias.forward on `weight`)."""

    def __init__(self, buckets: tuple[int, int], weight: torch.Tensor) -> None:
        (self.num_buckets, self.max_distance), self.weight = buckets, weight

    __call__ = RelativeBias.forward


class _AttachLoss(torch.autograd.Function):
    """Returns x; in the backward also sends a gradient of 1 into `loss`, so a scalar computed inside a stage
    joins the objective without travelling to the last stage (DeepSeek-MoE's AddAuxiliaryLoss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return g, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=g.device)


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous runs of layers, one per stage, sizes differing by at most one (earlier stages smaller)."""
    if n_stages > n_layers:
        raise LayoutError(f"{n_stages} pipeline stages need at least {n_stages} layers, the model has n_layers="
                          f"{n_layers}")
    return [range(s * n_layers // n_stages, (s + 1) * n_layers // n_stages) for s in range(n_stages)]


def stage_ids(dims: ParallelDims, pp_rank: int) -> list[int]:
    """The stages pipeline rank `pp_rank` runs (loop order, as the interleaved schedule expects)."""
    return [pp_rank + k * dims.pp for k in range(dims.stages_per_rank)]


class StagePart(nn.Module):
    """One pipeline stage of a Transformer: a subset of its modules (shared, not copied) and a forward that runs
    them as Transformer.forward does. Inputs: stage 0 takes input_ids (B, T); later stages take the hidden state
    (B, T, D) and, for the T5 bias, the table. Outputs: logits on the last stage, else the hidden state (and the
    table)."""

    def __init__(self, model: Transformer, stage: int, n_stages: int, layers: range,
                 aux_loss_fn: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
                 loss_scale: float = 1.0) -> None:
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.stage_index, self.n_stages = stage, n_stages
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.layer_ids = layers
        tied = model.lm_head is None
        self.embed = model.embed if (self.is_first or (self.is_last and tied)) else None
        self.rotary = model.rotary  # buffers only
        self.rel_bias = model.rel_bias if self.is_first else None  # owned by stage 0 (see the module docstring)
        rb = model.rel_bias
        self.rel_buckets = None if rb is None else (rb.num_buckets, rb.max_distance)  # for the carried table
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.gradient_checkpointing = model.gradient_checkpointing
        self.aux_loss_fn = aux_loss_fn
        self.loss_scale = loss_scale
        self.aux_values: list[torch.Tensor] = []  # this stage's scaled router-loss share, per micro-batch

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> StagePart:
        """Allocate a part split from a meta-built model (Transformer.materialize on this part's modules only)."""
        return Transformer.materialize(self, device, dtype)  # type: ignore[arg-type]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Transformer.init_weights over this part's parameters (same rules, by name). The random stream is the
        part's own, so the values differ from a whole model's init: to start equal to one process, use
        giants.parallel.init.materialize_sharded (or load a checkpoint) instead. A tied embedding held by the first
        and last stage must get the same generator state on both (or be broadcast), or its two copies start
        apart."""
        Transformer.init_weights(self, generator)  # type: ignore[arg-type]

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if args[0].is_meta:
            return self._meta_outputs(*args)
        cfg = self.config
        carries_bias = self.rel_buckets is not None
        if self.is_first:
            (input_ids,) = args
            x = self.embed(input_ids)
            if cfg.embed_scale is not None:
                x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)  # as Transformer.forward
            table = None
            if carries_bias:
                table = self.rel_bias.weight
                rel_bias: RelativeBias | _CarriedBias | None = self.rel_bias
        else:
            x, *rest = args
            table = rest[0] if carries_bias else None
            rel_bias = _CarriedBias(self.rel_buckets, table) if carries_bias else None
        if not carries_bias:
            rel_bias = None
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        rope = None
        if self.rotary is not None:
            dtype = self.embed.weight.dtype if self.is_first else x.dtype
            rope = self.rotary(positions, dtype)
        router_logits: list[torch.Tensor] = []
        for layer in self.layers.values():
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, rl = torch.utils.checkpoint.checkpoint(layer, x, positions, rope, None, rel_bias, True,
                                                          use_reentrant=False)
            else:
                x, rl = layer(x, positions, rope, None, rel_bias, True)
            if rl is not None:
                router_logits.append(rl)
        if self.aux_loss_fn is not None and router_logits and torch.is_grad_enabled():
            aux = self.aux_loss_fn(router_logits) * self.loss_scale
            self.aux_values.append(aux.detach())
            x = _AttachLoss.apply(x, aux)
        if self.is_last:
            return Transformer.logits(self, self.norm(x))  # type: ignore[arg-type]
        if carries_bias:
            if isinstance(table, DTensor):  # heads split by TP: each TP rank passes its own heads on
                table = table.to_local()
            # a copy, not a view: under FSDP stage 0's table is the unsharded parameter, freed after the forward
            return x, table.clone()
        return x


    def _meta_outputs(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The outputs' shapes for torch's shape inference, which before 2.13 runs the stage on meta tensors
        (the MoE's data-dependent routing cannot run there)."""
        x = args[0]
        B, T = x.shape[:2]
        if self.is_first:
            h = torch.empty(B, T, self.config.d_model, dtype=self.embed.weight.dtype, device="meta")
        else:
            h = torch.empty_like(x)
        if self.is_last:
            return torch.empty(B, T, self.config.vocab_size, dtype=h.dtype, device="meta")
        if self.rel_buckets is None:
            return h
        table = self.rel_bias.weight if self.is_first else args[1]
        if isinstance(table, DTensor):
            table = table.to_local()
        return h, torch.empty_like(table, device="meta")


def split_model(model: Transformer, dims: ParallelDims, pp_rank: int,
                aux_loss_fn: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
                loss_scale: float = 1.0) -> list[StagePart]:
    """The stage parts pipeline rank `pp_rank` runs, in stage order. The model is checked against the layout."""
    dims.check_model(model.config)
    runs = stage_layers(model.config.n_layers, dims.n_stages)
    return [StagePart(model, s, dims.n_stages, runs[s], aux_loss_fn, loss_scale) for s in stage_ids(dims, pp_rank)]


@dataclass
class PipelineParts:
    schedule: object  # a torch.distributed.pipelining schedule
    stages: list[PipelineStage]
    model_parts: list[nn.Module]
    has_first_stage: bool
    has_last_stage: bool
    pp_group: dist.ProcessGroup
    n_microbatches: int
    tied: bool = False  # tied embeddings: the first and last pipeline ranks both hold `embed`

    def step(self, input_ids: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        """One forward + backward over the rank's batch (split into the schedule's micro-batches); gradients are
        accumulated into the parts' parameters (zero them before). The first stage needs input_ids, the last
        stage labels (others may pass None). Returns the step's loss on every pipeline rank (detached): the
        sum of the scaled micro-batch losses of the last stage and every stage's router-loss share."""
        for part in self.model_parts:
            part.aux_values.clear()
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first_stage else ()
        kw = {"target": labels, "losses": losses} if self.has_last_stage else {}
        self.schedule.step(*args, **kw)
        self.sync_tied_grads()
        share = torch.zeros((), dtype=torch.float32, device=self.stages[0].device)
        for t in losses:
            share = share + t.detach().float()
        for part in self.model_parts:
            # the last n_microbatches entries: torch's metadata inference may run one extra forward first
            for t in part.aux_values[len(part.aux_values) - self.n_microbatches:]:
                share = share + t.float()
        dist.all_reduce(share, group=self.pp_group)
        return share

    def sync_tied_grads(self) -> None:
        """Sum the tied embedding's gradient of the first and last pipeline ranks into both (no-op untied, or
        when one rank holds both). Called by `step`; call it yourself after driving the schedule directly."""
        if not self.tied:
            return
        pp = dist.get_world_size(self.pp_group)
        me = dist.get_rank(self.pp_group)
        holders = [p for p in self.model_parts if p.embed is not None]
        if pp == 1 or not holders or me not in (0, pp - 1):
            return
        w = holders[0].embed.weight
        g = w.grad
        if g is None:
            g = w.grad = torch.zeros_like(w)
        local = g.to_local() if isinstance(g, DTensor) else g
        other = torch.empty_like(local)
        peer = dist.get_global_rank(self.pp_group, pp - 1 if me == 0 else 0)
        ops = [dist.P2POp(dist.isend, local.contiguous(), peer, self.pp_group),
               dist.P2POp(dist.irecv, other, peer, self.pp_group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        first, last = (local, other) if me == 0 else (other, local)
        local.copy_(first + last)  # the same order on both ranks: bitwise equal copies


def build_schedule(parts: Sequence[StagePart] | Sequence[nn.Module], dims: ParallelDims,
                   pp_mesh: DeviceMesh | dist.ProcessGroup, loss_fn: Callable[[torch.Tensor, torch.Tensor],
                                                                           torch.Tensor],
                   n_microbatches: int, *, loss_scale: float | None = None,
                   device: torch.device | None = None) -> PipelineParts:
    """PipelineStages for this rank's (possibly FSDP/TP-wrapped) parts and the schedule `dims.pp_schedule`.
    loss_fn(logits, labels) is the micro-batch loss; it is multiplied by loss_scale (default 1/n_microbatches)."""
    group = pp_mesh.get_group() if isinstance(pp_mesh, DeviceMesh) else pp_mesh
    if dist.get_world_size(group) != dims.pp:
        raise LayoutError(f"the pipeline group has {dist.get_world_size(group)} ranks, --pp is {dims.pp}")
    if n_microbatches < 1 or (dims.pp_schedule != "gpipe" and n_microbatches < dims.pp):
        raise LayoutError(f"--pp-schedule {dims.pp_schedule} with --pp {dims.pp} needs at least {dims.pp} "
                          f"micro-batches (got {n_microbatches})")
    scale = 1.0 / n_microbatches if loss_scale is None else loss_scale
    if device is None:
        p = next(iter(parts[0].parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        if isinstance(p, DTensor):
            device = p.device
    stages = [PipelineStage(part, part.stage_index, dims.n_stages, device, group=group) for part in parts]

    def scaled_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(out, target) * scale

    cls = SCHEDULES[dims.pp_schedule]
    if dims.stages_per_rank == 1 and dims.pp_schedule != "interleaved1f1b":
        schedule = cls(stages[0], n_microbatches=n_microbatches, loss_fn=scaled_loss, scale_grads=False)
    else:
        if dims.pp_schedule != "interleaved1f1b":
            raise LayoutError(f"--pp-schedule {dims.pp_schedule} runs one stage per rank (got "
                              f"{dims.stages_per_rank}); use interleaved1f1b")
        schedule = cls(stages, n_microbatches=n_microbatches, loss_fn=scaled_loss, scale_grads=False)
    for part in parts:
        part.loss_scale = scale
    return PipelineParts(schedule, stages, list(parts), any(s.is_first for s in stages),
                         any(s.is_last for s in stages), group, n_microbatches, parts[0].config.tie_embeddings)


def pipeline_model(model: Transformer, dims: ParallelDims, pp_mesh: DeviceMesh,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_microbatches: int, *,
                   parallelize_fn: Callable[[StagePart], nn.Module | None] | None = None,
                   aux_loss_fn: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
                   loss_scale: float | None = None,
                   materialize_fn: Callable[[list[StagePart]], object] | None = None) -> PipelineParts:
    """split_model -> parallelize_fn(part) on each (in place, e.g. lambda p: parallelize(p, dims, mesh)) ->
    materialize_fn(parts) -> build_schedule. The model's layers outside this rank's stages are left to the garbage
    collector once the caller drops `model`. A meta-built model is split and parallelized on the meta device;
    materialize_fn (e.g. giants.parallel.init.materialize_sharded over the parts) then allocates this rank's
    shards, before the stages read the parameters' device."""
    parts = split_model(model, dims, pp_mesh.get_local_rank(), aux_loss_fn)
    if parallelize_fn is not None:
        for part in parts:
            parallelize_fn(part)
    if materialize_fn is not None:
        materialize_fn(parts)
    return build_schedule(parts, dims, pp_mesh, loss_fn, n_microbatches, loss_scale=loss_scale)


def moe_router_loss_fn(cfg, aux_coef: float, z_coef: float,
                       group: dist.ProcessGroup | DeviceMesh | None = None
                       ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """aux_loss_fn for a pipeline stage: this stage's share of aux_coef * mean-over-MoE-layers load-balancing loss
    + z_coef * mean z-loss, over the data-parallel `group`'s tokens (giants.parallel.expert.router_losses_global)
    or the rank's own (group None)."""
    from giants.parallel.expert import router_losses_global
    from giants.train.losses import router_losses

    n_moe = cfg.n_layers  # every block is MoE in an MoE model

    def fn(router_logits: list[torch.Tensor]) -> torch.Tensor:
        if group is None:
            rl = router_losses(router_logits, cfg.experts_per_token)
        else:
            rl = router_losses_global(router_logits, cfg.experts_per_token, group)
        share = len(router_logits) / n_moe
        return (aux_coef * rl.aux_loss + z_coef * rl.z_loss) * share

    return fn
