"""Offline throughput: N concurrent requests (32 random prompt tokens, 1024 new, sampled at temperature 1,
ignore_eos), Llama-3.1-8B shape, bf16, random weights. Reports output tok/s, time to first token and
inter-token latency p50/p99 per concurrency, and transformers' batched generate on the same shapes
(static cache, fewer new tokens to bound its run time) in the same run.

    python benchmarks/bench_throughput.py --concurrency 32,64,128,256 --out throughput.json --record
    python benchmarks/bench_throughput.py --preset tiny-llama --device cpu --concurrency 4 --new 16
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

import giants
import record
from bench_decode import env, hf_model  # noqa: I001 - sibling script
from giants.inference import LLM, SamplingParams


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run(llm: LLM, n: int, prompt_len: int, new: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = llm.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(n)]
    sp = SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True)
    engine = llm.engine
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, sp, arrival_time=t0)
    last: dict[str, float] = {}
    itl: list[float] = []
    ttft: list[float] = []
    generated = 0
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        now = time.perf_counter()
        for o in outs:
            k = len(o.outputs[0].new_token_ids)
            if not k:
                continue
            generated += k
            if o.request_id in last:
                itl.append((now - last[o.request_id]) / k)
            else:
                ttft.append(now - t0)
            last[o.request_id] = now
    wall = time.perf_counter() - t0
    return {"requests": n, "prompt_tokens": prompt_len, "new_tokens": new, "generated": generated,
            "wall_s": wall, "output_tok_s": generated / wall, "steps": steps,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
            "preemptions": engine.stats()["num_preemptions"]}


def hf_throughput(cfg, device: torch.device, dtype: torch.dtype, n: int, prompt_len: int, new: int) -> dict:
    model = hf_model(cfg, dtype, device)
    ids = torch.randint(3, cfg.vocab_size, (n, prompt_len), device=device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
              cache_implementation="static")
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up / compile
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    gen = (out.shape[1] - prompt_len) * n
    del model
    return {"requests": n, "new_tokens": new, "wall_s": wall, "output_tok_s": gen / wall, "mode": "static cache"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--concurrency", default="32,64,128,256")  # 64: the measured-runs record's column
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--hf-new", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=128)
    ap.add_argument("--out", default=None)
    record.add_argument(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    conc = [int(c) for c in args.concurrency.split(",")]
    res = {"env": env(device), "preset": args.preset, "dtype": str(dtype)}
    t0 = time.perf_counter()
    util = {"gpu_memory_utilization": 0.85} if device.type == "cuda" else {}  # CUDA only: refused on the CPU
    llm = LLM(args.preset, device=device, dtype=dtype, seed=0, max_model_len=args.prompt + args.new + 16,
              max_num_seqs=max(conc), **util)
    res["build_s"] = time.perf_counter() - t0
    res["kv_blocks_total"] = llm.engine.stats()["kv_blocks_total"]
    run(llm, min(conc), args.prompt, 8, seed=99)  # warm-up: Triton compiles, first graph
    for c in conc:
        r = run(llm, c, args.prompt, args.new, seed=c)
        res[f"giants_c{c}"] = r
        print(f"giants c={c}: {r['output_tok_s']:.0f} tok/s, TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms "
              f"p99 {r['ttft_p99_s'] * 1e3:.0f} ms, ITL p50 {r['itl_p50_ms']:.1f} ms p99 {r['itl_p99_ms']:.1f} ms",
              flush=True)
    mem = torch.cuda.max_memory_allocated(device) / record.GIB if device.type == "cuda" else None
    record.record(args.record, [record.entry(
        args.preset, device, dtype, concurrent={c: res[f"giants_c{c}"]["output_tok_s"] for c in conc},
        memory_gib=mem, memory_what="max allocated (KV cache pool included)",
        note=f"{args.prompt} prompt + {args.new} new tokens a request, temperature 1; TTFT p50 "
             + ", ".join(f"{res[f'giants_c{c}']['ttft_p50_s'] * 1e3:,.0f} ms @{c}" for c in conc))])
    del llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.hf_batch:
        h = hf_throughput(giants.get_config(args.preset), device, dtype, args.hf_batch, args.prompt, args.hf_new)
        res["transformers"] = h
        print(f"transformers {h['requests']} x {h['new_tokens']} new: {h['output_tok_s']:.0f} tok/s", flush=True)
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
