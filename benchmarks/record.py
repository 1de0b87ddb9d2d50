"""`--record`: the benchmark scripts add what they measured to giants' record of measured runs
(src/giants/analysis/measured_runs.json, shipped with the package; `giants fit` and `giants report` show it).

    python benchmarks/bench_fp8.py --record                # the package's record (a source checkout)
    python benchmarks/bench_fp8.py --record runs.json      # another file (same schema)

One entry per model and format measured, with the machine, the date (UTC), giants' version and commit ("+ working
tree" when tracked files differ from it), torch's version and the command line. A re-run of the same thing (same
script, model, GPU, format, commit and day) replaces its entry; the file is replaced atomically.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import giants
from giants.analysis.measured_runs import RUNS_PATH, gpu_key, record_run

GIB = 2**30


def add_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--record", nargs="?", const=str(RUNS_PATH), default=None, metavar="PATH",
                    help="add the runs measured to giants' record of measured runs (default file: "
                         "src/giants/analysis/measured_runs.json, which giants fit and giants report show)")


def _commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a checkout (an installed copy of the scripts): say so rather than guess
    return head + (" + working tree" if dirty else "") if head else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def precision(quantization: str | None, dtype: torch.dtype) -> str:
    if quantization:  # in `giants fit --dtype` terms
        if quantization.startswith("fp8"):
            return "fp8+mxfp4" if "+mxfp4" in quantization else "fp8"
        return quantization
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype).removeprefix("torch."))


def entry(model: str, device: torch.device, dtype: torch.dtype, *, quantization: str | None = None,
          tok_s_batch1: float | None = None, concurrent: dict[int, float] | None = None,
          memory_gib: float | None = None, memory_what: str | None = None, offload: str | None = None,
          random_weights: bool = True, note: str | None = None, gpus: int = 1) -> dict:
    """One run of `model` on this machine, as measured now."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, key = props.name, gpu_key(props.name, props.total_memory)
    else:
        name, key = _cpu_name(), "cpu"
    conc = {int(c): float(v) for c, v in (concurrent or {}).items()}
    script = Path(sys.argv[0]).name
    return {"model": model, "gpu": key, "gpu_name": name, "gpus": gpus, "precision": precision(quantization, dtype),
            "quantization": quantization, "memory_gib": None if memory_gib is None else round(memory_gib, 2),
            "memory_what": memory_what if memory_gib is not None else None,
            "tok_s_batch1": None if tok_s_batch1 is None else round(tok_s_batch1, 2),
            "tok_s_64_concurrent": round(conc.pop(64), 1) if 64 in conc else None,
            "tok_s_concurrent": {str(c): round(v, 1) for c, v in sorted(conc.items())},
            "offload": offload,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "giants_version": giants.__version__, "commit": _commit(), "torch": torch.__version__,
            "random_weights": random_weights, "script": f"benchmarks/{script}",
            "command": shlex.join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
            "source": f"recorded by benchmarks/{script} --record", "note": note}


def record(path: str | None, entries: list[dict]) -> None:
    """Write the entries (no-op without --record)."""
    if not path:
        return
    for e in entries:
        record_run(e, path)
        print(f"recorded {e['model']} {e['quantization'] or e['precision']} on {e['gpu_name']} in {path}", flush=True)
