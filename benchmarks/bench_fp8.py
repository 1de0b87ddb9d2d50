"""FP8 weights on the GPU: Llama-3.1-8B shape batch-1 decode in FP8 against bf16 in the same run (random weights,
bench_decode's machinery: CUDA graphs captured, 256 new tokens, median of 3), the ratio printed (goal >= 1.8x: half
the bytes a token reads), per-shape GEMV and prefill matmul tables, and with --big Llama-3-70B in FP8 on one 80 GB GPU
(bf16 would need 141 GB).

    python benchmarks/bench_fp8.py --out fp8.json          # 8B: bf16, fp8, fp8+head, fp8-block; kernel tables
    python benchmarks/bench_fp8.py --big --out fp8.json    # + Llama-3-70B fp8+head on one GPU
    python benchmarks/bench_fp8.py --modes bf16,fp8-block+head --no-kernels   # the decode ratio alone
    python benchmarks/bench_fp8.py --device cpu --quick    # smoke test of the script (tiny-llama)

On CUDA each decode is rerun in the same process with the batch-1 chain flipped, with 1, 2 and 8 key splits and
with the splits combined by a reduce kernel (`--no-reruns` skips them).

Reading the numbers: tok/s and fraction of the roofline (copy bandwidth / bytes a token reads); graph_replay_ms is
the GPU time of one decode step; gemv_us compares the FP8 GEMV with the best bf16 one-row kernel per weight shape (an
FP8 GEMV at the bf16 one's bandwidth takes half its time); prefill_tflops the 2048-token matmuls (bf16 cuBLAS,
_scaled_mm with per-token activation scales, the Triton weight-only GEMM, dequantize + cuBLAS).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402
import giants  # noqa: E402
import record  # noqa: E402
from giants.inference import LLM, SamplingParams  # noqa: E402

kgemv = importlib.import_module("giants.inference.kernels.gemv")  # (the package re-exports its gemv function)

LLAMA_8B_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                   "head": (128256, 4096)}


def decode(preset: str, quantization: str | None, device: torch.device, bw: float, new: int, util: float,
           check_tokens: int = 0, concurrent: int = 0, reruns: bool = True) -> tuple[dict, list[int]]:
    cfg = giants.get_config(preset)
    prompt = torch.randint(3, min(cfg.vocab_size, 32000), (16,), generator=torch.Generator().manual_seed(1)).tolist()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kw = {"gpu_memory_utilization": util} if device.type == "cuda" else {}
    t0 = time.perf_counter()
    llm = LLM(preset, device=device, dtype=dtype, seed=0, max_model_len=1024, max_num_seqs=max(4, concurrent),
              quantization=quantization, **kw)
    build_s = time.perf_counter() - t0
    b = bd.bytes_per_token(llm.model, 16 + new / 2)
    roof = bw / b["per_token"]
    g = bd.giants_decode(llm, prompt, new)
    r = {"preset": preset, "quantization": quantization or "bf16", "build_s": round(build_s, 1),
         "bytes_per_token": b, "roofline_tok_s": roof, "tok_s": g["tok_s"], "fraction_of_roofline": g["tok_s"] / roof,
         "graph_replay_ms": g.get("graph_replay_ms"), "ttft_s": g["ttft_s"], "runs_identical": g["runs_identical"]}
    if device.type == "cuda":
        r["max_memory_allocated_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    runner = llm.engine.runner
    if getattr(runner, "graphs", None) is not None and getattr(runner, "chain_possible", False) and reruns:
        # the same model and kernel picks, the batch-1 graph captured again with one switch flipped
        r["chain"] = runner.chain
        r["chain_times"] = runner.gemv_times.get("chain")
        r["chain_flipped"] = bd.rerun(preset, f"chain={not runner.chain}", llm, prompt, new, roof, g,
                                      lambda v: setattr(runner, "chain", v), not runner.chain, runner.chain)
        for n in (1, 2, 8):  # batch-1 attention over fewer (more) key splits: fewer (more) programs, less (more)
            # to combine
            r[f"short_splits_{n}"] = bd.rerun(preset, f"short_splits={n}", llm, prompt, new, roof, g,
                                              lambda v: setattr(runner, "short_splits", v), n, runner.short_splits)
        # every batch-1 GEMV waiting for the previous kernel before its first weight tile (no early stream)
        r["early_tile_off"] = bd.rerun(preset, "EARLY_TILE=False", llm, prompt, new, roof, g,
                                       lambda v: setattr(kgemv, "EARLY_TILE", v), False, kgemv.EARLY_TILE)
        # the key splits combined by a reduce kernel instead of by the attention's last split program
        r["attn_reduce_kernel"] = bd.rerun(preset, "fuse_attn_reduce=False", llm, prompt, new, roof, g,
                                           lambda v: setattr(runner, "fuse_attn_reduce", v), False,
                                           runner.fuse_attn_reduce)
    if check_tokens and getattr(runner, "fast", False):  # the fused graph decode against the generic path
        sp = SamplingParams(temperature=0, max_tokens=check_tokens, ignore_eos=True)
        fused = llm.generate([prompt], sp)[0].outputs[0].token_ids
        runner.fast = False  # every step through ModelRunner.execute, on the same (fused) weights
        try:
            generic = llm.generate([prompt], sp)[0].outputs[0].token_ids
        finally:
            runner.fast = True
        r["fused_vs_generic_tokens_agree"] = f"{bd.agree(fused, generic)}/{check_tokens}"
    check_tokens = check_tokens if "fused_vs_generic_tokens_agree" in r else 0
    if concurrent:  # `concurrent` requests decoding together (continuous batching), each its own prompt
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        prompts = [[(t + 7 * i) % 32000 + 3 for t in prompt] for i in range(concurrent)]
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # Twice: the first pass pays one-time work (the batch bucket's graph capture, kernel tuning at its row
        # count); the second is the steady figure. Engine stats say whether the KV cache forced preemptions.
        passes = []
        for _ in range(2):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            passes.append(n / (time.perf_counter() - t0))
        r[f"tok_s_{concurrent}_concurrent"] = passes[-1]
        r[f"tok_s_{concurrent}_concurrent_first_pass"] = passes[0]
        st = llm.engine.stats()
        r["engine_stats"] = {k: st[k] for k in ("kv_blocks_total", "kv_block_size", "num_preemptions", "num_steps")}
        r["graphs_captured"] = sorted(map(str, getattr(runner, "graphs", {})))
        print(f"{preset}: first pass {passes[0]:.1f} tok/s; {r['engine_stats']}; graphs {r['graphs_captured']}",
              flush=True)
        print(f"{preset} {r['quantization']}: {concurrent} concurrent requests x {new} tokens: "
              f"{r[f'tok_s_{concurrent}_concurrent']:.1f} tok/s in all (prefill included)", flush=True)
    print(f"{preset} {r['quantization']}: {g['tok_s']:.1f} tok/s = {g['tok_s'] / roof:.1%} of roofline {roof:.1f} "
          f"({b['per_token'] / 1e9:.2f} GB/token); replay {r['graph_replay_ms'] or 0:.3f} ms"
          + (f"; fused vs generic {r['fused_vs_generic_tokens_agree']}" if check_tokens else ""), flush=True)
    toks = g["tokens"]
    del llm, g
    free()
    return r, toks


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gemv_table(device: torch.device) -> dict:
    """Microseconds per one-row product for the 8B shapes: the best bf16 kernel (cuBLAS or Triton GEMV, as the
    decode picks it) against the FP8 GEMV at its timed config, both over cold weight copies in CUDA graphs."""
    from giants.inference import kernels as tk
    from giants.inference.fp8 import FP8Weight, quantize
    from giants.inference.kernels import fp8 as k8

    out = {}
    for name, (N, K) in LLAMA_8B_SHAPES.items():
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
        _, best, times = tk.pick_linear_1row(w, None)
        row = {"bf16_best": best, "bf16_us": round(times[best], 1)}
        x = torch.randn(1, K, device=device, dtype=torch.bfloat16)
        for label, block in (("fp8", None), ("fp8-block", (128, 128))):
            w8 = FP8Weight(*quantize(w, block), block)
            cfg = k8.pick_fp8_gemv(w8, None, torch.bfloat16)
            copies = [FP8Weight(q, w8.scale, w8.block) for q in tk.cold_copies(w8.q)]
            us = tk.time_ms(lambda i, x=x, c=copies, cfg=cfg: k8.fp8_gemv(x, c[i % len(c)], None, config=cfg),
                            30) * 1e3
            row[f"{label}_us"] = round(us, 1)
            row[f"{label}_GBs"] = round(N * K / us / 1e3, 1)
            row[f"{label}_config"] = cfg
            del w8, copies
        row["bf16_GBs"] = round(2 * N * K / row["bf16_us"] / 1e3, 1)
        row["speedup_fp8"] = round(row["bf16_us"] / row["fp8_us"], 2)
        out[name] = row
        print(f"gemv {name} {N}x{K}: bf16 {row['bf16_us']} us ({row['bf16_GBs']} GB/s, {best}); fp8 {row['fp8_us']} us "
              f"({row['fp8_GBs']} GB/s) = {row['speedup_fp8']}x; fp8-block {row['fp8-block_us']} us", flush=True)
        del w
        free()
    return out


def prefill_table(device: torch.device, M: int = 2048) -> dict:
    """TFLOP/s of an M-token prefill matmul per 8B shape along each FP8 path, against bf16 cuBLAS."""
    from giants.inference import kernels as tk
    from giants.inference.fp8 import FP8Weight, quantize

    out = {}
    x = None
    for name, (N, K) in LLAMA_8B_SHAPES.items():
        if name == "head":
            continue
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        flops = 2 * M * N * K
        row = {"bf16": flops / tk.time_ms(lambda i, x=x, w=w: torch.nn.functional.linear(x, w), 5) / 1e9}
        wc = FP8Weight(*quantize(w, None), None)
        wb = FP8Weight(*quantize(w, (128, 128)), (128, 128))
        paths = {"fp8_scaled_mm": (wc, "scaled_mm"), "fp8_triton_gemm": (wc, "gemm"),
                 "fp8-block_triton_gemm": (wb, "gemm"), "fp8-block_dequant": (wb, "dequant")}
        for label, (w8, path) in paths.items():
            try:
                row[label] = flops / tk.time_ms(lambda i, x=x, w8=w8, p=path: w8.linear(x, path=p), 5) / 1e9
            except Exception as e:  # noqa: BLE001 - e.g. _scaled_mm below Hopper
                row[label] = repr(e)[:120]
        out[name] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}
        print(f"prefill {M}x{name} {N}x{K} TFLOP/s: {out[name]}", flush=True)
        del w, wc, wb
        free()
    return out


def _record(path: str | None, device: torch.device, runs: dict[tuple[str, str], dict]) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    entries = []
    for (preset, mode), r in runs.items():
        if "tok_s" not in r:
            continue
        conc = {int(k.split("_")[2]): v for k, v in r.items() if k.startswith("tok_s_") and k.endswith("_concurrent")}
        mem = r.get("max_memory_allocated_GiB")
        speedup = f"; {r['speedup_vs_bf16']:.2f}x the unquantized decode of the same run" \
            if "speedup_vs_bf16" in r else ""
        entries.append(record.entry(preset, device, dtype, quantization=None if mode == "bf16" else mode,
                                    tok_s_batch1=r["tok_s"], concurrent=conc, memory_gib=mem,
                                    memory_what="max allocated (torch.cuda.max_memory_allocated)",
                                    note=f"{r['fraction_of_roofline']:.1%} of its {r['roofline_tok_s']:.1f} tok/s "
                                         f"roofline{speedup}"))
    record.record(path, entries)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--modes", default="bf16,fp8,fp8+head,fp8-block",
                    help="8B decode runs, in order (bf16 = no quantization)")
    ap.add_argument("--big", action="store_true", help="also Llama-3-70B in fp8+head on this one GPU")
    ap.add_argument("--big-mode", default="fp8+head")
    ap.add_argument("--no-kernels", action="store_true", help="skip the GEMV and prefill tables")
    ap.add_argument("--no-reruns", action="store_true",
                    help="skip the same-run decodes with the batch-1 chain flipped and 1 or 2 key splits")
    ap.add_argument("--quick", action="store_true", help="tiny-llama, few tokens: a smoke test of the script")
    ap.add_argument("--out", default=None)
    record.add_argument(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    res: dict = {"env": bd.env(device)}
    bw = bd.copy_bandwidth(device)
    res["copy_bandwidth_GBs"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    preset, new = ("tiny-llama", 16) if args.quick else ("llama-3.1-8b", args.new)
    runs, tokens = {}, {}
    for mode in args.modes.split(","):
        q = None if mode == "bf16" else mode
        try:
            runs[mode], tokens[mode] = decode(preset, q, device, bw, new, 0.45, check_tokens=0 if q is None else 32,
                                              reruns=not args.no_reruns)
        except Exception as e:  # noqa: BLE001 - one failing run must not hide the others' numbers
            import traceback

            traceback.print_exc()
            runs[mode] = {"error": repr(e)}
            free()
    res[preset] = runs
    base = runs.get("bf16", {}).get("tok_s")
    for mode, r in runs.items():
        if mode != "bf16" and base and "tok_s" in r:
            r["speedup_vs_bf16"] = r["tok_s"] / base
            r["greedy_tokens_agree_with_bf16"] = f"{bd.agree(tokens[mode], tokens['bf16'])}/{len(tokens['bf16'])}"
            print(f"{preset}: {mode} / bf16 decode = {r['speedup_vs_bf16']:.2f}x (goal >= 1.8x); greedy tokens agree "
                  f"for {r['greedy_tokens_agree_with_bf16']}", flush=True)
    if device.type == "cuda" and not args.no_kernels and not args.quick:
        for key, fn in (("gemv_us", gemv_table), ("prefill_tflops", prefill_table)):
            try:
                res[key] = fn(device)
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                res[key] = {"error": repr(e)}
            free()
    if args.big:
        try:
            res["llama-3-70b"], _ = decode("llama-3-70b", args.big_mode, device, bw, args.new, 0.95, check_tokens=16,
                                        concurrent=32, reruns=False)
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res["llama-3-70b"] = {"error": repr(e)}
    _record(args.record, device, {(preset, m): r for m, r in runs.items()} |
            ({("llama-3-70b", args.big_mode): res["llama-3-70b"]} if args.big else {}))
    text = json.dumps(res, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
