"""Where a giants training step loses GPU time: a timeline of one compiled training run (Llama-3.2-1B shape, seq
2048, micro-batch 4, the Trainer's real loop) from torch.profiler's trace. It prints

- the step time, the GPU-busy time (union of kernels, copies and memsets) and the idle time between them;
- the idle gaps grouped by the host operation that launched the kernel after each gap (what the GPU waited for);
- the kernels by total time, with counts.

    python benchmarks/investigations/bench_train_trace.py --out trace.json [--trace-dir DIR] [--log-every 1]
    python benchmarks/investigations/bench_train_trace.py --smoke      # CPU check of the script (no CUDA timeline)
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import _benchmarks_dir  # noqa: F401 - puts benchmarks/ on sys.path for bench_train
import giants
from bench_train import env, make_data
from giants.train.trainer import TrainConfig, Trainer

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def analyse(trace: dict[str, Any], steps: int, min_gap_us: float = 2.0) -> dict[str, Any]:
    """Idle gaps on the GPU timeline, each attributed to the innermost host op around the launch of the GPU work
    that ended it."""
    evs = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in evs if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        return {"error": "no GPU events in the trace"}
    launch = {e["args"]["correlation"]: e for e in evs if e.get("cat") in ("cuda_runtime", "cuda_driver")
              and "correlation" in e.get("args", {})}
    host_ops: dict[Any, list[dict]] = defaultdict(list)
    for e in evs:
        if e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            host_ops[e["tid"]].append(e)
    starts = {}
    for tid, ops in host_ops.items():
        ops.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in ops]

    def enclosing(tid: Any, ts: float) -> list[str]:
        ops, st = host_ops.get(tid, []), starts.get(tid, [])
        i = bisect.bisect_right(st, ts)
        chain = [e for e in ops[max(0, i - 400):i] if e["ts"] <= ts <= e["ts"] + e["dur"]]
        chain.sort(key=lambda e: e["ts"])
        return [e["name"] for e in chain]

    busy_until = gpu[0]["ts"]
    busy = 0.0
    prev_name = ""
    by_cause: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    gaps = []
    for e in gpu:
        start, end = e["ts"], e["ts"] + e["dur"]
        if start > busy_until:
            gap = start - busy_until
            if gap >= min_gap_us:
                rt = launch.get(e["args"].get("correlation"))
                chain = enclosing(rt["tid"], rt["ts"]) if rt else []
                interesting = [c for c in chain if not c.startswith(("cuda", "ProfilerStep"))]
                cause = " > ".join(interesting[-3:]) if interesting else (rt["name"] if rt else "?")
                by_cause[cause[:160]][0] += gap
                by_cause[cause[:160]][1] += 1
                gaps.append({"gap_us": gap, "before": prev_name[:70], "after": e["name"][:70], "cause": cause[:200]})
            busy += end - start
            busy_until = end
        elif end > busy_until:
            busy += end - busy_until
            busy_until = end
        prev_name = e["name"]
    span = busy_until - gpu[0]["ts"]
    kern: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in gpu:
        kern[e["name"][:100]][0] += e["dur"] / steps
        kern[e["name"][:100]][1] += 1 / steps
    syncs = [e for e in evs if e.get("cat") == "cuda_runtime" and "Synchronize" in e["name"]]
    return {
        "span_ms_per_step": span / steps / 1e3, "busy_ms_per_step": busy / steps / 1e3,
        "idle_ms_per_step": (span - busy) / steps / 1e3,
        "idle_by_cause_ms_per_step": {k: round(v[0] / steps / 1e3, 3) for k, v in
                                      sorted(by_cause.items(), key=lambda kv: -kv[1][0])[:30]},
        "largest_gaps": sorted(gaps, key=lambda g: -g["gap_us"])[:30],
        "host_sync_ms_per_step": sum(e["dur"] for e in syncs) / steps / 1e3,
        "kernels_ms_per_step": {k: [round(v[0] / 1e3, 3), round(v[1], 1)] for k, v in
                                sorted(kern.items(), key=lambda kv: -kv[1][0])[:45]},
    }


def run(args, data: Path, cfg, *, stack: bool) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    smoke = args.smoke
    with tempfile.TemporaryDirectory() as run_dir:
        (Path(run_dir) / "m.json").write_text(json.dumps(cfg.to_dict()))
        tc = TrainConfig(out=run_dir, preset=None, model_config=str(Path(run_dir) / "m.json"), data=str(data),
                         ckpt_minutes=0,
                         tokenizer="bytes", seq_len=32 if smoke else 2048, batch_size=4,
                         steps=args.warmup + args.steps + 2, lr=1e-4, warmup_steps=0, schedule="constant",
                         compile="eager" if smoke else True, eval_every=0, checkpoint_at_end=False,
                         save_final=False, progress=False, log_every=args.log_every,
                         master_weights=None if args.master == "auto" else args.master == "on")
        tr = Trainer(tc)
        tr.run(until=args.warmup)
        acts = [ProfilerActivity.CPU] + ([] if smoke else [ProfilerActivity.CUDA])
        t0 = time.perf_counter()
        with profile(activities=acts, with_stack=stack) as prof:
            tr.run(until=args.warmup + args.steps)
        wall = time.perf_counter() - t0
        path = Path(run_dir) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        if args.trace_dir:
            out = Path(args.trace_dir)
            out.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as f, gzip.open(out / f"trace_{'stack' if stack else 'plain'}.json.gz", "wb") as g:
                shutil.copyfileobj(f, g)
        res = analyse(trace, args.steps)
        res["wall_ms_per_step"] = wall / args.steps * 1e3
        res["rates"] = [h["tokens_per_s"] for h in tr.history[-args.steps:]]
        res["optimizer"] = type(tr.optimizer).__name__
        del tr
    return res


def report(name: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"== {name}: {r['error']}")
        return
    print(f"\n== {name}: wall {r['wall_ms_per_step']:.1f} ms/step under the profiler; GPU span "
          f"{r['span_ms_per_step']:.1f}, busy {r['busy_ms_per_step']:.1f}, idle {r['idle_ms_per_step']:.1f} ms/step; "
          f"host sync calls {r['host_sync_ms_per_step']:.1f} ms/step ({r['optimizer']})")
    print("   idle by the host op that launched the next GPU work (ms/step):")
    for k, v in list(r["idle_by_cause_ms_per_step"].items())[:18]:
        print(f"     {v:7.3f}  {k}")
    print("   largest gaps:")
    for g in r["largest_gaps"][:12]:
        print(f"     {g['gap_us']:8.0f} us  {g['before'][:40]!r} -> {g['after'][:40]!r}  [{g['cause'][:110]}]")
    print("   kernels (ms/step, launches/step):")
    for k, (ms, n) in list(r["kernels_ms_per_step"].items())[:35]:
        print(f"     {ms:7.3f} {n:6.1f}  {k}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--master", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--stack", choices=("no", "yes", "both"), default="both",
                    help="python stacks in the trace (attribution) cost host time: 'both' runs twice")
    ap.add_argument("--trace-dir", help="keep the gzipped chrome traces here")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    cfg = giants.get_config("tiny-llama" if args.smoke else "llama-3.2-1b")
    res: dict[str, Any] = {"env": env(torch.device("cpu" if args.smoke else "cuda")), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), cfg.vocab_size, (args.warmup + args.steps + 4) * 4 * 2049 * 2)
        for stack in {"no": [False], "yes": [True], "both": [False, True]}[args.stack]:
            name = "with python stacks" if stack else "plain"
            res[name] = run(args, data, cfg, stack=stack)
            report(name, res[name])
            if args.out:
                Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
