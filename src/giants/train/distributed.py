"""The scale-out path of `giants train`: torchrun's processes composed the way torchtitan composes them.

Taken when the process was launched by torchrun with WORLD_SIZE > 1, or when any of --dp-shard / --dp-replicate /
--tp / --pp / --ep is given; otherwise nothing here runs and the one-device Trainer is unchanged.

Order (giants.train.trainer.Trainer.__init__):
    1. `plan(cfg, model_config)`: the degrees (ParallelDims.infer over WORLD_SIZE) checked against the model and
       the batch before any process group or weight exists: a bad layout exits at once, naming field and numbers.
    2. `start(cfg, dims)`: the process group (its timeout bounds every collective, so a dead rank becomes an error
       instead of a hang) and the device mesh (giants.parallel.mesh).
    3. every rank builds the model on the meta device (nothing allocated), then `Distributed.parallelize` applies
       the plan, in ONE place: the pipeline split (pp > 1, giants.parallel.pipeline), then tensor / expert
       parallel and FSDP (giants.parallel.plan.parallelize), all on meta; then each rank allocates only its
       shards and fills them with its slice of the weights one process would build from the same seed
       (giants.parallel.init.materialize_sharded: peak memory its shards plus one full parameter). With --init
       the shards are filled from the checkpoint instead, one full tensor at a time in host memory
       (giants.parallel.init_checkpoint: the same peak; FP8 checkpoints refused by name).
    4. `Distributed.optimizer`: torch's AdamW over the DTensor parameters.

What falls back, and why (each is said in the startup line, never silently):
    - MasterAdamW and its Triton update, the tied-head shadow and the fused head + loss work on whole local
      tensors, not DTensors: torch's AdamW (fused, else foreach) updates the fp32 shards; under bf16 FSDP's
      mixed precision (bf16 compute copies gathered from fp32 shards, fp32 gradient reduction) plays the part of
      master weights.
    - the loss is the plain fp32 cross-entropy, vocab-parallel under tensor parallelism
      (giants.parallel.loss.cross_entropy: the full logits are never gathered).
    - torch.compile compiles each block (giants.parallel.plan) instead of the whole loss function.
    - --activation-checkpointing: the blocks' checkpointing is the plan's.
What cannot be honoured is refused by `plan` (never dropped): --residual-dtype bf16 (FSDP's param dtype decides
the compute dtype), a compile backend other than inductor or a compile mode (the plan compiles each block),
--lora-rank, --task dpo with --pp.

Data: --batch-size is the job's micro-batch. Every rank reads the whole micro-batch one process would read and
keeps its data-parallel rank's rows (batch_size / dp of them), so the job computes exactly the one-process loss:
the sum of the token losses over the global batch divided by its target tokens (counted before the forward),
each rank backpropagating its share x dp since FSDP averages gradients over the data-parallel ranks. Every
rank's reader is in the same position, so the data position in a checkpoint is the one-process one and a run
resumes on any layout.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from giants.config import ModelConfig
from giants.parallel.layout import LayoutError, ParallelDims
from giants.train.config import TrainConfig
from giants.train.losses import IGNORE_INDEX, dpo_loss, sequence_logprobs

# Test hook: the rank GIANTS_TEST_KILL_RANK exits (os._exit(1)) during step GIANTS_TEST_KILL_STEP, after its first
# micro-batch's backward, as a crashed process would: the job must stop with that rank named and nothing hanging.
KILL_RANK_ENV, KILL_STEP_ENV = "GIANTS_TEST_KILL_RANK", "GIANTS_TEST_KILL_STEP"
# Test hook: the rank GIANTS_TEST_SIGNAL_RANK sends itself SIGTERM during step GIANTS_TEST_SIGNAL_STEP (at the same
# point): one rank signalled, and every rank must stop after that step with one sharded checkpoint.
SIGNAL_RANK_ENV, SIGNAL_STEP_ENV = "GIANTS_TEST_SIGNAL_RANK", "GIANTS_TEST_SIGNAL_STEP"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def wanted(cfg: TrainConfig) -> bool:
    """Whether this run takes the scale-out path: launched by torchrun with several processes, or any degree given."""
    return world_size() > 1 or cfg.parallel_requested()


def plan(cfg: TrainConfig, mc: ModelConfig) -> ParallelDims:
    """The job's degrees, checked against the world, the model and the batch, before any process group exists."""
    from giants.parallel.plan import check_plan

    dims = ParallelDims.infer(world_size(), dp_replicate=cfg.dp_replicate,
                              dp_shard=-1 if cfg.dp_shard is None else cfg.dp_shard, tp=cfg.tp, pp=cfg.pp, ep=cfg.ep,
                              pp_schedule=cfg.pp_schedule)
    check_plan(dims, mc)
    if cfg.batch_size % dims.dp:
        raise LayoutError(f"--batch-size {cfg.batch_size} is not divisible by the data-parallel degree "
                          f"dp_replicate*dp_shard = {dims.dp_replicate}*{dims.dp_shard} = {dims.dp} (each "
                          "data-parallel rank computes batch_size / dp rows of every micro-batch)")
    if dims.tp > 1 and cfg.task == "lm" and cfg.seq_len % dims.tp:
        raise LayoutError(f"--seq-len {cfg.seq_len} is not divisible by --tp {dims.tp} (sequence parallelism splits "
                          "the positions)")
    if dims.pp > 1:
        n = pp_microbatches(cfg, dims)
        local = cfg.batch_size // dims.dp
        if local % n:
            raise LayoutError(f"--pp {dims.pp}: each data-parallel rank's {local} rows of a micro-batch "
                              f"(--batch-size {cfg.batch_size} / dp {dims.dp}) do not split into {n} pipeline "
                              "micro-batches (--pp-microbatches)")
        if cfg.task == "dpo":
            raise LayoutError("--task dpo with --pp: the preference loss pairs rows across pipeline micro-batches; "
                              "use --dp-shard / --tp")
    # Options the scale-out path cannot honour are refused, never dropped.
    if cfg.residual_dtype != "fp32":
        raise LayoutError(f"--residual-dtype {cfg.residual_dtype} under scale-out: the compute dtype is FSDP's param "
                          "dtype (--precision); leave --residual-dtype at fp32")
    if isinstance(cfg.compile, str) and cfg.compile != "inductor":
        raise LayoutError(f"compile backend {cfg.compile!r} under scale-out: the plan compiles each block with "
                          "inductor; pass --compile without a backend")
    if cfg.compile_mode not in (None, "default"):
        raise LayoutError(f"--compile-mode {cfg.compile_mode} under scale-out: the plan compiles each block in the "
                          "default mode")
    if cfg.lora_rank:
        raise LayoutError("--lora-rank under scale-out: the parallel plans split the base layers by name and do not "
                          "know the adapters; train LoRA on one device")
    return dims


def pp_microbatches(cfg: TrainConfig, dims: ParallelDims) -> int:
    return cfg.pp_microbatches or dims.pp * dims.stages_per_rank


def announce(d: Distributed) -> None:
    """The startup line on rank 0: the layout, and everything that falls back from the one-device path."""
    if d.rank == 0:
        print(f"giants train: {d.describe()}; " + "; ".join(d.notes), file=sys.stderr, flush=True)


def start(cfg: TrainConfig, dims: ParallelDims) -> Distributed:
    """The process group (timeout cfg.dist_timeout_s) and the mesh."""
    from giants.parallel.mesh import build_mesh, init_distributed

    if cfg.device == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = torch.device(cfg.device).type
    info = init_distributed(cfg.dist_timeout_s, device_type=device_type)
    mesh = build_mesh(dims, info.device.type)
    return Distributed(dims, mesh, info.rank, info.world_size, info.device)


class _Stages(nn.Module):
    """The pipeline stages this rank runs, under the whole model's parameter names (embed, layers.<i>, norm,
    lm_head, rel_bias): the module the optimizer and the checkpoints see. Never called: the schedule runs the parts."""

    def __init__(self, parts: list[nn.Module], config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({k: v for p in parts for k, v in p.layers.items()})
        for name in ("embed", "norm", "lm_head", "rel_bias"):
            mod = next((getattr(p, name) for p in parts if getattr(p, name, None) is not None), None)
            setattr(self, name, mod)


@dataclass
class Distributed:
    dims: ParallelDims
    mesh: Any  # DeviceMesh
    rank: int
    world: int
    device: torch.device
    notes: list[str] = field(default_factory=list)
    materialized: Any = None  # giants.parallel.init.Materialized of the trained model (meta-built runs)
    pipeline: Any = None  # giants.parallel.pipeline.PipelineParts when pp > 1
    fsdp: bool = False
    bf16: bool = False

    def __post_init__(self) -> None:
        from giants.parallel.mesh import dp_coords, mesh_dim

        self.dp_rank, self.dp = dp_coords(self.mesh)
        dp_mesh = mesh_dim(self.mesh, "dp")
        self.dp_group = None if dp_mesh is None else dp_mesh.get_group()
        pp_mesh = mesh_dim(self.mesh, "pp")
        self.pp_mesh = pp_mesh
        self.pp_group = None if pp_mesh is None else pp_mesh.get_group()
        self._denominator = 1.0  # the pipeline's loss: a micro-batch's summed token losses over this, set each step

    # ---- layout ----------------------------------------------------------------------------------
    def describe(self) -> str:
        d = self.dims
        return (f"scale-out over {self.world} processes: pp {d.pp} x dp_replicate {d.dp_replicate} x dp_shard "
                f"{d.dp_shard} x tp {d.tp} (ep {d.ep}" + (f", {d.pp_schedule}" if d.pp > 1 else "") +
                f") on {self.device.type}")

    def to_dict(self) -> dict[str, Any]:
        d = self.dims
        return {"world_size": self.world, "pp": d.pp, "dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard,
                "tp": d.tp, "ep": d.ep, "pp_schedule": d.pp_schedule if d.pp > 1 else None, "fallbacks": self.notes}

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This data-parallel rank's rows of a micro-batch (batch_size / dp of them)."""
        b = t.shape[0] // self.dp
        return t[self.dp_rank * b:(self.dp_rank + 1) * b]

    def items(self, items: list[Any]) -> list[Any]:
        b = len(items) // self.dp
        return items[self.dp_rank * b:(self.dp_rank + 1) * b]

    def pad_len(self, T: int) -> int:
        """Sequence parallelism splits positions over tp ranks: collated SFT/DPO rows are padded to a multiple."""
        tp = self.dims.tp
        return T if tp == 1 else -(-T // tp) * tp

    # ---- the model -------------------------------------------------------------------------------
    def setup_notes(self, cfg: TrainConfig, bf16: bool) -> None:
        notes = self.notes
        self.bf16 = bf16
        notes.append("loss: plain fp32 cross-entropy" + (" (vocab-parallel)" if self.dims.tp > 1 else "") +
                     " instead of the tied-head / fused head+loss kernels")
        if cfg.compile:
            notes.append("compile: each block (torch.compile of the whole loss is one-device only)")
        if self.dims.pp > 1:
            notes.append("evaluation skipped under --pp (the schedule trains only)")
        notes.append("memory check skipped (the one-device estimate does not know the layout)")
        if cfg.init is None:
            notes.append("model built on the meta device; each rank allocates and initialises only its shards")
        else:
            notes.append("model built on the meta device; --init: each rank allocates only its shards and fills "
                         "them from the checkpoint, one full tensor at a time")

    def parallelize(self, tr: Any, model: nn.Module, *, frozen: bool = False) -> nn.Module:
        """Apply the plan to `model`: the pipeline split (pp > 1), then TP / EP / FSDP on each part. Returns the
        module the optimizer and the checkpoints see (the model itself, or this rank's stages)."""
        from giants.parallel.mesh import fsdp_mesh
        from giants.parallel.plan import parallelize

        cfg = tr.cfg
        self.fsdp = fsdp_mesh(self.mesh) is not None or self.dims.ep > 1 or cfg.fsdp_always
        param_dtype = torch.bfloat16 if self.bf16 and self.fsdp else None
        compile_ = bool(cfg.compile) and not frozen

        def apply(part: nn.Module) -> nn.Module:
            return parallelize(part, self.dims, self.mesh, param_dtype=param_dtype, reduce_dtype=torch.float32,
                               compile=compile_, activation_checkpointing=cfg.activation_checkpointing,
                               fsdp_always=cfg.fsdp_always)

        from giants.parallel.init import is_meta, materialize_sharded

        meta = is_meta(model)

        def materialize(parts: Any) -> None:
            if cfg.init is not None:
                from giants.parallel.init_checkpoint import materialize_from_checkpoint

                st = materialize_from_checkpoint(parts, cfg.init, tr.model_config, self.device)
            else:
                st = materialize_sharded(parts, tr.model_config, cfg.seed, self.device)
            if not frozen:
                self.materialized = st

        if self.dims.pp == 1:
            model = apply(model)
            if meta:
                materialize(model)
            if cfg.fsdp_always and self.dims.dp == 1 and not frozen:
                from torch.distributed.tensor import DTensor

                n = sum(isinstance(p, DTensor) for p in model.parameters())  # what the wrap did, not what was asked
                self.notes.append(f"FSDP2 over one data-parallel rank (--fsdp-always): {n} DTensor parameters")
            return model
        from giants.parallel.pipeline import moe_router_loss_fn, pipeline_model

        mc = tr.model_config
        n = pp_microbatches(cfg, self.dims)
        aux = None
        if mc.is_moe and (tr.aux_coef or tr.z_coef):
            fn = moe_router_loss_fn(mc, tr.aux_coef, tr.z_coef, self.dp_group)
            scale = 1.0 / (n * cfg.grad_accum)

            def aux(router_logits: list[torch.Tensor]) -> torch.Tensor:
                return fn(router_logits) * scale

        self.pipeline = pipeline_model(model, self.dims, self.pp_mesh, self._pipeline_loss, n, parallelize_fn=apply,
                                       aux_loss_fn=aux, loss_scale=1.0,
                                       materialize_fn=materialize if meta else None)
        return _Stages(self.pipeline.model_parts, mc)

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from giants.parallel.loss import cross_entropy

        return cross_entropy(logits, labels, reduction="sum") / self._denominator

    def optimizer(self, groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
        kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        try:
            opt = torch.optim.AdamW(groups, fused=True, **kw)
            kind = "fused"
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(groups, foreach=True, **kw)
            kind = "foreach"
        mp = "; fp32 shards, bf16 compute through FSDP mixed precision" if self.bf16 and self.fsdp else ""
        self.notes.insert(0, f"optimizer: torch AdamW ({kind}{mp}) instead of MasterAdamW and its Triton update "
                             "(they update whole local tensors, not DTensor shards)")
        return opt

    def autocast(self) -> Any:
        """bf16 autocast where FSDP's mixed precision does not cast (no data-parallel sharding)."""
        if self.bf16 and not self.fsdp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    # ---- the step --------------------------------------------------------------------------------
    def _sum_dp(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp_group is not None:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def _maybe_die(self, step: int) -> None:
        if os.environ.get(KILL_RANK_ENV) == str(self.rank) and os.environ.get(KILL_STEP_ENV) == str(step):
            print(f"giants train: rank {self.rank} exits during step {step} ({KILL_RANK_ENV} test hook)",
                  file=sys.stderr, flush=True)
            os._exit(1)
        if os.environ.get(SIGNAL_RANK_ENV) == str(self.rank) and os.environ.get(SIGNAL_STEP_ENV) == str(step):
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    def _lm_loss(self, tr: Any, micro: Any, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """(loss to backward, this rank's share of the step's CE, router terms as reported, info)."""
        from giants.parallel.expert import router_losses_global
        from giants.parallel.loss import cross_entropy

        mc = tr.model_config
        with self.autocast():
            out = tr.model(micro.x, output_router_logits=mc.is_moe, check=False)
        logits, rl = out if mc.is_moe else (out, None)
        ce_sum = cross_entropy(logits, micro.y, reduction="sum")
        loss = ce_sum * (self.dp / total)
        info: dict[str, Any] = {}
        extra = torch.zeros((), device=self.device)
        if rl:
            r = router_losses_global(rl, mc.experts_per_token, self.dp_group, token_mask=micro.mask)
            w = micro.targets / total
            router = w * (tr.aux_coef * r.aux_loss + tr.z_coef * r.z_loss)
            loss = loss + router
            extra = router.detach().float()
            info["router"] = r
        return loss, ce_sum.detach().float() / total, extra, info

    def _dpo_loss(self, tr: Any, micro: Any, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        ids, labels = self._collate_pairs(tr, micro.pairs)
        B = len(micro.pairs)
        with self.autocast():
            logp = sequence_logprobs(_full(tr.model(ids, check=False)), labels)
            with torch.no_grad():
                ref = sequence_logprobs(_full(tr.reference(ids, check=False)), labels)
        out = dpo_loss(logp[:B], logp[B:], ref[:B], ref[B:], tr.cfg.dpo_beta)
        share = out.loss * (micro.local / total)
        info = {"margin": out.margin.detach().float(), "accuracy": out.accuracy.detach().float()}
        return share * self.dp, share.detach().float(), torch.zeros((), device=self.device), info

    def _collate_pairs(self, tr: Any, pairs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from giants.train.finetune_data import collate

        ids, labels, _ = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], tr.cfg.seq_len, tr.pad_id)
        ids, labels, _ = pad_rows(ids, labels, None, self.pad_len(ids.shape[1]), tr.pad_id)
        return ids.to(self.device), labels.to(self.device)

    def launch_step(self, tr: Any) -> Any:
        """One optimizer step of the job (every rank in lockstep); returns giants.train.step.Launched."""
        from giants.train.step import Launched

        cfg = tr.cfg
        tr.model.train()
        lr = tr._set_lr()
        micros = [tr._read_micro() for _ in range(cfg.grad_accum)]
        total = sum(m.targets for m in micros)  # the step's targets over the whole job (all known locally)
        ce = torch.zeros((), device=self.device)
        extra = torch.zeros((), device=self.device)
        extras: list[dict[str, Any]] = []
        for i, micro in enumerate(micros):
            if self.pipeline is not None:
                self._denominator = total / self.dp
                p = self.pipeline
                share = p.step(micro.x if p.has_first_stage else None, micro.y if p.has_last_stage else None)
                ce += share.float() / self.dp
            else:
                fn = self._dpo_loss if micro.pairs is not None else self._lm_loss
                loss, c, x, info = fn(tr, micro, total)
                loss.backward()
                ce += c
                extra += x
                extras.append(info)
            if i == 0:
                self._maybe_die(tr.step + 1)
        red = torch.stack([ce, *([torch.stack([e["margin"] for e in extras]).mean(),
                                  torch.stack([e["accuracy"] for e in extras]).mean()] if cfg.task == "dpo" else [])])
        red = self._sum_dp(red)
        if cfg.task == "dpo":
            for e in extras:
                e["margin"], e["accuracy"] = red[1] / self.dp, red[2] / self.dp
        ce = red[0]
        gnorm = self.clip(tr.train_params, cfg.grad_clip)
        scalars = torch.stack([ce + extra, gnorm.float().to(ce.device), ce])
        rec = Launched(step=tr.step + 1, lr=lr, tokens=sum(m.tokens for m in micros), tokens_before=tr.tokens_seen)
        loss_f, gnorm_v, _ = scalars.tolist()
        if not (math.isfinite(loss_f) and math.isfinite(gnorm_v)):
            tr.optimizer.zero_grad(set_to_none=True)
            tr._diverged_error(rec, loss_f, gnorm_v)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        return tr._launched(rec, scalars, extras)

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global gradient norm (over every DTensor shard and every pipeline stage), clipping to max_norm > 0.
        Gradients on different meshes (experts under --ep) are reduced and scaled a mesh at a time: DTensor's
        foreach ops take one mesh."""
        from torch.distributed.tensor import DTensor

        by_mesh: dict[Any, list[torch.Tensor]] = {}
        for p in params:
            g = p.grad
            if g is None:
                continue
            key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
            by_mesh.setdefault(key, []).append(p)
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        for group in by_mesh.values():
            n = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, foreach=True)
            if isinstance(n, DTensor):
                n = n.full_tensor()
            sq = sq + n.float().to(self.device) ** 2
        if self.pp_group is not None:
            dist.all_reduce(sq, group=self.pp_group)
        norm = sq.sqrt()
        if max_norm > 0:
            for group in by_mesh.values():
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
        return norm

    # ---- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, tr: Any) -> dict[str, float] | None:
        """The one-process validation numbers over the full eval batches, each data-parallel rank on its rows."""
        from giants.parallel.loss import cross_entropy
        from giants.train.finetune_data import collate

        cfg = tr.cfg
        if self.pipeline is not None:
            return None
        B = cfg.batch_size
        tr.model.eval()
        total = torch.zeros((2,), dtype=torch.float64, device=self.device)
        try:
            if cfg.task == "lm" and tr.val_reader is not None:
                n = (min(cfg.eval_batches * B, tr.val_reader.n_windows) // B) * B
                for start in range(0, n, B):
                    x, y = tr.val_reader.rows(torch.arange(start, start + B).numpy())
                    with self.autocast():
                        logits = tr.model(self.rows(x).to(self.device), check=False)
                    total[0] += cross_entropy(logits, self.rows(y).to(self.device), reduction="sum").double()
                    total[1] += self.rows(y).numel()
            elif cfg.task in ("sft", "dpo") and getattr(tr, "val_items", None):
                items = tr.val_items[:cfg.eval_batches * B]
                items = items[:len(items) // B * B]
                if not items:
                    return None
                if cfg.task == "dpo":
                    margins = torch.zeros((), dtype=torch.float64, device=self.device)
                    for i in range(0, len(items), B):
                        pairs = self.items(items[i:i + B])
                        ids, labels = self._collate_pairs(tr, pairs)
                        with self.autocast():
                            logp = sequence_logprobs(_full(tr.model(ids, check=False)), labels)
                            ref = sequence_logprobs(_full(tr.reference(ids, check=False)), labels)
                        k = len(pairs)
                        margins += ((logp[:k] - ref[:k]) - (logp[k:] - ref[k:])).double().mean()
                    margins = self._sum_dp(margins) / self.dp
                    return {"val_margin": float(margins) / (len(items) // B)}
                for i in range(0, len(items), B):
                    ids, labels, _ = collate(items[i:i + B], cfg.seq_len, tr.pad_id)
                    ids, labels, _ = pad_rows(ids, labels, None, self.pad_len(ids.shape[1]), tr.pad_id)
                    mine = self.rows(labels)
                    with self.autocast():
                        logits = tr.model(self.rows(ids).to(self.device), check=False)
                    total[0] += cross_entropy(logits, mine.to(self.device), reduction="sum").double()
                    total[1] += int((mine != IGNORE_INDEX).sum())
            else:
                return None
        finally:
            tr.model.train()
        total = self._sum_dp(total)
        if not total[1]:
            return None
        val = float(total[0] / total[1])
        tr.last_val = val
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    # ---- collectives for the rest of the trainer -------------------------------------------------
    def barrier(self) -> None:
        dist.barrier()

    def agree(self, *values: float) -> list[float]:
        """The maximum of each value over every rank (the step boundary's stop signal and checkpoint-time flags)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def close(self, orderly: bool = False) -> None:
        """orderly: the run ended normally on every rank (see parallel.mesh.shutdown_distributed)."""
        from giants.parallel.mesh import shutdown_distributed

        shutdown_distributed(orderly)


def _full(logits: torch.Tensor) -> torch.Tensor:
    """Whole logits (DPO's per-sequence log-probabilities read every vocabulary entry)."""
    from torch.distributed.tensor import DTensor

    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def pad_rows(ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, T: int, pad_id: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad collated rows to T positions (padding is never a target and never seen by a real token)."""
    extra = T - ids.shape[1]
    if extra <= 0:
        return ids, labels, mask
    f = torch.nn.functional.pad
    return (f(ids, (0, extra), value=pad_id), f(labels, (0, extra), value=IGNORE_INDEX),
            None if mask is None else f(mask, (0, extra), value=False))
