"""The training loop: pretraining (causal LM), SFT and DPO, optionally through LoRA adapters.

    from giants.train import TrainConfig, train
    summary = train(TrainConfig(out="runs/mix", preset="tiny-mixtral", data="shakespeare", steps=200))

RUN_DIR gets run.json (the full configuration), metrics.jsonl (one object per logged step),
checkpoints/step_*/ (see giants.train.checkpoint) and final/ (an HF-format model directory).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from giants.config import ModelConfig
from giants.train import checkpoint as ckpt
from giants.train.data import BatchReader, TokenStream, load_meta, load_tokenizer
from giants.train.losses import (
    IGNORE_INDEX,
    RouterLosses,
    balance_score,
    causal_lm_loss,
    chunked_lm_loss,
    dpo_loss,
    router_losses,
    sequence_logprobs,
)
from giants.train.optim import MasterAdamW, grad_norm, matmul_weights
from giants.train.schedule import SCHEDULES, lr_at
from giants.train.tied_head import scatter_embedding_grad, tied_logits

TASKS = ("lm", "sft", "dpo")
PRECISIONS = ("auto", "bf16", "fp32")
# where the tied head reads the optimizer's bf16 copy of the embedding (giants.train.tied_head): where it pays
TIED_HEAD_DEVICES: tuple[str, ...] = ("cuda",)
# where the output head and the cross-entropy run as one op (giants.train.cross_entropy.linear_cross_entropy).
# Off: on an H200 its one-kernel loss + gradient ran 1.99-2.94 ms against 1.75 ms for the two-kernel path
# (benchmarks/bench_ce.py), and the step took the same time either way (bench_train_ab.py: 2 programs per SM on
# one machine; at 4 a paired ratio of 1.0091 on one machine and 0.9995 on another).
FUSED_HEAD_CE_DEVICES: tuple[str, ...] = ()


class TrainingDiverged(ValueError):
    """The loss or gradient became NaN/inf; the run stopped without writing a checkpoint."""


@dataclass
class _Launched:
    """A queued optimizer step: what it reports, copied back from the device once `ready` has fired."""

    step: int
    lr: float
    tokens: int
    tokens_before: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    ready: Any = None  # torch.cuda.Event on CUDA
    launched_at: float = 0.0
    deferred: bool = False  # its non-finite check waits for the values (the device skipped a bad update)


@dataclass
class TrainConfig:
    out: str
    # model: a preset, a config JSON (giants or HF), or initial weights (anything giants.load reads)
    preset: str | None = "tiny-llama"
    model_config: str | None = None
    init: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig.replace(**overrides)
    # data
    task: str = "lm"
    data: str = "shakespeare"  # lm: corpus name or prepared dir; sft/dpo: a JSONL file
    val_data: str | None = None  # sft/dpo: optional held-out JSONL
    tokenizer: str = "smollm2-135m"
    seq_len: int = 256
    batch_size: int = 8  # micro-batch (sequences; DPO: pairs)
    grad_accum: int = 1
    # optimisation
    steps: int = 200
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None: 10% of steps, at most 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    # MoE router losses (None: the model config's moe_aux_loss_coef / moe_z_loss_coef)
    aux_loss_coef: float | None = None
    z_loss_coef: float | None = None
    # finetuning
    lora_rank: int = 0  # 0 = full finetuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.0
    dpo_beta: float = 0.1
    # execution
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool | str = False  # True: torch.compile (inductor); a string names another backend
    # torch.compile's mode ("reduce-overhead": CUDA graphs for the compiled forward and backward; one micro-batch a
    # step, since a replay reuses the previous replay's output memory); None: the default mode
    compile_mode: str | None = None
    # bf16 matmul weights in the model, fp32 master weights + moments in the optimizer (giants.train.optim);
    # None: on for bf16 runs on CUDA that train all weights (no LoRA)
    master_weights: bool | None = None
    # the residual stream's dtype in the training loss under bf16: "fp32" is what autocast over fp32 weights (and
    # transformers) computes, the embedding lookup's fp32 rows carried through every residual add; "bf16" carries
    # it in bf16 (the input embeddings rounded to bf16, each norm's output and residual sum in bf16, statistics
    # still fp32), as Megatron-LM does by default (--fp32-residual-connection off) and torchtitan under FSDP2's
    # bf16 compute: half the bytes for every norm and residual add. Evaluation and DPO keep fp32.
    residual_dtype: str = "fp32"
    activation_checkpointing: bool = False
    seed: int = 0
    # bookkeeping
    eval_every: int = 50  # 0 = only at the end
    eval_batches: int = 8
    log_every: int = 1
    ckpt_every: int = 0  # 0 = only at the end
    checkpoint_at_end: bool = True
    keep_last: int = 3
    resume: bool | str = False  # True: latest checkpoint in out; a path: that checkpoint
    save_final: bool = True
    tensorboard: bool = False
    progress: bool = True
    peak_tflops: float | None = None  # for MFU; None: known GPUs only
    memory_limit_gb: float | None = None  # None: what the device reports as available

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}: {why} (got {getattr(self, name)!r})")

        if self.task not in TASKS:
            raise bad("task", f"must be one of {TASKS}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {PRECISIONS}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("eval_every", "ckpt_every", "keep_last", "lora_rank"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.grad_clip < 0:
            raise bad("grad_clip", "must be >= 0")
        if self.preset is None and self.model_config is None and self.init is None:
            raise ValueError("TrainConfig: give a preset, a model_config JSON or init weights")
        for name in ("aux_loss_coef", "z_loss_coef"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise bad(name, "must be >= 0")
        modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.compile_mode not in modes:
            raise bad("compile_mode", f"must be one of {modes[1:]} (got {self.compile_mode!r})")
        if self.residual_dtype not in ("fp32", "bf16"):
            raise bad("residual_dtype", f"must be 'fp32' or 'bf16' (got {self.residual_dtype!r})")
        if self.compile_mode is not None and not self.compile:
            raise bad("compile_mode", "needs compile")
        if self.compile_mode in ("reduce-overhead", "max-autotune") and self.grad_accum > 1:
            raise bad("compile_mode", f"{self.compile_mode!r} (CUDA graphs) needs grad_accum=1: a replay reuses the "
                                      "previous replay's gradient memory")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


# ---- helpers ---------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _tokenizer(source: str) -> Any:
    return load_tokenizer(source)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return dev


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


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


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    from giants.analysis.flops import training_flops_per_token

    return float(training_flops_per_token(cfg, seq_len))


def peak_flops(device: torch.device, bf16: bool, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device).lower()
    from giants.analysis.hardware import GPUS

    for key, gpu in (("h100", GPUS["h100-80gb"]), ("h200", GPUS["h200-141gb"]), ("a100", GPUS["a100-80gb"])):
        if key in name:
            return gpu.bf16_flops
    return None


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the trainer -----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if self.bf16 else None
        if cfg.residual_dtype == "bf16" and not self.bf16:
            raise ValueError(f"TrainConfig.residual_dtype: 'bf16' needs bf16 precision (this run is fp32 on "
                             f"{self.device.type})")
        self.residual_bf16 = cfg.residual_dtype == "bf16"
        self._linear_ce = None
        if self.device.type in FUSED_HEAD_CE_DEVICES:  # (imported only here: the CPU path never loads Triton)
            from giants.train.cross_entropy import linear_cross_entropy

            self._linear_ce = linear_cross_entropy
        self.master = self._use_master_weights()
        self._check_out_dir()

        self.model_config = self._model_config()
        if cfg.seq_len > self.model_config.max_context:
            raise ValueError(f"seq_len={cfg.seq_len} is beyond the model's max_context="
                             f"{self.model_config.max_context}")
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
        # Evaluation and DPO run the plain module; the training loss (forward included) is what compiles.
        self.forward = self.model
        if cfg.compile:
            backend = cfg.compile if isinstance(cfg.compile, str) else "inductor"
            self.loss_fn = torch.compile(self._lm_loss, backend=backend, mode=cfg.compile_mode)
        else:
            self.loss_fn = self._lm_loss
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.param_names, self.train_params, self.optimizer = self._optimizer()
        self._diverged = torch.zeros((), device=self.device)
        mc = self.model_config
        self.aux_coef = mc.moe_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
        self.z_coef = mc.moe_z_loss_coef if cfg.z_loss_coef is None else cfg.z_loss_coef
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, cfg.steps // 10)
        if self.warmup > cfg.steps:
            raise ValueError(f"warmup_steps={self.warmup} exceeds steps={cfg.steps}")
        self.flops_per_token = flops_per_token(mc, cfg.seq_len)
        self.peak = peak_flops(self.device, self.bf16, cfg.peak_tflops)
        self.step = 0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.last_val: float | None = None
        self.history: list[dict[str, Any]] = []
        self._tb = None
        if cfg.resume:
            self._resume()
        else:
            self.out.mkdir(parents=True, exist_ok=True)
        self._write_run_json()

    # ---- setup -----------------------------------------------------------------------------------
    def _fused_optimizer(self) -> bool:
        """Whether the optimizer takes grad_scale and found_inf (torch's fused AdamW, MasterAdamW). With found_inf
        the non-finite check can wait for the step's scalars to come back on their own: no host sync inside a
        CUDA step. (On CPU the same path runs, so the tests cover it; there the values are simply ready.)
        Otherwise the check runs before the update."""
        opt = self.optimizer
        return isinstance(opt, MasterAdamW) or all(g.get("fused") for g in opt.param_groups)

    def _use_master_weights(self) -> bool:
        cfg = self.cfg
        if cfg.master_weights is None:
            return self.bf16 and self.device.type == "cuda" and cfg.lora_rank == 0
        if cfg.master_weights and not self.bf16:
            raise ValueError("TrainConfig.master_weights: needs bf16 precision (fp32 runs keep fp32 weights)")
        if cfg.master_weights and cfg.lora_rank:
            raise ValueError("TrainConfig.master_weights: not with LoRA (the base weights are frozen)")
        return bool(cfg.master_weights)

    def _masters_in_model(self):
        """Within: the model holds its fp32 master weights (checkpoint writes and loads see fp32)."""
        if isinstance(self.optimizer, MasterAdamW):
            return self.optimizer.masters_in_model()
        return contextlib.nullcontext()

    def _check_out_dir(self) -> None:
        cfg = self.cfg
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"{self.out}: exists and is not a directory (--out names the run directory)")
        if cfg.resume:
            return
        if ckpt.list_checkpoints(self.out) or (self.out / "metrics.jsonl").exists():
            raise ValueError(f"{self.out}: holds a previous run (checkpoints or metrics.jsonl); pass --resume to "
                             "continue it or choose a new --out")

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

        self.tokenizer = _tokenizer(cfg.tokenizer)
        self._tokenizer_source = cfg.tokenizer
        loader = load_sft if cfg.task == "sft" else load_dpo
        items = loader(cfg.data, self.tokenizer)
        self.data_path = Path(cfg.data)
        import hashlib

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
            model = giants.load(cfg.init, dtype=torch.float32, device=self.device)
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

    # ---- state ------------------------------------------------------------------------------------
    def run_signature(self) -> dict[str, Any]:
        """Settings that must match for a resume to continue the same run."""
        c = self.cfg
        return {"task": c.task, "data_fingerprint": self.data_fingerprint, "seq_len": c.seq_len,
                "batch_size": c.batch_size, "grad_accum": c.grad_accum, "seed": c.seed, "init": c.init,
                "lora_rank": c.lora_rank, "lora_alpha": c.lora_alpha, "lora_targets": list(c.lora_targets),
                "precision": "bf16" if self.bf16 else "fp32"}

    def _write_run_json(self) -> None:
        info = {"train_config": self.cfg.to_dict(), "model_config": self.model_config.to_dict(),
                "run": self.run_signature(), "device": str(self.device),
                "versions": {"torch": torch.__version__, "python": platform.python_version()},
                "flops_per_token": self.flops_per_token}
        _atomic_write(self.out / "run.json", json.dumps(info, indent=1, default=_json_default))

    def data_state(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def save_checkpoint(self) -> Path:
        import giants
        from giants.train.lora import lora_parameters

        state = {"tokens_seen": self.tokens_seen, "data": self.data_state(), "last_val": self.last_val,
                 "model_config": self.model_config.to_dict(), "run": self.run_signature(),
                 "train_config": self.cfg.to_dict()}
        adapter = lora_parameters(self.model) if self.cfg.lora_rank else None
        tok = self._checkpoint_tokenizer()

        def write_model(d: Path) -> None:
            with self._masters_in_model():  # the fp32 master weights, not the bf16 compute copies
                giants.save(self.model, d, tokenizer=tok)

        path = ckpt.save(self.out, self.step, optimizer=self.optimizer, param_names=self.param_names, state=state,
                         write_model=write_model, adapter=adapter, keep_last=self.cfg.keep_last)
        self.last_checkpoint = path
        return path

    def _checkpoint_tokenizer(self) -> Any:
        if self.tokenizer is None and self._tokenizer_source:
            try:
                self.tokenizer = _tokenizer(self._tokenizer_source)
            except (OSError, ValueError):
                self._tokenizer_source = None  # save the weights without one rather than fail the run
        return self.tokenizer

    def _resume(self) -> None:
        import giants
        from giants.train.lora import lora_parameters

        cfg = self.cfg
        if isinstance(cfg.resume, (str, os.PathLike)) and not isinstance(cfg.resume, bool):
            path = Path(cfg.resume)
        else:
            path = ckpt.latest_checkpoint(self.out)
            if path is None:
                raise ckpt.TrainCheckpointError(f"{self.out}: no checkpoint to resume from (checkpoints/step_* "
                                                "with a manifest); refusing to start from scratch")
        state = ckpt.verify(path)
        ckpt.check_compatible(state, {"model_config": self.model_config.to_dict(), "run": self.run_signature()},
                              path)
        with torch.no_grad(), self._masters_in_model():  # load into the fp32 masters; bf16 copies follow on exit
            if cfg.lora_rank:
                tensors = ckpt.read_tensors(path / "adapter.safetensors")
                params = lora_parameters(self.model)
                if set(tensors) != set(params):
                    raise ckpt.TrainCheckpointError(f"{path}: adapter tensors do not match this run's LoRA setup")
                for n, p in params.items():
                    p.copy_(tensors[n])
            else:
                try:
                    loaded = giants.load(path / "model")
                except Exception as e:  # noqa: BLE001 - any reader failure means an unusable checkpoint
                    raise ckpt.TrainCheckpointError(f"{path / 'model'}: cannot load the model: {e}") from e
                sd = loaded.state_dict()
                live = self.model.state_dict()
                if set(sd) != set(live):
                    raise ckpt.TrainCheckpointError(f"{path / 'model'}: tensors differ from this model's")
                for k, v in live.items():
                    if v.shape != sd[k].shape:
                        raise ckpt.TrainCheckpointError(f"{path / 'model'}: tensor {k} has shape "
                                                        f"{tuple(sd[k].shape)}, model has {tuple(v.shape)}")
                    v.copy_(sd[k])
                del loaded, sd
        try:
            ckpt.load_optimizer_state(self.optimizer, self.param_names,
                                      ckpt.read_tensors(path / "optimizer.safetensors"), state["optimizer"], path)
            self.reader.load_state_dict(state["data"])
        except (KeyError, ValueError) as e:
            raise ckpt.TrainCheckpointError(f"{path}: {e}") from None
        ckpt.set_rng_state(ckpt.read_tensors(path / "rng.safetensors"), state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.last_val = state.get("last_val")
        self.last_checkpoint = path
        # Keep metrics up to the checkpoint; later lines belong to the lost part of the interrupted run.
        mpath = self.out / "metrics.jsonl"
        if mpath.exists():
            kept = []
            for line in mpath.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill
            _atomic_write(mpath, "".join(f"{ln}\n" for ln in kept))

    # ---- steps ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables for positions 0..T-1 (every training row starts at 0), computed once, eagerly: as an
        input of the compiled loss they are one small tensor the layers read. Computed inside, inductor inlined
        cos/sin into every layer's q and k kernels (~3 ms a step at Llama-3.2-1B shape on an H200); kept out
        of it by a graph break, the embedding and the tied head fell into different graphs and their gradients
        were summed outside (another 0.7 ms)."""
        rotary = getattr(self.model, "rotary", None)
        if rotary is None:
            return None
        key = (T, self.model.embed.weight.dtype)
        if key not in self._rope_cache:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                pos = torch.arange(T, device=self.device)[None]
                self._rope_cache = {key: rotary(pos, self.model.embed.weight.dtype)}
        return self._rope_cache[key]

    def _lm_loss(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None, embeds: torch.Tensor | None = None,
                 head_lowp: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Forward + losses as one function of tensors, so torch.compile sees the loss too (the fp32
        cross-entropy over the vocabulary fuses with the head instead of materialising fp32 logits).
        embeds, head_lowp: the looked-up input embeddings and the bf16 copy of the tied head weight (see
        `_lm_micro`). Returns (loss, ce) or, for MoE, (loss, ce, aux, z, per-layer aux, per-layer z, utilisation)."""
        mc = self.model_config
        with self._autocast():
            if self.residual_bf16 and embeds is None:
                embeds = self.model.embed(x).to(torch.bfloat16)
            out = self.model(x, output_router_logits=mc.is_moe, check=False, return_hidden=True, rope=rope,
                             inputs_embeds=embeds)
            hidden, router_logits = out if mc.is_moe else (out, None)
            if head_lowp is None:
                head = self.model.logits
            else:
                weight = self.model.embed.weight

                def head(h: torch.Tensor) -> torch.Tensor:
                    return self.model.logits(h, project=lambda t: tied_logits(t, weight, head_lowp))
            fused = self._fused_head(head_lowp)
            if fused is not None:
                # the head and the loss as one op: the logits' gradient is formed in the forward
                ce = self._linear_ce(hidden, *fused, y, IGNORE_INDEX)
            elif self.device.type == "cpu":
                # the head and loss a block of rows at a time: far fewer page faults than full logits
                ce = chunked_lm_loss(head, hidden, y, mc.vocab_size)
            else:
                ce = causal_lm_loss(head(hidden), y)
            if not router_logits:
                return ce, ce.detach()
            rl = router_losses(router_logits, mc.experts_per_token, mask)
            loss = ce
            if self.aux_coef:
                loss = loss + self.aux_coef * rl.aux_loss
            if self.z_coef:
                loss = loss + self.z_coef * rl.z_loss
            return (loss, ce.detach(), rl.aux_loss.detach(), rl.z_loss.detach(), rl.per_layer_aux, rl.per_layer_z,
                    rl.utilisation)

    def _fused_head(self, head_lowp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight, its compute-dtype copy) when the head and the loss run as one op (giants.train.cross_entropy.
        linear_cross_entropy): on FUSED_HEAD_CE_DEVICES, no final soft-cap, and a head weight that is already in
        bf16 (master weights) or has the optimizer's bf16 copy (the tied head)."""
        if self._linear_ce is None or self.model_config.final_softcap is not None:
            return None
        if head_lowp is not None:
            return self.model.embed.weight, head_lowp
        lm = getattr(self.model, "lm_head", None)
        if type(lm) is torch.nn.Linear and lm.bias is None and lm.weight.dtype == torch.bfloat16:
            return lm.weight, lm.weight.detach()
        return None

    def _lm_micro(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
        tied = self.tied_head
        if tied is None:
            out = self.loss_fn(x, y, mask, self._rope(x.shape[1]))
            info: dict[str, Any] = {"ce": out[1]}
        else:
            # the lookup outside the graph: its gradient rows are added into the head's fp32 weight gradient right
            # after the backward (`_launch_step`) instead of a zero-filled (V, D) gradient summed with it
            low = self.optimizer.shadow_of(tied)
            with torch.no_grad():  # bf16 rows of the bf16 copy: the master's rows rounded to bf16
                embeds = torch.nn.functional.embedding(x, low if self.residual_bf16 else tied)
            embeds.requires_grad_(True)
            out = self.loss_fn(x, y, mask, self._rope(x.shape[1]), embeds, low)
            info = {"ce": out[1], "lookup": (tied, x, embeds)}
        if len(out) > 2:
            info["router"] = RouterLosses(*out[2:])
        return out[0], info

    def _dpo_micro(self, pairs: list[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        from giants.train.finetune_data import collate
        from giants.train.lora import lora_disabled

        examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        ids, labels, mask = collate(examples, self.cfg.seq_len, self.pad_id)
        ids, labels = ids.to(self.device), labels.to(self.device)
        B = len(pairs)
        with self._autocast():
            logp = sequence_logprobs(self.forward(ids, check=False), labels)
            with torch.no_grad():
                if self.reference is not None:
                    ref = sequence_logprobs(self.reference(ids, check=False), labels)
                else:
                    with lora_disabled(self.model):
                        ref = sequence_logprobs(self.model(ids, check=False), labels)
        out = dpo_loss(logp[:B], logp[B:], ref[:B], ref[B:], self.cfg.dpo_beta)
        return out.loss, {"ce": out.loss.detach(), "margin": out.margin, "accuracy": out.accuracy}

    def _next_micro(self) -> tuple[torch.Tensor, dict[str, Any], int]:
        cfg = self.cfg
        if cfg.task == "lm":
            x, y = self.reader.next_batch()
            if self.device.type == "cuda":
                # from pageable memory the copy would wait for the previous step's optimizer to finish, leaving the
                # GPU idle while this step's first kernels are launched; from pinned memory it queues behind it
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss, info = self._lm_micro(x, y)
            return loss, info, x.numel()
        if cfg.task == "sft":
            from giants.train.finetune_data import collate

            ids, labels, mask = collate(self.reader.next_items(), cfg.seq_len, self.pad_id)
            if not bool((labels != IGNORE_INDEX).any()):
                raise ValueError("an SFT batch has no assistant tokens within seq_len; raise --seq-len")
            loss, info = self._lm_micro(ids.to(self.device), labels.to(self.device), mask.to(self.device))
            return loss, info, int(mask.sum())
        pairs = self.reader.next_items()
        loss, info = self._dpo_micro(pairs)
        return loss, info, sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches. Returns the step's metrics."""
        return self._finish_step(self._launch_step())

    def _launch_step(self) -> _Launched:
        """Queue one optimizer step. With a fused optimizer nothing here waits for the GPU: the step's scalars
        are copied back asynchronously and read in `_finish_step`, and a non-finite loss or gradient norm turns
        the update (and every later one) into a no-op on the device through the optimizer's `found_inf`.
        Otherwise the scalars are read before the update, which is then skipped on the host."""
        cfg = self.cfg
        self.model.train()
        lr = lr_at(self.step, base_lr=cfg.lr, total_steps=cfg.steps, warmup_steps=self.warmup,
                   schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        ce_sum = torch.zeros((), device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        extras: list[dict[str, Any]] = []
        accumulate = cfg.grad_accum > 1 and isinstance(self.optimizer, MasterAdamW)
        for _ in range(cfg.grad_accum):
            loss, info, n = self._next_micro()
            (loss / cfg.grad_accum).backward()
            if "lookup" in info:
                scatter_embedding_grad(*info.pop("lookup"))
            if accumulate:
                # bf16 weights get bf16 .grad: the micro-batches are summed in fp32 in the optimizer instead, as
                # autocast over fp32 weights sums them
                self.optimizer.accumulate()
            ce_sum += info["ce"].float()
            loss_sum += loss.detach().float()
            tokens += n
            extras.append(info)
        params = self.train_params
        if isinstance(self.optimizer, MasterAdamW):
            grads = self.optimizer.grads()
        else:
            grads = [p.grad for p in params if p.grad is not None]
        fused = self._fused_optimizer()
        fold_clip = cfg.grad_clip > 0 and fused and (self.device.type == "cuda" or isinstance(self.optimizer,
                                                                                              MasterAdamW))
        if cfg.grad_clip > 0 and not fold_clip:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = grad_norm(grads)  # fp32 sums, also over bf16 gradients
            if fold_clip:
                # The clip's scale rides in the optimizer's kernel (it divides each gradient by grad_scale as it
                # reads it) instead of a separate read-modify-write pass over every gradient.
                self.optimizer.grad_scale = torch.clamp((gnorm.float() + 1e-6) / cfg.grad_clip, min=1.0)
        scalars = torch.stack([loss_sum.float(), gnorm.detach().float(), ce_sum.float()])
        rec = _Launched(step=self.step + 1, lr=lr, tokens=tokens, tokens_before=self.tokens_seen)
        rec.deferred = fused
        if fused:
            # sticky: after a non-finite step no later step updates either, so the model stays as it was
            bad = (~torch.isfinite(scalars[:2])).any().float()
            torch.maximum(self._diverged, bad, out=self._diverged)
            self.optimizer.found_inf = self._diverged
        else:
            loss_f, gnorm_v, _ = scalars.tolist()
            if not (math.isfinite(loss_f) and math.isfinite(gnorm_v)):
                self.optimizer.grad_scale = None
                self.optimizer.zero_grad(set_to_none=True)
                self._diverged_error(rec, loss_f / cfg.grad_accum, gnorm_v)
        self.optimizer.step()
        self.optimizer.grad_scale = None
        self.optimizer.found_inf = None
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        # everything the step reports, reduced on the device and copied back without waiting
        out: dict[str, torch.Tensor] = {"scalars": scalars}
        routers = [e["router"] for e in extras if "router" in e]
        if routers:
            out["aux_loss"] = torch.stack([r.aux_loss.detach() for r in routers]).mean()
            out["z_loss"] = torch.stack([r.z_loss.detach() for r in routers]).mean()
            out["per_layer_aux"] = torch.stack([r.per_layer_aux for r in routers]).mean(0)
            out["per_layer_z"] = torch.stack([r.per_layer_z for r in routers]).mean(0)
            util = torch.stack([r.utilisation for r in routers]).mean(0)  # (L, E)
            out["utilisation"] = util
            out["balance"] = balance_score(util)
        if cfg.task == "dpo":
            out["margin"] = torch.stack([e["margin"] for e in extras]).mean()
            out["accuracy"] = torch.stack([e["accuracy"] for e in extras]).mean()
        if self.device.type == "cuda":
            rec.values = {k: v.detach().float().to("cpu", non_blocking=True) for k, v in out.items()}
            rec.ready = torch.cuda.Event()
            rec.ready.record()
        else:
            rec.values = {k: v.detach().float() for k, v in out.items()}
        rec.launched_at = time.perf_counter()
        return rec

    def _diverged_error(self, rec: _Launched, loss_v: float, gnorm_v: float) -> None:
        where = str(self.last_checkpoint) if self.last_checkpoint else "none written yet"
        what = "loss" if not math.isfinite(loss_v) else "gradient norm"
        raise TrainingDiverged(f"non-finite {what} ({loss_v if what == 'loss' else gnorm_v}) at step "
                               f"{rec.step}: training stopped without saving; last good checkpoint: "
                               f"{where}. Resume from it with a lower --lr or stronger --grad-clip")

    def _finish_step(self, rec: _Launched) -> dict[str, Any]:
        """Wait for a launched step's scalars and turn them into its metrics."""
        if rec.ready is not None:
            rec.ready.synchronize()  # this step's work only: a step launched after it may still be running
        v = rec.values
        loss_f, gnorm_v, ce_f = v["scalars"].tolist()
        ga = self.cfg.grad_accum
        if not (math.isfinite(loss_f) and math.isfinite(gnorm_v)):
            # the device skipped this update and every later one: the model is as it was before this step
            self.step, self.tokens_seen = rec.step - 1, rec.tokens_before
            self._diverged_error(rec, loss_f / ga, gnorm_v)
        m: dict[str, Any] = {"step": rec.step, "train_loss": ce_f / ga, "loss": loss_f / ga, "lr": rec.lr,
                             "grad_norm": gnorm_v, "tokens": rec.tokens_before + rec.tokens, "_tokens": rec.tokens}
        if "aux_loss" in v:
            m["aux_loss"] = float(v["aux_loss"])
            m["z_loss"] = float(v["z_loss"])
            m["router"] = {k: v[src].tolist() for k, src in (("aux_loss", "per_layer_aux"), ("z_loss", "per_layer_z"),
                                                               ("utilisation", "utilisation"), ("balance", "balance"))}
        if "margin" in v:
            m["margin"] = float(v["margin"])
            m["accuracy"] = float(v["accuracy"])
        return m

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean next-token loss over the first eval_batches batches of the validation data."""
        cfg = self.cfg
        self.model.eval()
        total, count = 0.0, 0
        try:
            if cfg.task == "lm" and self.val_reader is not None:
                n = min(cfg.eval_batches * cfg.batch_size, self.val_reader.n_windows)
                for start in range(0, n, cfg.batch_size):
                    windows = torch.arange(start, min(n, start + cfg.batch_size)).numpy()
                    x, y = self.val_reader.rows(windows)
                    with self._autocast():
                        logits = self.forward(x.to(self.device), check=False)
                    total += float(causal_lm_loss(logits, y.to(self.device))) * x.numel()
                    count += x.numel()
            elif cfg.task in ("sft", "dpo") and getattr(self, "val_items", None):
                from giants.train.finetune_data import collate

                items = self.val_items[:cfg.eval_batches * cfg.batch_size]
                if cfg.task == "dpo":
                    margins = []
                    for i in range(0, len(items), cfg.batch_size):
                        _, info = self._dpo_micro(items[i:i + cfg.batch_size])
                        margins.append(float(info["margin"]))
                    return {"val_margin": sum(margins) / len(margins)}
                for i in range(0, len(items), cfg.batch_size):
                    ids, labels, _ = collate(items[i:i + cfg.batch_size], cfg.seq_len, self.pad_id)
                    k = int((labels != IGNORE_INDEX).sum())
                    if not k:
                        continue
                    with self._autocast():
                        logits = self.forward(ids.to(self.device), check=False)
                    total += float(causal_lm_loss(logits, labels.to(self.device))) * k
                    count += k
            else:
                return None
        finally:
            self.model.train()
        if not count:
            return None
        val = total / count
        self.last_val = val
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to `until` (default: cfg.steps) optimizer steps. Returns a summary."""
        cfg = self.cfg
        end = cfg.steps if until is None else min(until, cfg.steps)
        metrics_file = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        if cfg.tensorboard and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        bar = _Bar(cfg.progress, self.step, cfg.steps)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # Throughput counts training time only: evaluation and checkpoint writes fall outside the clock.
        clock = {"busy": 0.0, "tokens": 0, "since": time.perf_counter()}

        def evaluates(k: int) -> bool:
            return bool(cfg.eval_every and k % cfg.eval_every == 0) or k == cfg.steps

        def checkpoints(k: int) -> bool:
            return bool(cfg.ckpt_every and k % cfg.ckpt_every == 0) or (k == cfg.steps and cfg.checkpoint_at_end)

        def complete(rec: _Launched, drained: bool) -> None:
            m = self._finish_step(rec)
            # when the step's work ended: on CUDA once its event fired; elsewhere the launch did the work
            end = time.perf_counter() if rec.ready is not None else rec.launched_at
            clock["busy"] += end - clock["since"]
            clock["since"] = end
            clock["tokens"] += m.pop("_tokens")
            k = rec.step
            if evaluates(k):  # only ever the newest step: evaluation steps are not overlapped with the next
                ev = self.evaluate()
                if ev:
                    m.update(ev)
            if k % cfg.log_every == 0 or k == cfg.steps or evaluates(k):
                m["tokens_per_s"] = clock["tokens"] / max(clock["busy"], 1e-9)
                clock["busy"], clock["tokens"] = 0.0, 0
                if self.peak:
                    m["mfu"] = m["tokens_per_s"] * self.flops_per_token / self.peak
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
                self.history.append(m)
                self._tensorboard(m)
                bar.update(k, m)
            if checkpoints(k):
                self.save_checkpoint()
            if drained:  # nothing queued: the next step starts now, after the evaluation or checkpoint write
                clock["since"] = time.perf_counter()

        # With the deferred check, step k's scalars are read after step k+1 is queued, so the GPU never waits
        # for the host between steps. Steps that evaluate or checkpoint finish before the next one starts.
        pending: _Launched | None = None
        try:
            while self.step < end:
                rec = self._launch_step()
                if pending is not None:
                    complete(pending, drained=False)
                pending = rec
                if not rec.deferred or evaluates(rec.step) or checkpoints(rec.step) or rec.step == end:
                    pending = None
                    complete(rec, drained=True)
        finally:
            metrics_file.close()
            bar.close()
        summary = self.summary()
        if self.step >= cfg.steps and cfg.save_final:
            summary["final"] = str(self.save_final())
        _atomic_write(self.out / "summary.json", json.dumps(summary, indent=1, default=_json_default))
        return summary

    def _tensorboard(self, m: dict[str, Any]) -> None:
        if self._tb is None:
            return
        for k, v in m.items():
            if isinstance(v, (int, float)) and k != "step":
                self._tb.add_scalar(k, v, m["step"])
        for k, vals in m.get("router", {}).items():
            if k in ("aux_loss", "z_loss", "balance"):
                for i, v in enumerate(vals):
                    self._tb.add_scalar(f"router/{k}/layer{i}", v, m["step"])
        self._tb.flush()

    def peak_memory(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"bytes": int(torch.cuda.max_memory_allocated(self.device)), "kind": "cuda max allocated"}
        return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
                "kind": "process peak RSS"}

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        rates = [h["tokens_per_s"] for h in self.history[1:] if "tokens_per_s" in h] or \
                [h["tokens_per_s"] for h in self.history if "tokens_per_s" in h]
        return {"step": self.step, "tokens": self.tokens_seen, "train_loss": last.get("train_loss"),
                "val_loss": self.last_val, "tokens_per_s": sum(rates) / len(rates) if rates else None,
                "flops_per_token": self.flops_per_token, "peak_memory": self.peak_memory(),
                "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}

    def save_final(self) -> Path:
        """The trained model as an HF-format directory (LoRA adapters merged in)."""
        import giants
        from giants.train.lora import has_lora, merge_lora

        model = self.model
        if has_lora(model):
            model = merge_lora(copy.deepcopy(model))
        dest = self.out / "final"
        with self._masters_in_model():
            giants.save(model, dest, tokenizer=self._checkpoint_tokenizer())
        return dest


class _Bar:
    """A rich progress bar showing loss, tokens/s and MFU; silent when disabled."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"))
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, m: dict[str, Any]) -> None:
        if self.progress is None:
            return
        info = f"loss {m['train_loss']:.4f}  {m.get('tokens_per_s', 0):,.0f} tok/s"
        if "mfu" in m:
            info += f"  MFU {100 * m['mfu']:.1f}%"
        if "val_loss" in m:
            info += f"  val {m['val_loss']:.4f}"
        if "router" in m:
            info += f"  balance {min(m['router']['balance']):.2f}"
        self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def train(cfg: TrainConfig, until: int | None = None) -> dict[str, Any]:
    """Build, train (or resume) and save; returns the summary also written to RUN_DIR/summary.json."""
    return Trainer(cfg).run(until)
