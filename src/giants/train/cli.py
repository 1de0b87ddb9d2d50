"""`giants prepare`, `giants train`, `giants plot`, `giants arena`."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from typing import Any

_TRAIN_PARSER: argparse.ArgumentParser  # set by register(): resume_command reads its flags


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE (e.g. --set n_layers=4)")
        v = _value(val)
        out[key] = tuple(v) if isinstance(v, list) else v
    return out


def _prepare(args: argparse.Namespace) -> int:
    from giants.train.data import prepare

    meta = prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   shard_tokens=args.shard_tokens, progress=not args.quiet)
    tr, va = meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]
    print(f"{args.out}: {meta['documents']} documents, {tr:,} train + {va:,} validation tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']:,}, eos {meta['eos_token_id']})")
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The `giants train` command line that continues this run: the flags it was given, then --resume."""
    parts = ["giants", "train"]
    for a in _TRAIN_PARSER._actions:
        if not a.option_strings or a.dest in ("help", "resume", "overwrite"):
            continue
        v = getattr(args, a.dest, None)
        if v is None or v == a.default or v is False:
            continue
        flag = a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]
        if v is True:
            parts.append(flag)
        elif isinstance(a, argparse._AppendAction):
            for item in v:
                parts += [flag, str(item)]
        elif isinstance(v, (list, tuple)):
            parts += [flag, *map(str, v)]
        else:
            parts += [flag, str(v)]
    return shlex.join([*parts, "--resume"])


def _train(args: argparse.Namespace) -> int:
    from giants.train import distributed
    from giants.train.trainer import TrainConfig, Trainer

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be >= 1")
        torch_threads(args.threads)
    if args.preset is None and args.config is None and args.init is None:
        args.preset = "tiny-llama"
    resume: bool | str = False
    if args.resume is not None:
        resume = True if args.resume is True else str(args.resume)
    tc = TrainConfig(
        out=args.out, preset=args.preset, model_config=args.config, init=args.init, overrides=_overrides(args.set),
        task=args.task, data=args.data, val_data=args.val_data, tokenizer=args.tokenizer, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, lr=args.lr, schedule=args.schedule,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, decay_fraction=args.decay_fraction,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, aux_loss_coef=args.aux_loss_coef,
        z_loss_coef=args.z_loss_coef, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets), lora_dropout=args.lora_dropout, dpo_beta=args.dpo_beta,
        device=args.device, precision=args.precision, compile=args.compile, compile_mode=args.compile_mode,
        master_weights={"auto": None, "on": True, "off": False}[args.master_weights],
        residual_dtype=args.residual_dtype,
        activation_checkpointing=args.activation_checkpointing, seed=args.seed, eval_every=args.eval_every,
        eval_batches=args.eval_batches, log_every=args.log_every, log_seconds=args.log_seconds,
        ckpt_every=args.ckpt_every, ckpt_minutes=args.ckpt_minutes, keep_last=args.keep_last, resume=resume,
        overwrite=args.overwrite, save_final=not args.no_final, tensorboard=args.tensorboard,
        progress=not args.quiet, peak_tflops=args.peak_tflops, memory_limit_gb=args.memory_limit_gb,
        dp_shard=args.dp_shard, dp_replicate=args.dp_replicate, tp=args.tp, pp=args.pp, ep=args.ep,
        pp_schedule=args.pp_schedule, pp_microbatches=args.pp_microbatches, dist_timeout_s=args.dist_timeout,
        fsdp_always=args.fsdp_always)
    trainer = Trainer(tc)
    ended = False
    try:
        if trainer.step >= tc.steps and not trainer.final_pending():
            if trainer.is_main:
                print(f"{args.out}: already at step {trainer.step} of {tc.steps}; raise --steps to train further")
            return 0
        if trainer.step >= tc.steps and trainer.is_main:  # killed or stopped while writing final/
            print(f"giants train: {args.out}: all {tc.steps} steps trained; writing the final model", file=sys.stderr,
                  flush=True)
        s = trainer.run()
        ended = True
    finally:
        if trainer.dist is not None:
            trainer.dist.close(orderly=ended)
    code = _summary(args, tc, trainer, s)
    if ended and distributed.world_size() > 1:
        _leave(code)
    return code


def _leave(code: int) -> None:
    """End a rank of a multi-process run after its orderly shutdown without the interpreter's teardown: gloo's
    worker threads may still be dropping the last collective's tensors, which needs the GIL, and once the
    interpreter has begun to exit that aborts the rank ("terminate called without an active exception", seen on
    CI about one 2-rank run in 30 even with the shutdown meeting through the store). Everything is written and
    closed by now; the streams and logging are flushed here. giants' tensor-parallel inference workers end
    the same way (giants.inference.tp_worker)."""
    import logging
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _summary(args: argparse.Namespace, tc: Any, trainer: Any, s: dict) -> int:
    """Print how the run ended (the main rank) and return the exit code."""
    from giants.train import distributed

    if s.get("stopped"):
        if trainer.is_main:
            how = ("the same torchrun launch with these arguments" if distributed.world_size() > 1 else "")
            print(f"{args.out}: stopped by {s['stopped']} at step {s['step']} of {tc.steps}; checkpoint "
                  f"{s['last_checkpoint']}. Resume with{' ' + how if how else ''}:\n  {resume_command(args)}",
                  flush=True)
        return 128 + getattr(signal.Signals, s["stopped"], signal.SIGINT).value
    if not trainer.is_main:
        return 0
    val = f", val loss {s['val_loss']:.4f}" if s.get("val_loss") is not None else ""
    print(f"{args.out}: step {s['step']}, train loss {s['train_loss']:.4f}{val}, "
          f"{s['tokens_per_s'] or 0:,.0f} tokens/s; checkpoint {s['last_checkpoint']}"
          + (f"; model {s['final']}" if s.get("final") else ""))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from giants.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _arena(args: argparse.Namespace) -> int:
    from giants.train.arena import ArenaConfig, run_arena

    kw: dict[str, Any] = dict(out=args.out, n_layers=args.layers, steps=args.steps, batch_size=args.batch_size,
                              seq_len=args.seq_len, lr=args.lr, scale=args.scale, data=args.data,
                              tokenizer=args.tokenizer, device=args.device, eval_every=args.eval_every,
                              eval_batches=args.eval_batches, seed=args.seed, isolate=not args.no_isolate,
                              progress=not args.quiet, aux_loss_coef=args.aux_loss_coef,
                              z_loss_coef=args.z_loss_coef)
    if args.presets:
        kw["presets"] = tuple(args.presets)
    report = run_arena(ArenaConfig(**kw))
    for name, s in report["results"].items():
        vals = [h["val_loss"] for h in s["history"] if "val_loss" in h]
        print(f"{name:24s} val loss {vals[-1]:.4f}  {s['tokens_per_s'] or 0:10,.0f} tok/s")
    print(f"report: {args.out}/report.md")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenise text files into packed token shards for training")
    p.add_argument("inputs", nargs="+", help="text files (.txt/.md, .jsonl with a 'text' field) or directories")
    p.add_argument("--tokenizer", required=True, help="tokenizer source: smollm2-135m, an HF dir, .gguf, or 'bytes'")
    p.add_argument("--out", required=True, help="output dataset directory (must not exist or be empty)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="document shuffle seed")
    p.add_argument("--shard-tokens", type=int, default=1 << 26)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="pretrain or finetune (SFT, DPO, LoRA) with resumable checkpoints")
    global _TRAIN_PARSER
    _TRAIN_PARSER = p
    g = p.add_argument_group("model")
    g.add_argument("--preset", help="a preset name (default tiny-llama)")
    g.add_argument("--config", help="model config JSON (giants or HF config.json)")
    g.add_argument("--init", help="initial weights: an HF dir, .gguf or known model (finetuning)")
    g.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a ModelConfig field (repeatable)")
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=("lm", "sft", "dpo"), default="lm")
    g.add_argument("--data", default="shakespeare",
                   help="lm: 'shakespeare' or a `giants prepare` dir; sft/dpo: a JSONL file")
    g.add_argument("--val-data", help="sft/dpo: held-out JSONL")
    g.add_argument("--tokenizer", default="smollm2-135m")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=8, help="micro-batch (DPO: pairs)")
    g.add_argument("--grad-accum", type=int, default=1)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--schedule", choices=("cosine", "wsd", "constant"), default="cosine")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: share of steps spent decaying")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--aux-loss-coef", type=float, help="MoE load-balancing coefficient (default: model config)")
    g.add_argument("--z-loss-coef", type=float, help="MoE router z-loss coefficient (default: model config)")
    g = p.add_argument_group("finetuning")
    g.add_argument("--lora-rank", type=int, default=0)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--dpo-beta", type=float, default=0.1)
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"),
                   help="torch.compile mode (reduce-overhead: CUDA graphs; needs --grad-accum 1)")
    g.add_argument("--master-weights", choices=("auto", "on", "off"), default="auto",
                   help="bf16 matmul weights in the model, fp32 masters + moments in the optimizer "
                        "(auto: on for bf16 CUDA runs without LoRA)")
    g.add_argument("--residual-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="the residual stream's dtype in the training loss under bf16 (fp32: what autocast and "
                        "transformers compute; bf16: as Megatron-LM's default, half the norm traffic)")
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch's intra-op work (torch.set_num_threads; default: torch's choice)")
    g.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU on devices giants does not know")
    g.add_argument("--memory-limit-gb", type=float, help="refuse configs estimated above this")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --out (or the one given); with none written yet the "
                        "run starts from step 0")
    g.add_argument("--overwrite", action="store_true",
                   help="discard a previous run in --out (its checkpoints, metrics, final model) and start over")
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-batches", type=int, default=8)
    g.add_argument("--log-every", type=int, default=1, metavar="STEPS",
                   help="a metrics.jsonl line (and progress) every STEPS steps (default 1)")
    g.add_argument("--log-seconds", type=float, default=30.0, metavar="SECONDS",
                   help="when stdout is not a terminal (nohup, CI, Slurm): a plain progress line at most every "
                        "SECONDS (default 30; 0: every logged step)")
    g.add_argument("--ckpt-every", type=int, default=0, metavar="STEPS",
                   help="a checkpoint every STEPS steps (default 0: none by step count)")
    g.add_argument("--ckpt-minutes", type=float, default=10.0, metavar="MINUTES",
                   help="a checkpoint when MINUTES have passed since the last one (default 10; 0: off). Ctrl-C or "
                        "SIGTERM also finish the step and write one; the last step always does")
    g.add_argument("--keep-last", type=int, default=3)
    g.add_argument("--no-final", action="store_true", help="skip writing RUN_DIR/final")
    g.add_argument("--tensorboard", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    g = p.add_argument_group("scale-out (under torchrun; see docs/training.md)")
    g.add_argument("--dp-shard", type=int, help="FSDP degree (default: what the other degrees leave of the world)")
    g.add_argument("--dp-replicate", type=int, default=1, help="HSDP replicas")
    g.add_argument("--tp", type=int, default=1, help="tensor (and sequence) parallel degree")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages")
    g.add_argument("--ep", type=int, default=1, help="expert parallel degree (borrows --dp-shard ranks)")
    g.add_argument("--pp-schedule", choices=("1f1b", "interleaved1f1b", "gpipe"), default="1f1b")
    g.add_argument("--pp-microbatches", type=int, help="pipeline micro-batches per micro-batch (default: --pp)")
    g.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="collectives waiting longer fail (a dead rank stops the job)")
    g.add_argument("--fsdp-always", action="store_true",
                   help="wrap with FSDP2 even where the data-parallel degree is 1 (e.g. one process: measures what "
                        "FSDP costs at a shape)")
    p.set_defaults(func=_train)

    p = sub.add_parser("plot", help="draw a run's training curves to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("arena", help="train the five tiny twins at a matched budget and compare them")
    p.add_argument("--out", default="arena")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--scale", type=int, default=1, help="multiply width by this (use on a GPU with more --steps)")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--aux-loss-coef", type=float, default=0.02)
    p.add_argument("--z-loss-coef", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--presets", nargs="+", help="subset of the tiny twins")
    p.add_argument("--no-isolate", action="store_true", help="train every twin in this process")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_arena)
