"""TrainConfig: everything a training run is told, checked before anything is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from giants.train.schedule import SCHEDULES

TASKS = ("lm", "sft", "dpo")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL_FIELDS = ("dp_shard", "dp_replicate", "tp", "pp", "ep")


class TrainingDiverged(ValueError):
    """The loss or gradient became NaN/inf; the run stopped without writing a checkpoint."""


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
    log_every: int = 1  # metrics.jsonl (and the progress) every this many steps
    log_seconds: float = 30.0  # stdout not a terminal: a plain progress line at most this often (0: every logged step)
    ckpt_every: int = 0  # a checkpoint every this many steps (0: none by step count)
    ckpt_minutes: float = 10.0  # and at the first step this long after the previous checkpoint (0: none by time)
    checkpoint_at_end: bool = True
    keep_last: int = 3
    # True: the latest checkpoint in out (none there yet: the run starts from step 0, saying so); a path: that one
    resume: bool | str = False
    overwrite: bool = False  # discard a previous run in out (what giants train wrote there) and start over
    save_final: bool = True
    tensorboard: bool = False
    progress: bool = True
    peak_tflops: float | None = None  # for MFU; None: known GPUs only
    memory_limit_gb: float | None = None  # None: what the device reports as available

    # scale-out (giants.train.distributed): None/1 everywhere and no torchrun = one process, as above. Degrees as
    # torchtitan names them; dp_shard None takes what the others leave of the world (its -1). batch_size is the
    # micro-batch of the whole job: each data-parallel rank computes batch_size / dp of its rows.
    dp_shard: int | None = None
    dp_replicate: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_schedule: str = "1f1b"
    pp_microbatches: int | None = None  # None: the pipeline degree (pp micro-batches in each micro-batch)
    dist_timeout_s: float = 600.0  # collectives that wait longer fail (a dead rank stops the job instead of a hang)
    # FSDP2 even where the data-parallel degree is 1 (one process: what FSDP's wrapping costs at a shape; the
    # parameters live as DTensors and the optimizer steps torch's AdamW on them, as on a sharded run)
    fsdp_always: bool = False

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
        for name in ("ckpt_minutes", "log_seconds"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        if self.overwrite and self.resume:
            raise bad("overwrite", "cannot go with resume (one continues the run in out, the other discards it)")
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
        for name in ("dp_replicate", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.dp_shard is not None and self.dp_shard < 1 and self.dp_shard != -1:
            raise bad("dp_shard", "must be >= 1 (or -1: what the other degrees leave)")
        if not self.dist_timeout_s > 0:
            raise bad("dist_timeout_s", "must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    def parallel_requested(self) -> bool:
        """Whether any scale-out degree was given (a launch under torchrun is the other way in)."""
        return (self.dp_shard is not None or self.fsdp_always
                or any(getattr(self, n) != 1 for n in PARALLEL_FIELDS[1:]))
