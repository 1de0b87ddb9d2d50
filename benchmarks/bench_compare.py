"""Benchmark: `giants compare` over every preset (target < 2 s), against the reference way of getting the
same parameter counts: instantiate each model with transformers on the meta device and sum numel().

Also checks that both agree on every count. Run: python benchmarks/bench_compare.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _cli_seconds(args: list[str], repeats: int = 5) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeats):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "giants.cli", *args], capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - t)
        out = res.stdout
    return statistics.median(times), out


def _import_torch_seconds(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _hf_counts(names: list[str]) -> tuple[dict[str, int], float]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from giants.presets import get_config

    counts, t0 = {}, time.perf_counter()
    for name in names:
        hf = get_config(name).to_hf()
        config = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts, time.perf_counter() - t0


def main() -> int:
    import torch
    import transformers

    import giants
    from giants.analysis.compare import REAL_PRESETS, compare_records
    from giants.presets import PRESETS

    names = list(PRESETS)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load:.1f}); python "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"giants {giants.__version__}")

    cli_s, out = _cli_seconds(["compare", *names, "--format", "json"])
    rows = json.loads(out)
    startup_s, _ = _cli_seconds(["presets"])
    torch_s = _import_torch_seconds()
    t = time.perf_counter()
    for _ in range(20):
        compare_records(names)
    inproc_ms = (time.perf_counter() - t) / 20 * 1e3
    print(f"giants compare, all {len(names)} presets, JSON, fresh process: {cli_s:.2f} s median of 5 "
          f"(target < 2 s); `giants presets` startup alone: {startup_s:.2f} s, of which `import torch` "
          f"{torch_s:.2f} s")
    print(f"compare_records() in process, all {len(names)} presets: {inproc_ms:.1f} ms")

    hf_names = [n for n in REAL_PRESETS if PRESETS[n].config.position == "rope"]  # no HF family has T5 bias
    hf_counts, hf_s = _hf_counts(hf_names)
    ours = {r["preset"]: r["params_total"] for r in rows}
    t = time.perf_counter()
    compare_records(hf_names)
    ours_s = time.perf_counter() - t
    bad = {n: (ours[n], hf_counts[n]) for n in hf_names if ours[n] != hf_counts[n]}
    print(f"reference: transformers meta-device models for {len(hf_names)} real presets: {hf_s:.2f} s; giants "
          f"closed form for the same: {ours_s * 1e3:.1f} ms ({hf_s / ours_s:,.0f}x faster)")
    print(f"parameter counts equal to transformers' on {len(hf_names) - len(bad)}/{len(hf_names)} presets"
          + (f"; MISMATCH {bad}" if bad else ""))
    return 1 if bad or cli_s >= 2.0 else 0


if __name__ == "__main__":
    sys.exit(main())
