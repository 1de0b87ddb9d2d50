"""Where a compiled giants training step spends its GPU time (Llama-3.2-1B shape, seq 2048, micro-batch 4),
and whether preferring cuDNN attention in SDPA helps. CUDA kernel time per step by category, from
torch.profiler over 3 steps after warm-up.

    python benchmarks/investigations/bench_train_profile.py --out profile.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

import _benchmarks_dir  # noqa: F401 - puts benchmarks/ on sys.path for bench_train
import giants
from bench_train import H100_BF16, env, make_data
from giants.analysis.flops import training_flops_per_token
from giants.train.trainer import TrainConfig, Trainer

CATEGORIES = [  # first match wins
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("gemm", r"gemm|xmma|cutlass|nvjet|sm90|cublas|matmul"),
    ("fused elementwise/reductions (triton)", r"triton"),
    ("copies/casts", r"copy|cast|to_copy"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def run(cfg, data: Path, *, sdpa: str, steps: int, warmup: int, smoke: bool = False) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                           SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}[sdpa]
    with tempfile.TemporaryDirectory() as run_dir:
        (Path(run_dir) / "m.json").write_text(json.dumps(cfg.to_dict()))
        tc = TrainConfig(out=run_dir, preset=None, model_config=str(Path(run_dir) / "m.json"), data=str(data),
                         ckpt_minutes=0,
                         tokenizer="bytes", seq_len=32 if smoke else 2048, batch_size=4,
                         steps=warmup + steps + 3, lr=1e-4, warmup_steps=0, schedule="constant",
                         compile="eager" if smoke else True, eval_every=0, checkpoint_at_end=False,
                         save_final=False, progress=False)
        tr = Trainer(tc)
        ctx = sdpa_kernel(backends, set_priority=True) if backends else _null()
        with ctx:
            tr.run(until=warmup + steps)
            rates = [h["tokens_per_s"] for h in tr.history[warmup:]]
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU if smoke else ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    tr.train_step()
                if not smoke:
                    torch.cuda.synchronize()
        per_cat: dict[str, float] = defaultdict(float)
        top: dict[str, float] = defaultdict(float)
        every: dict[str, list[float]] = {}
        for ev in prof.key_averages():
            t = (ev.self_cpu_time_total if smoke else ev.device_time_total) / 1e3 / 3  # ms per step
            if t <= 0:
                continue
            per_cat[category(ev.key)] += t
            top[ev.key[:90]] += t
            every[ev.key[:300]] = [round(t, 4), ev.count / 3]  # ms and launches a step
    tps = statistics.median(rates)
    return {"tokens_per_s": tps, "step_ms": tc.batch_size * tc.seq_len / tps * 1e3, "gpu_ms_by_category": dict(per_cat),
            "gpu_ms_total": sum(per_cat.values()),
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:25]),
            "all_kernels_ms_count": dict(sorted(every.items(), key=lambda kv: -kv[1][0]))}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--variants", default="default,cudnn")
    ap.add_argument("--smoke", action="store_true", help="CPU check of the script (tiny model, eager backend)")
    ap.add_argument("--out")
    args = ap.parse_args()
    cfg = giants.get_config("tiny-llama" if args.smoke else "llama-3.2-1b")
    fpt = training_flops_per_token(cfg, 2048)
    res = {"env": env(torch.device("cpu" if args.smoke else "cuda")), "flops_per_token": fpt, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), cfg.vocab_size, 40 * 4 * 2049)
        for v in args.variants.split(","):
            try:
                r = run(cfg, data, sdpa=v, steps=args.steps, warmup=args.warmup, smoke=args.smoke)
            except Exception as e:  # keep the other variant
                r = {"error": f"{type(e).__name__}: {e}"}
            res["variants"][v] = r
            if "error" not in r:
                r["mfu"] = r["tokens_per_s"] * fpt / H100_BF16
                print(f"\n== {v}: {r['tokens_per_s']:,.0f} tok/s, {r['step_ms']:.1f} ms/step, "
                      f"MFU {100 * r['mfu']:.1f}%, GPU kernel time {r['gpu_ms_total']:.1f} ms/step", flush=True)
                for cat, ms in sorted(r["gpu_ms_by_category"].items(), key=lambda kv: -kv[1]):
                    print(f"   {cat:40s} {ms:7.1f} ms", flush=True)
                for k, ms in list(r["top_kernels_ms"].items())[:12]:
                    print(f"      {ms:6.1f} ms  {k}", flush=True)
            else:
                print(v, r["error"], flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
