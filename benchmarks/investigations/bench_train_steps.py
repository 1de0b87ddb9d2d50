"""Why some training steps are slower than others: per-step throughput of the compiled Llama-3.2-1B step
(seq 2048, micro-batch 4, one log line a step) beside the GPU's SM clock, power and temperature, sampled by
`nvidia-smi` every 20 ms, and the caching allocator's retries (each one a device-wide sync).

    python benchmarks/investigations/bench_train_steps.py [--steps 30] [--compile-mode default]
    python benchmarks/investigations/bench_train_steps.py --smoke      # CPU check of the script (no clocks)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import _benchmarks_dir  # noqa: F401 - puts benchmarks/ on sys.path for bench_train
import giants
from bench_train import make_data
from giants.train.trainer import TrainConfig, Trainer


def parse_smi(text: str) -> list[tuple[float, float, float, float]]:
    """(unix time, SM MHz, watts, deg C) rows of `nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,...`."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            t = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((t, float(parts[1]), float(parts[2]), float(parts[3])))
        except ValueError:
            continue
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = giants.get_config("tiny-llama" if args.smoke else "llama-3.2-1b")
    seq = 32 if args.smoke else 2048
    smi = shutil.which("nvidia-smi") if torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), cfg.vocab_size, (args.steps + 8) * 4 * (seq + 1) * 2)
        (Path(tmp) / "m.json").write_text(json.dumps(cfg.to_dict()))
        tc = TrainConfig(out=f"{tmp}/run", preset=None, model_config=f"{tmp}/m.json", data=str(data),
                         ckpt_minutes=0,
                         tokenizer="bytes", seq_len=seq, batch_size=4, steps=args.steps, lr=1e-4, warmup_steps=0,
                         schedule="constant", compile="eager" if args.smoke else True,
                         compile_mode=args.compile_mode, eval_every=0, checkpoint_at_end=False, save_final=False,
                         progress=False)
        tr = Trainer(tc)
        done: dict[int, float] = {}
        retries: dict[int, int] = {}
        finish = tr._finish_step

        def timed_finish(rec: Any) -> dict[str, Any]:
            m = finish(rec)
            done[rec.step] = time.time()
            if torch.cuda.is_available():
                retries[rec.step] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            return m

        tr._finish_step = timed_finish  # type: ignore[method-assign]
        sampler = None
        smi_log = Path(tmp) / "smi.csv"
        with open(smi_log, "w") as log:  # a file, not a pipe: a full pipe would stall the sampler
            if smi:
                sampler = subprocess.Popen(
                    [smi, "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                     "--format=csv,noheader,nounits", "-lms", "20"], stdout=log, text=True)
            try:
                tr.run()
            finally:
                if sampler is not None:
                    sampler.terminate()
                    sampler.wait(timeout=10)
        text = smi_log.read_text()
        samples = parse_smi(text)
        rows = []
        for h in tr.history:
            k = h["step"]
            if k - 1 not in done:
                continue
            a, b = done[k - 1], done[k]
            inside = [s for s in samples if a <= s[0] <= b]
            rows.append({"step": k, "end": b, "tokens_per_s": h["tokens_per_s"], "ms": (b - a) * 1e3,
                         "sm_mhz_mean": statistics.mean(s[1] for s in inside) if inside else None,
                         "sm_mhz_min": min(s[1] for s in inside) if inside else None,
                         "watts_mean": statistics.mean(s[2] for s in inside) if inside else None,
                         "temp_c": inside[-1][3] if inside else None, "alloc_retries": retries.get(k)})

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"{'step':>4} {'tok/s':>8} {'ms':>7} {'SM MHz mean':>11} {'min':>6} {'W':>6} {'C':>4} {'retries':>7}")
    for r in rows:
        print(f"{r['step']:>4} {r['tokens_per_s']:>8,.0f} {r['ms']:>7.1f} {f(r['sm_mhz_mean'], '11.0f')} "
              f"{f(r['sm_mhz_min'], '6.0f')} {f(r['watts_mean'], '6.0f')} {f(r['temp_c'], '4.0f')} "
              f"{f(r['alloc_retries'], '7d')}")
    # left out: the first two rows (the step queued during compilation ran partly before its interval began) and
    # the last (cut short by the final drain)
    body = rows[2:-1] or rows
    rates = [r["tokens_per_s"] for r in body]
    print(f"median {statistics.median(rates):,.0f} tok/s, tokens/time {len(rates) / sum(1 / r for r in rates):,.0f}, "
          f"min {min(rates):,.0f}; {len(samples)} clock samples")
    clocked = [r for r in body if r["sm_mhz_mean"] is not None]
    if len(clocked) > 2:
        corr = statistics.correlation([r["ms"] for r in clocked], [r["sm_mhz_mean"] for r in clocked])
        print(f"correlation of step time with the mean SM clock: {corr:+.2f} over {len(clocked)} steps")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "samples": samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
