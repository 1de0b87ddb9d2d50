"""Where a batch-1 decode step spends its GPU time: torch.profiler over CUDA-graph replays of giants'
fused decode step, kernel time per step by kernel name, against the bytes the step must read.

    python benchmarks/investigations/bench_decode_profile.py --presets gpt-oss-20b,llama-3.1-8b --out profile.json
    python benchmarks/investigations/bench_decode_profile.py --presets llama-3.1-8b:fp8-block+head --pdl 0

A preset may name its quantization after a colon (`gpt-oss-120b:mxfp4`, `llama-3.1-8b:fp8`).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict

import torch

import _benchmarks_dir  # noqa: F401 - puts benchmarks/ on sys.path for bench_decode
from bench_decode import bytes_per_token, copy_bandwidth, env
from giants.inference import LLM, SamplingParams


def host_costs(llm, chunks, n: int = 200) -> dict:
    """Host microseconds of the pieces of one batch-1 decode step (GPU idle meanwhile unless overlapped)."""
    import time

    runner = llm.engine.runner
    graph = runner.graphs[min(runner.graphs)][0]
    out = {}
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        runner._fill(chunks, 1)
    out["fill_and_copy"] = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        graph.replay()
    out["graph_replay_call"] = (time.perf_counter() - t) / 20 * 1e6
    return {k: round(v, 1) for k, v in out.items()}


def profile_preset(preset: str, bw: float, quantization: str | None, replays: int = 20, util: float = 0.45) -> dict:
    llm = LLM(preset, device="cuda", dtype=torch.bfloat16, seed=0, max_model_len=1024, max_num_seqs=4,
              gpu_memory_utilization=util, quantization=quantization)
    prompt = list(range(3, 19))
    runner = llm.engine.runner
    seen = []
    execute = runner.execute
    # snapshots: a finished request's block tables are emptied
    runner.execute = lambda chunks, **kw: (seen.append(copy.deepcopy(chunks)), execute(chunks, **kw))[1]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    runner.execute = execute
    host = host_costs(llm, seen[-2])
    graph = runner.graphs[min(runner.graphs)][0]
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            per[ev.key[:100]][0] += ev.device_time_total / replays
            per[ev.key[:100]][1] += ev.count / replays
    total_us = sum(v[0] for v in per.values())
    b = bytes_per_token(llm.model, 24)
    from giants.inference.cuda_runner import replay_ms as time_replay  # needs triton: CUDA machines only

    replay_ms = time_replay(graph, replays)
    res = {"preset": preset, "quantization": quantization, "replay_ms": replay_ms, "kernel_us_sum": total_us,
           "bytes_per_token": b, "ideal_ms": b["per_token"] / bw * 1e3, "host_us": host,
           "kernels": {k: {"us_per_step": round(v[0], 1), "launches_per_step": v[1]}
                       for k, v in sorted(per.items(), key=lambda kv: -kv[1][0])},
           "tuning": {str(k): v for k, v in runner.gemv_times.items()}}
    print(f"\n== {preset} ({quantization}): replay {replay_ms:.3f} ms, kernels {total_us / 1e3:.3f} ms, "
          f"bytes-ideal {res['ideal_ms']:.3f} ms; {sum(v[1] for v in per.values()):.0f} launches", flush=True)
    print(f"   host per step (us): {host}", flush=True)
    for k, v in res["kernels"].items():
        print(f"   {v['us_per_step']:8.1f} us  x{v['launches_per_step']:5.0f}  {k}", flush=True)
    del llm
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="gpt-oss-20b,llama-3.1-8b")
    ap.add_argument("--out")
    ap.add_argument("--util", type=float, default=0.45, help="gpu_memory_utilization")
    ap.add_argument("--pdl", choices=("0", "1"), default=None,
                    help="programmatic dependent launch off (0) or on (1) for the captured graphs; with it on, a "
                         "kernel's profiled time includes its wait for the kernel before, so the per-kernel times "
                         "overlap (their sum exceeds the replay time); 0 gives each kernel's own time")
    args = ap.parse_args()
    if args.pdl is not None:
        from giants.inference import kernels as tk

        tk.set_pdl(args.pdl == "1")
    bw = copy_bandwidth(torch.device("cuda"))
    out = {"env": env(torch.device("cuda")), "copy_bandwidth_GBs": bw / 1e9, "presets": {}}
    for p in args.presets.split(","):
        name, _, quant = p.partition(":")  # e.g. llama-3.1-8b:fp8-block+head
        quant = quant or None
        out["presets"][p] = profile_preset(name, bw, quant, util=args.util)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
