"""The training loop: pretraining (causal LM), SFT and DPO, optionally through LoRA adapters; on one device or,
under torchrun or with parallel degrees, scaled out (giants.train.distributed).

    from giants.train import TrainConfig, train
    summary = train(TrainConfig(out="runs/mix", preset="tiny-mixtral", data="shakespeare", steps=200))

RUN_DIR gets run.json (the full configuration), metrics.jsonl (one object per logged step),
checkpoints/step_*/ (see giants.train.checkpoint) and final/ (an HF-format model directory).

The Trainer is assembled here (config -> layout check -> data -> model -> parallel plan -> optimizer -> resume)
and runs the loop; the rest lives one concern a module: giants.train.config (TrainConfig), .step (one
optimizer step, StepMixin), .checkpoint_io (checkpoints and the final model, CheckpointMixin), .metrics
(metrics.jsonl, the progress bar or plain progress lines, throughput and MFU), .stopping (Ctrl-C / SIGTERM: finish
the step, checkpoint, return), .distributed (the scale-out path).

Checkpoints are written every cfg.ckpt_every steps, at the first step cfg.ckpt_minutes after the previous one, at
the end, and when a signal stops the run; at each step boundary one check (one all-reduce under scale-out) decides
the last two for every rank alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from giants.config import ModelConfig
from giants.inference.preflight import available_memory
from giants.train import checkpoint as ckpt
from giants.train import distributed, stopping
from giants.train.checkpoint_io import CheckpointMixin, atomic_write, cached_tokenizer
from giants.train.config import PRECISIONS, TASKS, TrainConfig, TrainingDiverged
from giants.train.data import BatchReader, TokenStream, load_meta
from giants.train.metrics import (
    MetricsLog,
    ProgressBar,
    Throughput,
    flops_per_token,
    json_default,
    peak_flops,
    summarize,
)
from giants.train.metrics import peak_memory as device_peak_memory
from giants.train.optim import MasterAdamW, matmul_weights
from giants.train.step import Launched, StepMixin
from giants.train.stopping import StopSignal

__all__ = ["PRECISIONS", "TASKS", "TrainConfig", "Trainer", "TrainingDiverged", "estimate_memory", "flops_per_token",
           "peak_flops", "resolve_device", "train"]

# where the tied head reads the optimizer's bf16 copy of the embedding (giants.train.tied_head): where it pays
TIED_HEAD_DEVICES: tuple[str, ...] = ("cuda",)
# where the output head and the cross-entropy run as one op (giants.train.cross_entropy.linear_cross_entropy).
# Off: on an H200 its one-kernel loss + gradient ran 1.99-2.94 ms against 1.75 ms for the two-kernel path
# (benchmarks/bench_ce.py), and the step took the same time either way (bench_train_ab.py: 2 programs per SM on
# one machine; at 4 a paired ratio of 1.0091 on one machine and 0.9995 on another).
FUSED_HEAD_CE_DEVICES: tuple[str, ...] = ()


# ---- helpers ---------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return dev


def estimate_memory(cfg: ModelConfig, tc: TrainConfig, bf16: bool, master: bool = False) -> int:
    from giants.analysis.memory import training_memory

    rows = tc.batch_size * (2 if tc.task == "dpo" else 1)
    est = training_memory(cfg, micro_batch=rows, seq_len=tc.seq_len, param_dtype="bf16" if bf16 else "fp32",
                          master_weights=bf16, zero_stage=0, checkpointing=tc.activation_checkpointing)
    total = est.total
    if tc.lora_rank:
        # frozen base: fp32 weights only (adapters, their grads and AdamW state are negligible)
        total = count_total_params(cfg) * 4 + est.activations + est.logits + est.runtime
    if tc.task == "dpo" and tc.lora_rank == 0:
        total += count_total_params(cfg) * (2 if bf16 else 4)  # the frozen reference copy
    if master and tc.grad_accum > 1:
        total += count_total_params(cfg) * 4  # MasterAdamW's fp32 gradient sums (an upper bound: not the norms)
    return int(total)


def count_total_params(cfg: ModelConfig) -> int:
    from giants.analysis.params import count_params

    return count_params(cfg).total


# ---- the trainer -----------------------------------------------------------------------------------

class Trainer(StepMixin, CheckpointMixin):
    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.dist: Any = None  # giants.train.distributed.Distributed under scale-out
        self.model_config: ModelConfig | None = None
        if distributed.wanted(cfg):
            # the layout is checked against the model and the batch before any process group or weight exists
            self.model_config = self._model_config()
            dims = distributed.plan(cfg, self.model_config)
            self._check_out_dir()  # every rank, before the process group's rendezvous lets rank 0 write anything
            self.dist = distributed.start(cfg, dims)
            self.device = self.dist.device
        else:
            self.device = resolve_device(cfg.device)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if self.bf16 else None
        if cfg.residual_dtype == "bf16" and not self.bf16:
            raise ValueError(f"TrainConfig.residual_dtype: 'bf16' needs bf16 precision (this run is fp32 on "
                             f"{self.device.type})")
        self.residual_bf16 = cfg.residual_dtype == "bf16" and self.dist is None
        self._linear_ce = None
        if self.dist is None and self.device.type in FUSED_HEAD_CE_DEVICES:  # (the CPU path never loads Triton)
            from giants.train.cross_entropy import linear_cross_entropy

            self._linear_ce = linear_cross_entropy
        if self.dist is None:
            self.master = self._use_master_weights()
            self._check_out_dir()
        else:
            self.master = False
            self.dist.setup_notes(cfg, self.bf16)

        if self.model_config is None:
            self.model_config = self._model_config()
        mc = self.model_config
        self.aux_coef = mc.moe_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
        self.z_coef = mc.moe_z_loss_coef if cfg.z_loss_coef is None else cfg.z_loss_coef
        if cfg.seq_len > self.model_config.max_context:
            raise ValueError(f"seq_len={cfg.seq_len} is beyond the model's max_context="
                             f"{self.model_config.max_context}")
        if self.dist is None:
            self._check_memory()
        self.tokenizer: Any = None
        self._setup_data()
        self.model = self._build_model()
        self.reference = None
        if cfg.task == "dpo" and cfg.lora_rank == 0:
            self.reference = self._build_model(initial=True).eval().requires_grad_(False)
        self.lora_names: list[str] = []
        if cfg.lora_rank:
            from giants.train.lora import apply_lora

            self.lora_names = apply_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                                         cfg.lora_dropout)
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        if self.dist is not None:  # the parallel plan, applied here and nowhere else
            self.model = self.dist.parallelize(self, self.model)
            if self.reference is not None:
                self.reference = self.dist.parallelize(self, self.reference, frozen=True)
        # Evaluation and DPO run the plain module; the training loss (forward included) is what compiles.
        self.forward = self.model
        if cfg.compile and self.dist is None:
            backend = cfg.compile if isinstance(cfg.compile, str) else "inductor"
            self.loss_fn = torch.compile(self._lm_loss, backend=backend, mode=cfg.compile_mode)
        else:
            self.loss_fn = self._lm_loss
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.param_names, self.train_params, self.optimizer = self._optimizer()
        self._diverged = torch.zeros((), device=self.device)
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, cfg.steps // 10)
        if self.warmup > cfg.steps:
            raise ValueError(f"warmup_steps={self.warmup} exceeds steps={cfg.steps}")
        self.flops_per_token = flops_per_token(mc, cfg.seq_len)
        self.peak = peak_flops(self.device, self.bf16, cfg.peak_tflops)
        self.step = 0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None  # the step of the newest checkpoint this run wrote or resumed from
        self.ckpt_clock = time.monotonic()  # --ckpt-minutes counts from the start, then from each checkpoint
        self.resumed_metrics: dict[str, Any] | None = None  # the last metrics line before the resumed step
        self.last_val: float | None = None
        self.history: list[dict[str, Any]] = []
        self._tb = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if cfg.overwrite:
                self.clear_previous_run()
        if self.dist is not None:
            self.dist.barrier()
        if cfg.resume:
            self._resume()
        if self.is_main:
            self._write_run_json()
        if self.dist is not None:
            distributed.announce(self.dist)

    def _use_master_weights(self) -> bool:
        cfg = self.cfg
        if cfg.master_weights is None:
            return self.bf16 and self.device.type == "cuda" and cfg.lora_rank == 0
        if cfg.master_weights and not self.bf16:
            raise ValueError("TrainConfig.master_weights: needs bf16 precision (fp32 runs keep fp32 weights)")
        if cfg.master_weights and cfg.lora_rank:
            raise ValueError("TrainConfig.master_weights: not with LoRA (the base weights are frozen)")
        return bool(cfg.master_weights)

    def _check_out_dir(self) -> None:
        cfg = self.cfg
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"{self.out}: exists and is not a directory (--out names the run directory)")
        if cfg.resume:
            return
        if cfg.tensorboard:  # refused before anything is written (a failed start would leave a half-made run)
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        if cfg.overwrite:
            return
        metrics = self.out / "metrics.jsonl"
        if ckpt.list_checkpoints(self.out) or (metrics.exists() and metrics.stat().st_size > 0):
            raise ValueError(f"{self.out}: holds a previous run (checkpoints or metrics.jsonl); pass --resume to "
                             "continue it (from its newest checkpoint, or from step 0 if it has none), --overwrite "
                             "to discard it, or choose a new --out")

    def _model_config(self) -> ModelConfig:
        cfg = self.cfg
        if cfg.init is not None:
            mc = self._init_config(cfg.init)
        elif cfg.model_config is not None:
            mc = ModelConfig.from_json(cfg.model_config)
        else:
            from giants.presets import get_config

            mc = get_config(cfg.preset)  # type: ignore[arg-type]
        if cfg.overrides:
            names = {f.name for f in dataclasses.fields(ModelConfig)}
            unknown = sorted(set(cfg.overrides) - names)
            if unknown:
                raise ValueError(f"model overrides: unknown ModelConfig fields {unknown}")
            mc = mc.replace(**cfg.overrides)
        return mc

    @staticmethod
    def _init_config(source: str) -> ModelConfig:
        from giants.checkpoint.loading import load_config

        return load_config(source)

    def _check_memory(self) -> None:
        need = estimate_memory(self.model_config, self.cfg, self.bf16, self.master)
        have = (int(self.cfg.memory_limit_gb * 2**30) if self.cfg.memory_limit_gb is not None
                else available_memory(self.device))
        if need > have:
            raise ValueError(f"this model needs about {need / 2**30:.1f} GiB to train at micro-batch "
                             f"{self.cfg.batch_size} x seq_len {self.cfg.seq_len} (weights, grads, AdamW state, "
                             f"activations: giants.analysis.memory.training_memory) but only {have / 2**30:.1f} GiB "
                             f"is available on {self.device}; use a smaller model, batch or --seq-len, or "
                             "--activation-checkpointing")

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.val_reader = None
        if cfg.task == "lm":
            from giants.train.corpus import resolve_data

            path = resolve_data(cfg.data, cfg.tokenizer, progress=cfg.progress)
            meta = load_meta(path)
            if meta["vocab_size"] > self.model_config.vocab_size:
                raise ValueError(f"{path}: tokenised with a vocabulary of {meta['vocab_size']} but the model has "
                                 f"vocab_size={self.model_config.vocab_size}")
            self.data_path, self.data_fingerprint = path, meta["fingerprint"]
            self.reader = BatchReader(TokenStream(path, "train", meta), cfg.batch_size, cfg.seq_len, seed=cfg.seed)
            self.val_reader = BatchReader(TokenStream(path, "val", meta), cfg.batch_size, cfg.seq_len, shuffle=False)
            if meta.get("tokenizer") and meta["tokenizer"] != "bytes":
                self._tokenizer_source = meta["tokenizer"]
            else:
                self._tokenizer_source = None
            return
        from giants.train.finetune_data import ExampleReader, load_dpo, load_sft

        self.tokenizer = cached_tokenizer(cfg.tokenizer)
        self._tokenizer_source = cfg.tokenizer
        loader = load_sft if cfg.task == "sft" else load_dpo
        items = loader(cfg.data, self.tokenizer)
        self.data_path = Path(cfg.data)
        self.data_fingerprint = hashlib.sha256(self.data_path.read_bytes()).hexdigest()[:16]
        self.reader = ExampleReader(items, cfg.batch_size, seed=cfg.seed)
        if cfg.val_data:
            self.val_items = loader(cfg.val_data, self.tokenizer)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(self.tokenizer, "eos_token_id", None) or 0)

    def _build_model(self, initial: bool = False) -> torch.nn.Module:
        import giants

        cfg = self.cfg
        if cfg.init is not None:
            if cfg.overrides:
                raise ValueError("model overrides (--set) cannot change the architecture of --init weights")
            if self.dist is None:
                return giants.load(cfg.init, dtype=torch.float32, device=self.device)
            # nothing allocated: each rank fills its shards from the checkpoint, one full tensor at a time
            # (Distributed.parallelize -> giants.parallel.init_checkpoint)
            from giants.checkpoint.loading import meta_model

            model = meta_model(self.model_config)
        elif self.dist is not None:
            # nothing allocated: the plan shards the meta model, then each rank materialises its shards with the
            # seed's weights (Distributed.parallelize -> giants.parallel.init)
            model = giants.build(self.model_config, device="meta")
        else:
            model = giants.build(self.model_config, device=self.device, seed=cfg.seed)
        return model

    def _optimizer(self) -> tuple[list[str], list[torch.nn.Parameter], torch.optim.Optimizer]:
        cfg = self.cfg
        self.tied_head: torch.nn.Parameter | None = None  # set when the optimizer keeps its bf16 copy
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters")
        # Decay matrices (and stacked expert tensors); not norms, biases, sinks or the relative bias table.
        decay = [(n, p) for n, p in named if p.dim() >= 2 and "rel_bias" not in n]
        ids = {id(p) for _, p in decay}
        no_decay = [(n, p) for n, p in named if id(p) not in ids]
        groups = [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
                  {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
        names = [n for n, _ in decay] + [n for n, _ in no_decay]
        params = [p for _, p in decay] + [p for _, p in no_decay]
        if self.master:
            trainable = {id(p) for p in params}
            cast = [p for p in matmul_weights(self.model) if id(p) in trainable]
            tied = self._tied_weight()
            shadow = [tied] if tied is not None and id(tied) in trainable else []
            self.tied_head = tied if shadow else None
            opt: torch.optim.Optimizer = MasterAdamW(groups, cast=cast, shadow=shadow, lr=cfg.lr,
                                                     betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
            return names, params, opt
        if self.dist is not None:
            return names, params, self.dist.optimizer(groups, cfg)
        fused = self.device.type in ("cuda", "cpu")
        try:
            opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        return names, params, opt

    def _tied_weight(self) -> torch.nn.Parameter | None:
        """The tied embedding/head weight that the training loss reads through giants.train.tied_head (with
        master weights, on the devices in TIED_HEAD_DEVICES), else None."""
        m = self.model
        if not self.master or self.device.type not in TIED_HEAD_DEVICES or m.lm_head is not None:
            return None
        return m.embed.weight

    # ---- the loop ---------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes run.json, metrics.jsonl and draws the bar."""
        return self.dist is None or self.dist.rank == 0

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to `until` (default: cfg.steps) optimizer steps. Returns a summary. SIGINT / SIGTERM stop the run
        cleanly (giants.train.stopping): the step finishes, a checkpoint is written, summary["stopped"] names the
        signal and no final model is written (resuming writes it)."""
        cfg = self.cfg
        end = cfg.steps if until is None else min(until, cfg.steps)
        stopped = 0
        if self.step < end:
            with StopSignal(force_on_repeat=self.dist is None, announce=self.is_main) as stop:
                stopped = self._loop(end, stop)
                if not stopped:  # a signal during the last step's evaluation or checkpoint: agreed once more
                    stopped, _ = self._agree(stop)
                    if stopped and self.saved_step != self.step:
                        self.save_checkpoint()
        summary = self.summary()
        if stopped:
            summary["stopped"] = stopping.name(stopped)
        elif self.step >= cfg.steps and cfg.save_final:
            if self.is_main:
                self.clean_stale_exports()
            summary["final"] = str(self.save_final())
        if self.is_main:
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=1, default=json_default))
        return summary

    def _agree(self, stop: StopSignal) -> tuple[int, bool]:
        """At a step boundary: the signal that stops the run (0: none) and whether the --ckpt-minutes interval has
        passed; under scale-out one all-reduce makes every rank's answer the same (any rank's signal stops all)."""
        minutes = self.cfg.ckpt_minutes
        timed = bool(minutes) and time.monotonic() - self.ckpt_clock >= minutes * 60
        signum = stop.signum or 0
        if self.dist is not None:
            signum, timed = self.dist.agree(signum, timed)
        return int(signum), bool(timed)

    def _loop(self, end: int, stop: StopSignal) -> int:
        """The steps up to `end`; returns the signal that stopped them (0: none), after its checkpoint."""
        cfg = self.cfg
        log = MetricsLog(self.out, self.is_main, cfg.tensorboard, self._tb)
        self._tb = log.tb
        bar = ProgressBar(cfg.progress and self.is_main, self.step, cfg.steps, cfg.log_seconds)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        clock = Throughput(self.flops_per_token, self.peak, 1 if self.dist is None else self.dist.world)
        timed: set[int] = set()  # steps that checkpoint because --ckpt-minutes passed

        def evaluates(k: int) -> bool:
            return bool(cfg.eval_every and k % cfg.eval_every == 0) or k == cfg.steps

        def checkpoints(k: int) -> bool:
            return (bool(cfg.ckpt_every and k % cfg.ckpt_every == 0) or (k == cfg.steps and cfg.checkpoint_at_end)
                    or k in timed)

        def complete(rec: Launched, drained: bool) -> None:
            m = self._finish_step(rec)
            # when the step's work ended: on CUDA once its event fired; elsewhere the launch did the work
            clock.work_done(time.perf_counter() if rec.ready is not None else rec.launched_at, m.pop("_tokens"))
            k = rec.step
            if evaluates(k):  # only ever the newest step: evaluation steps are not overlapped with the next
                ev = self.evaluate()
                if ev:
                    m.update(ev)
            if k % cfg.log_every == 0 or k == cfg.steps or evaluates(k):
                clock.report(m)
                log.write(m)
                self.history.append(m)
                bar.update(k, m)
            if checkpoints(k):
                self.save_checkpoint()
            if drained:  # nothing queued: the next step starts now, after the evaluation or checkpoint write
                clock.restart()

        # With the deferred check, step k's scalars are read after step k+1 is queued, so the GPU never waits
        # for the host between steps. Steps that evaluate or checkpoint finish before the next one starts.
        pending: Launched | None = None
        try:
            while self.step < end:
                rec = self._launch_step()
                if pending is not None:
                    complete(pending, drained=False)
                pending = rec
                signum, due = self._agree(stop)
                if due:
                    timed.add(rec.step)
                if signum or not rec.deferred or evaluates(rec.step) or checkpoints(rec.step) or rec.step == end:
                    pending = None
                    complete(rec, drained=True)
                if signum:
                    if self.saved_step != self.step:
                        self.save_checkpoint()
                    return signum
        finally:
            log.close()
            bar.close()
        return 0

    def peak_memory(self) -> dict[str, Any]:
        return device_peak_memory(self.device)

    def summary(self) -> dict[str, Any]:
        history = self.history or ([self.resumed_metrics] if self.resumed_metrics else [])
        return summarize(history, step=self.step, tokens=self.tokens_seen, last_val=self.last_val,
                         flops_per_token=self.flops_per_token, memory=self.peak_memory(),
                         last_checkpoint=self.last_checkpoint)


def train(cfg: TrainConfig, until: int | None = None) -> dict[str, Any]:
    """Build, train (or resume) and save; returns the summary also written to RUN_DIR/summary.json."""
    return Trainer(cfg).run(until)
