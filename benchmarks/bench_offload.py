"""Decode speed of a model larger than the GPU (device_map="auto": blocks that do not fit stay in pinned host
memory and are streamed to the GPU every step) next to an in-memory model that fits, in one run. Random
weights (built on meta, allocated per placement, drawn on the fly): no checkpoint needed.

    python benchmarks/bench_offload.py              # Llama-3-70B bf16 offloaded vs Llama-3.1-8B in memory
    python benchmarks/bench_offload.py --quick      # Llama-3.1-8B with 8 GiB of GPU for weights vs Llama-3.2-1B
    python benchmarks/bench_offload.py --smoke      # CPU: tiny twins, blocks streamed from disk (script check)
    python benchmarks/bench_offload.py --gpu-budget 60GiB --tokens 8 --out offload.json

Per model: the placement, weight bytes on the GPU and streamed per step, decode tok/s at batch 1 (time of
1 + N generated tokens minus time of 1, so prefill is excluded), peak GPU memory, peak host RSS; for the
offloaded model also the pinned host-to-device bandwidth measured here and the tok/s it bounds
(bandwidth / streamed bytes per step). The in-memory model runs twice: with CUDA graphs (the default engine)
and with the generic runner (what a placed model runs on), so both costs are visible.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time

import torch

import record
from giants.inference import LLM, SamplingParams
from giants.inference.placement import parse_size

GB = 1e9


def log(msg: str) -> None:
    print(msg, flush=True)


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a pinned host -> device copy (the streaming path's ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return 5 * nbytes / (time.perf_counter() - t)


def host_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def decode_rate(llm: LLM, tokens: int, prompt_len: int, sync) -> tuple[float, float]:
    """(decode tok/s at batch 1, seconds of the 1-token run)."""
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(prompt_len)]

    def run(n: int) -> float:
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        sync()
        t = time.perf_counter()
        llm.generate([prompt], sp)
        sync()
        return time.perf_counter() - t

    run(2)  # warm-up (allocations, graph capture, first copies)
    t1 = min(run(1) for _ in range(2))
    tn = run(1 + tokens)
    return tokens / max(tn - t1, 1e-9), t1


def placement_bytes(llm: LLM) -> dict:
    pl = getattr(llm.model, "placement", None)
    total = sum(t.numel() * t.element_size() for t in llm.model.parameters())
    if pl is None:
        return {"placement": "all resident", "weights_gb": total / GB, "streamed_gb_per_step": 0.0}
    streamed = sum(pl.layouts[i].nbytes for i in pl.order)
    return {"placement": pl.summary(), "weights_gb": total / GB, "streamed_gb_per_step": streamed / GB,
            "streamed_blocks": len(pl.order), "blocks": len(pl.streamed)}


def bench(name: str, label: str, args, device: torch.device, **kw) -> dict:
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    log(f"\n== {label}: {name} ({args.dtype}) {kw.get('device_map') or 'in memory'} ==")
    t = time.perf_counter()
    llm = LLM(name, dtype=args.dtype, max_model_len=args.prompt_len + args.tokens + 16, max_num_seqs=1,
              num_blocks=None, seed=0, **kw)
    build_s = time.perf_counter() - t
    info = placement_bytes(llm)
    log(f"   built in {build_s:.1f} s: {info['placement']}")
    log(f"   weights {info['weights_gb']:.1f} GB, streamed per step {info['streamed_gb_per_step']:.1f} GB")
    rate, t1 = decode_rate(llm, args.tokens, args.prompt_len, sync)
    out = {"model": name, "label": label, "build_s": build_s, "decode_tok_s": rate, "prefill_plus_1_s": t1, **info,
           "host_peak_rss_gb": host_rss_gb()}
    if cuda:
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
    peak = f"GPU peak {out['gpu_peak_gb']:.1f} GB, " if cuda else ""
    log(f"   decode {rate:.3f} tok/s (batch 1, {args.tokens} tokens), prefill+1 {t1:.2f} s, {peak}"
        f"host peak RSS {out['host_peak_rss_gb']:.1f} GB")
    del llm
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", default=None, help="preset that does not fit the GPU (default llama-3-70b)")
    ap.add_argument("--small", default=None, help="preset that fits (default llama-3.1-8b)")
    ap.add_argument("--quick", action="store_true", help="llama-3.1-8b offloaded (8 GiB GPU budget) vs llama-3.2-1b")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny twins with blocks on disk (script check)")
    ap.add_argument("--gpu-budget", default=None, help="GPU bytes for weights of the big model (e.g. 60GiB); "
                    "default: 90%% of the card less 10%% for the KV cache")
    ap.add_argument("--cpu-budget", default=None, help="host bytes for offloaded blocks (default: available RAM)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens timed (default 4 offloaded, 32 else)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    record.add_argument(ap)
    args = ap.parse_args()

    if args.smoke:
        device = torch.device("cpu")
        big, small = args.big or "tiny-gemma2", args.small or "tiny-llama"
        args.dtype = args.dtype or "float32"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_offload: needs a CUDA GPU (or --smoke for a CPU check of the script)")
        device = torch.device("cuda:0")
        big = args.big or ("llama-3.1-8b" if args.quick else "llama-3-70b")
        small = args.small or ("llama-3.2-1b" if args.quick else "llama-3.1-8b")
        args.dtype = args.dtype or "bfloat16"
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "runs": []}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        bw = h2d_bandwidth(device)
        results.update(gpu_total_gb=total / GB, gpu_free_gb=free / GB, h2d_pinned_gb_s=bw / GB)
        log(f"{results['device']}: {total / GB:.1f} GB ({free / GB:.1f} free); pinned host->device {bw / GB:.1f} GB/s")

    tokens = args.tokens
    args.tokens = tokens or 32
    results["runs"].append(bench(small, "in memory, CUDA graphs" if device.type == "cuda" else "in memory",
                                 args, device))
    if device.type == "cuda":
        results["runs"].append(bench(small, "in memory, generic runner", args, device, use_cuda_graphs=False))

    args.tokens = tokens or (4 if not args.smoke else 8)
    with tempfile.TemporaryDirectory(prefix="giants-offload-") as folder:
        if args.smoke:
            from giants.inference.placement import unit_sizes
            from giants.model.transformer import build
            from giants.presets import PRESETS

            sizes = unit_sizes(build(PRESETS[big].config, device="meta"))
            budget = sum(s for n, s in sizes.items() if not n.startswith("layers.")) + 3 * sizes["layers.0"]
            max_memory = {"cpu": budget}
        else:
            max_memory = None
            if args.gpu_budget or args.cpu_budget or args.quick:
                from giants.inference.placement import serving_max_memory

                max_memory = serving_max_memory()
                if args.gpu_budget or args.quick:
                    max_memory = {"cuda:0": parse_size(args.gpu_budget or "8GiB"), "cpu": max_memory["cpu"]}
                if args.cpu_budget:
                    max_memory["cpu"] = parse_size(args.cpu_budget)
        run = bench(big, "offloaded (device_map=auto)", args, device, device_map="auto", max_memory=max_memory,
                    offload_folder=folder)
    if device.type == "cuda" and run["streamed_gb_per_step"]:
        run["bound_tok_s"] = results["h2d_pinned_gb_s"] / run["streamed_gb_per_step"]
        run["achieved_h2d_gb_s"] = run["decode_tok_s"] * run["streamed_gb_per_step"]
        log(f"   streaming bound {run['bound_tok_s']:.3f} tok/s at {results['h2d_pinned_gb_s']:.1f} GB/s; achieved "
            f"{run['achieved_h2d_gb_s']:.1f} GB/s")
    results["runs"].append(run)

    log("\nmodel                 placement                                     decode tok/s")
    for r in results["runs"]:
        log(f"{r['model']:<21} {r['label']:<45} {r['decode_tok_s']:10.3f}")
    _record(args.record, device, getattr(torch, args.dtype), results["runs"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        log(f"wrote {args.out}")


def _record(path: str | None, device: torch.device, dtype: torch.dtype, runs: list[dict]) -> None:
    """The offloaded model and the in-memory one with the default engine (the generic-runner run goes in the
    latter's note: one entry per model and format)."""
    generic = {r["model"]: r["decode_tok_s"] for r in runs if r["label"] == "in memory, generic runner"}
    entries = []
    for r in runs:
        if r["label"] == "in memory, generic runner":
            continue
        streamed = r.get("streamed_blocks")
        offload = (f"{streamed} of {r['blocks']} blocks streamed ({r['streamed_gb_per_step']:.1f} GB a step)"
                   if streamed else None)
        note = (f"bound {r['bound_tok_s']:.2f} tok/s by the host link, {r['achieved_h2d_gb_s']:.1f} GB/s achieved"
                if "bound_tok_s" in r else
                f"{generic[r['model']]:.1f} tok/s on the generic runner" if r["model"] in generic else None)
        entries.append(record.entry(r["model"], device, dtype, tok_s_batch1=r["decode_tok_s"], offload=offload,
                                    memory_gib=r["gpu_peak_gb"] * GB / record.GIB if "gpu_peak_gb" in r else None,
                                    memory_what="max allocated (torch.cuda.max_memory_allocated)", note=note))
    record.record(path, entries)


if __name__ == "__main__":
    main()
