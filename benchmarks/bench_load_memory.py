"""Peak host memory while loading an HF checkpoint: giants.load vs transformers from_pretrained.

Generates a llama-shaped checkpoint (~1.3 GB in bf16 by default) with giants.save, then loads it in fresh
subprocesses, one loader each, and reports peak RSS (VmHWM) against the bytes of the final weights,
both as the process's whole peak and as the growth over the process's RSS just before the load call
(which excludes the ~0.3-0.5 GB that importing torch/transformers costs). Each configuration runs with the
files already in the page cache (read once beforehand), so both loaders see the same disk state.

    python benchmarks/bench_load_memory.py [--layers 12] [--dtype bfloat16] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
torch.set_num_threads(2)
if which == "giants":
    import giants
    from giants.checkpoint import load
else:
    import transformers
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec, so a child of a
# big process would report the parent's size. VmHWM belongs to this process's own address space.
base = status("VmRSS")
peak0 = status("VmHWM")
t = time.perf_counter()
if which == "giants":
    model = load(path, dtype=dtype)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
wall = time.perf_counter() - t
weights = sum(p.numel() * p.element_size() for p in model.parameters())
load_peak = status("VmHWM")
# transformers can hand back parameters that are still views of the mmap'd files, not yet read; touch one
# element per 2 KiB of every weight so each loader is measured with the weights actually in memory.
with torch.no_grad():
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        float(flat[:: max(1, 2048 // p.element_size())].float().sum())
print(json.dumps({"base_mb": base, "peak_before_mb": peak0, "wall_s": wall, "weights_mb": weights / 2**20,
                  "load_peak_mb": load_peak, "peak_mb": status("VmHWM"), "final_mb": status("VmRSS"),
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_checkpoint(path: Path, layers: int, dtype: str, shard: str) -> None:
    import torch

    import giants
    from giants import ModelConfig
    from giants.checkpoint import save

    cfg = ModelConfig(vocab_size=32000, d_model=2048, n_layers=layers, n_heads=16, n_kv_heads=4, head_dim=128,
                      ffn_dim=5632, max_context=4096, rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
    model = giants.build(cfg, device="meta").materialize("cpu", getattr(torch, dtype))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    save(model, path, max_shard_size=shard)


def run_child(which: str, path: Path, dtype: str) -> dict:
    for f in path.glob("*.safetensors"):  # page-cache warm for both loaders
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path), dtype], capture_output=True, text=True,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16", help="checkpoint dtype on disk")
    ap.add_argument("--shard", default="500MB", help="max shard size of the generated checkpoint")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--write-results", action="store_true",
                    help="replace the ## checkpoint section of HISTORY.md (the RESULTS.md dashboard row: by hand)")
    args = ap.parse_args()

    import torch
    import transformers

    import giants

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="giants-bench-"))
    ckpt = tmp / "llama-bench"
    t = time.perf_counter()
    make_checkpoint(ckpt, args.layers, args.dtype, args.shard)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {ckpt} ({size / 2**30:.2f} GiB in {len(list(ckpt.glob('*.safetensors')))} shards, "
          f"written in {time.perf_counter() - t:.1f} s)")
    rows = []
    for load_dtype in (args.dtype, "float32"):
        for which in ("giants", "transformers"):
            r = run_child(which, ckpt, load_dtype)
            r.update(loader=which, load_dtype=load_dtype,
                     ratio_peak=r["peak_mb"] / r["weights_mb"],
                     ratio_growth=(r["peak_mb"] - r["base_mb"]) / r["weights_mb"])
            rows.append(r)
            print(f"{which:12s} {args.dtype}->{load_dtype:9s} weights {r['weights_mb']:8.0f} MiB  in load "
                  f"{r['load_peak_mb']:8.0f} MiB  peak RSS "
                  f"{r['peak_mb']:8.0f} MiB ({r['ratio_peak']:.2f}x)  before load {r['base_mb']:6.0f} MiB  "
                  f"growth {r['ratio_growth']:.2f}x  wall {r['wall_s']:.2f} s")
    try:
        load_avg = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load_avg = "?"
    env = (f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs (load avg {load_avg}); python "
           f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
           f"giants {giants.__version__}")
    table = ["| loader | disk -> load dtype | final weights | peak RSS in load call | peak RSS, weights resident | "
             "peak / weights | RSS before load | (peak - before) / weights | load wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['loader']} | {args.dtype} -> {r['load_dtype']} | {r['weights_mb']:.0f} MiB | "
                     f"{r['load_peak_mb']:.0f} MiB | {r['peak_mb']:.0f} MiB | {r['ratio_peak']:.2f}x | "
                     f"{r['base_mb']:.0f} MiB | {r['ratio_growth']:.2f}x | {r['wall_s']:.2f} s |")
    section = "\n".join([
        "## checkpoint", "",
        f"`python benchmarks/bench_load_memory.py` ({time.strftime('%Y-%m-%d %H:%M %Z')}; CPU box: {env}).",
        f"A llama-shaped checkpoint (d_model 2048, {args.layers} layers, GQA 16/4, FFN 5632, vocab 32000, untied; "
        f"{size / 2**30:.2f} GiB of {args.dtype} safetensors in {args.shard} shards) written by `giants.save`, "
        "then loaded in a fresh process per row, files already in the page cache. Peak RSS is the child's "
        "`VmHWM` (its own high-water mark; `ru_maxrss` would include the parent's size inherited across exec).", "",
        *table, "",
        *notes(rows), "",
    ])
    print()
    print(section)
    if args.write_results:
        write_section(Path(__file__).with_name("HISTORY.md"), section)


def notes(rows: list[dict]) -> list[str]:
    g = {r["load_dtype"]: r for r in rows if r["loader"] == "giants"}
    t = {r["load_dtype"]: r for r in rows if r["loader"] == "transformers"}
    out = []
    for dt in g:
        out.append(f"- {dt}: giants peak {g[dt]['ratio_peak']:.2f}x the final weights for the whole process "
                   f"({g[dt]['ratio_growth']:.2f}x counting only what the load added), transformers "
                   f"{t[dt]['ratio_peak']:.2f}x ({t[dt]['ratio_growth']:.2f}x).")
    out.append("- giants reads each tensor with positioned reads straight into the already-allocated parameter when "
               "the dtype matches (no mmap pages held, no second copy); converting dtypes costs one tensor-sized "
               "temporary at a time. The whole-process figure includes the interpreter with torch imported.")
    out.append("- transformers returns same-dtype weights as views of its mmap of the files, so its RSS during the "
               "call stays low and grows when the weights are first read (file-backed pages the kernel may drop "
               "and re-read); the 'weights resident' column reads every weight once after loading, for both.")
    return out


def write_section(results: Path, section: str) -> None:
    """Replace (or append) only the `## checkpoint` section."""
    text = results.read_text()
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## checkpoint"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:]) + "\n"
    results.write_text(text)


if __name__ == "__main__":
    main()
