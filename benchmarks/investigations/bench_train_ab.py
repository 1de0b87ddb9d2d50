"""A against B on the compiled Llama-3.2-1B training step (seq 2048, micro-batch 4, master weights), interleaved:
every variant gets its own Trainer, built and compiled up front, and the variants take turns running blocks of
steps. On the lent H200s the step runs at the board's power cap and its clock drifts by several percent within a
run (benchmarks/HISTORY.md), so variants timed one after the other can differ by more than the change being
measured; taking turns puts the drift on both sides.

    python benchmarks/investigations/bench_train_ab.py --variants tied,plain [--rounds 10 --block 5] [--out ab.json]
    python benchmarks/investigations/bench_train_ab.py --smoke     # CPU check of the script

Variants:
    tied    the default Trainer (the tied head reads the optimizer's bf16 copy of the embedding)
    plain   the tied head as plain autocast: bf16 cast of the fp32 embedding every step, gradients summed
    fused   tied, and the head + loss as one op (trainer.FUSED_HEAD_CE_DEVICES, off by default): the logits'
            gradient formed in the forward by one Triton kernel
    tied+qkv  tied, and q|k|v as one GEMM over the concatenated weights (k and v alone are narrow GEMMs)
    bf16res   tied, with the residual stream in bf16 (TrainConfig.residual_dtype="bf16", Megatron-LM's default)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import _benchmarks_dir  # noqa: F401 - puts benchmarks/ on sys.path for bench_train
import giants
from bench_train import env, make_data, palm_flops_per_token
from giants.model.attention import Attention
from giants.train import trainer as trainer_mod
from giants.train.trainer import TrainConfig, Trainer

H100_BF16 = 989e12


@contextlib.contextmanager
def _devices(tied: tuple[str, ...], fused: tuple[str, ...] = ()) -> Iterator[None]:
    """Where the Trainer takes the tied head and the fused head + loss (CPU too: the smoke run checks them)."""
    saved = trainer_mod.TIED_HEAD_DEVICES, trainer_mod.FUSED_HEAD_CE_DEVICES
    trainer_mod.TIED_HEAD_DEVICES, trainer_mod.FUSED_HEAD_CE_DEVICES = tied, fused
    try:
        yield
    finally:
        trainer_mod.TIED_HEAD_DEVICES, trainer_mod.FUSED_HEAD_CE_DEVICES = saved


ON = ("cuda", "cpu")


def _tied_head_on(devices: tuple[str, ...]) -> contextlib.AbstractContextManager:
    return _devices(devices)


def _fused_qkv(self: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = (self.q_proj, self.k_proj, self.v_proj)
    w = torch.cat([m.weight for m in parts])
    b = None if self.q_proj.bias is None else torch.cat([m.bias for m in parts])
    return F.linear(x, w, b).split([m.out_features for m in parts], dim=-1)


@contextlib.contextmanager
def _qkv_one_gemm() -> Iterator[None]:
    """q|k|v as one GEMM over the concatenated weights (bound to each Attention when the Trainer is built)."""
    with _tied_head_on(("cuda", "cpu")):
        yield
    _pending_patches.append(lambda tr: [setattr(m, "project_qkv", types.MethodType(_fused_qkv, m))
                                        for m in tr.model.modules() if isinstance(m, Attention)])


_pending_patches: list[Callable[[Trainer], object]] = []

# each variant: a context the Trainer is built in
VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "tied": lambda: _tied_head_on(("cuda", "cpu")),  # (CPU too: the smoke run checks this path)
    "plain": lambda: _tied_head_on(()),
    "tied+qkv": _qkv_one_gemm,
    "bf16res": lambda: _tied_head_on(("cuda", "cpu")),
    "fused": lambda: _devices(ON, ON),
}
# and TrainConfig fields it changes
CONFIG: dict[str, dict[str, Any]] = {"bf16res": {"residual_dtype": "bf16"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="tied,plain")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=6, help="steps each variant runs before the timed rounds")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    cfg = giants.get_config("llama-3.2-1b")
    seq, batch = 2048, 4
    if args.smoke:
        cfg = giants.get_config("tiny-llama").replace(tie_embeddings=True)
        seq, batch = 32, 2
    warmup = -(-args.warmup // args.block) * args.block  # whole blocks: each round's log line covers its block
    total = warmup + args.rounds * args.block
    res: dict[str, Any] = {"env": env(torch.device("cpu" if args.smoke else "cuda")), "seq": seq, "batch": batch,
                           "rounds": args.rounds, "block": args.block, "variants": {}}
    palm = palm_flops_per_token(cfg, seq)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), cfg.vocab_size, (total + 4) * batch * (seq + 1) * 2)
        (Path(tmp) / "m.json").write_text(json.dumps(cfg.to_dict()))
        trainers: dict[str, Trainer] = {}
        for n in names:
            tc = TrainConfig(out=f"{tmp}/run_{n}", preset=None, model_config=f"{tmp}/m.json", data=str(data),
                             ckpt_minutes=0,
                             tokenizer="bytes", seq_len=seq, batch_size=batch, steps=total, lr=1e-4,
                             warmup_steps=0, schedule="constant", compile="eager" if args.smoke else True,
                             eval_every=0, ckpt_every=0, checkpoint_at_end=False, save_final=False, progress=False,
                             log_every=args.block, device="cpu" if args.smoke else "cuda",
                             precision="bf16", master_weights=True, weight_decay=0.1, **CONFIG.get(n, {}))
            try:
                with VARIANTS[n]():
                    tr = Trainer(tc)
                while _pending_patches:
                    _pending_patches.pop()(tr)
                tr.run(until=warmup)  # compiles
            except Exception as e:  # keep the other variants
                print(f"{n}: FAILED {type(e).__name__}: {e}", flush=True)
                res["variants"][n] = {"error": f"{type(e).__name__}: {e}"}
                continue
            trainers[n] = tr
            print(f"{n}: built, {warmup} warm-up steps, tied head: {tr.tied_head is not None}", flush=True)
        names = [n for n in names if n in trainers]
        rates: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]  # alternate who goes first
            for n in order:
                tr = trainers[n]
                tr.run(until=tr.step + args.block)
                rates[n].append(tr.history[-1]["tokens_per_s"])
            print(f"round {r}: " + ", ".join(f"{n} {rates[n][-1]:,.0f}" for n in names), flush=True)
        for n in names:
            med = statistics.median(rates[n])
            out = {"tokens_per_s": rates[n], "median": med, "step_ms": batch * seq / med * 1e3,
                   "mfu_palm": med * palm / H100_BF16, "loss_last": trainers[n].history[-1]["train_loss"]}
            if torch.cuda.is_available() and not args.smoke:
                out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            res["variants"][n] = out
        base = names[-1]
        print(f"\nvariant | median tok/s | step ms | MFU PaLM | paired ratio vs {base} (median of rounds)")
        for n in names:
            v = res["variants"][n]
            paired = statistics.median(a / b for a, b in zip(rates[n], rates[base]))
            v["paired_ratio_vs_" + base] = paired
            print(f"{n:7s} | {v['median']:12,.0f} | {v['step_ms']:7.1f} | {100 * v['mfu_palm']:7.2f}% | {paired:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
