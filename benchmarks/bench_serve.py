"""Serving under load: `giants serve` with 64 concurrent streaming clients for 30 s, against transformers
serving the same requests one at a time (what a server without continuous batching does).

    python benchmarks/bench_serve.py                      # SmolLM2-135M-Instruct, 64 clients, 30 s
    python benchmarks/bench_serve.py --model tiny-llama --duration 10

Steps, all in this one run on the same machine:
1. start `giants serve MODEL` (a real process on a free loopback port);
2. send each of the request specs alone, one after another (the greedy reference answers);
3. closed loop: CONCURRENCY clients stream requests (completions and chat mixed, mixed prompt and output
   lengths, greedy) for DURATION seconds; count failures, compare every answer with its reference, and
   take latency / time-to-first-token percentiles and output throughput;
4. SIGTERM the server and check it exits 0;
5. transformers: the same token ids, `generate` greedy with the same max_new_tokens, one request at a time,
   on the same weights (the GGUF for smollm2-135m); its output tok/s is what a one-at-a-time server can
   reach at best, and the ratio to ours is printed.
Prints a markdown block for benchmarks/HISTORY.md (section `## serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
import time

import torch

from giants.serve.launch import ServerProcess
from giants.serve.loadgen import default_specs, run_alone, run_load, summarize


def _ids(tok, spec) -> list[int]:
    if spec.chat:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": spec.prompt}]),
                          add_special_tokens=False)
    return tok.encode(spec.prompt)


def engine_in_process(model_name: str, specs, concurrency: int, duration: float, max_model_len: int):
    """The same closed loop with no HTTP at all: the engine in this process, `concurrency` requests kept in
    the batch for `duration` s. (tok/s, requests) -- the ceiling the server's overhead is measured against."""
    from giants.inference import LLM, SamplingParams

    llm = LLM(model_name, max_model_len=max_model_len, max_num_seqs=concurrency)
    e, tok = llm.engine, llm.tokenizer
    ids = [_ids(tok, s) for s in specs]
    n, tokens, done = 0, 0, 0

    def add() -> None:
        nonlocal n
        i = n % len(specs)
        e.add_request(f"r{n}", ids[i], SamplingParams(temperature=0, max_tokens=specs[i].max_tokens))
        n += 1

    t0 = time.perf_counter()
    for _ in range(concurrency):
        add()
    while e.has_unfinished_requests():
        for r in e.step():
            if r.finished:
                tokens += len(r.outputs[0].token_ids)
                done += 1
                if time.perf_counter() - t0 < duration:
                    add()
    return tokens / (time.perf_counter() - t0), done


def transformers_one_at_a_time(model_name: str, specs, tok) -> tuple[float, int, float, list[list[int]]]:
    """(tok/s, tokens, seconds, generated ids per spec) for transformers greedy generate, batch 1, in sequence."""
    from transformers import AutoModelForCausalLM

    from giants.checkpoint import hub

    if model_name in hub.KNOWN_MODELS:
        path = hub.download(model_name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    else:
        import tempfile

        import giants
        from giants.inference.llm import random_model

        model = random_model(model_name, torch.device("cpu"), torch.float32, seed=0)
        d = tempfile.mkdtemp(prefix="bench-serve-")
        giants.save(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    eos = sorted(tok.eos_token_ids) or None
    outs, total, t0 = [], 0, time.perf_counter()
    for s in specs:
        ids = _ids(tok, s)
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=s.max_tokens, do_sample=False,
                            eos_token_id=eos, pad_token_id=eos[0] if eos else None)
        new = y[0, len(ids):].tolist()  # with the EOS token, counted as the engine counts it
        outs.append(new)
        total += len(new)
    dt = time.perf_counter() - t0
    return total / dt, total, dt, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--specs", type=int, default=16, help="distinct requests the clients cycle through")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--no-reference", action="store_true", help="skip the transformers run")
    args = ap.parse_args()

    import transformers

    import giants

    specs = default_specs(args.specs)
    print(f"giants serve {args.model}: {args.concurrency} streaming clients for {args.duration:.0f} s, "
          f"{len(specs)} distinct greedy requests (prompt {min(len(s.prompt) for s in specs)}-"
          f"{max(len(s.prompt) for s in specs)} chars, {min(s.max_tokens for s in specs)}-"
          f"{max(s.max_tokens for s in specs)} new tokens, every 4th through chat)", flush=True)
    load_before = os.getloadavg()[0]
    srv = ServerProcess(args.model, "--max-num-seqs", str(args.concurrency), "--max-model-len",
                        str(args.max_model_len), "--log-level", "warning").start()
    try:
        alone = asyncio.run(run_alone(srv.base_url, args.model, specs))
        bad = [r.error for r in alone if r.error or not r.done]
        if bad:
            raise SystemExit(f"reference requests failed: {bad}")
        results, wall = asyncio.run(run_load(srv.base_url, args.model, specs, concurrency=args.concurrency,
                                             duration=args.duration))
        m = srv.metrics()
        srv.terminate()
        code = srv.wait(timeout=120)
    finally:
        srv.stop()
    s = summarize(results, wall)
    same = sum(1 for r in results if r.error is None and (r.text, r.finish_reason) ==
               (alone[r.spec_index].text, alone[r.spec_index].finish_reason))
    itl_n = m.get("giants_inter_token_latency_seconds_count", 0)
    itl_mean = m.get("giants_inter_token_latency_seconds_sum", 0) / itl_n if itl_n else float("nan")
    print(f"requests {s.requests}, failed {s.failed} {s.errors or ''}, identical to alone {same}/{s.requests}")
    print(f"wall {wall:.1f} s, output {s.output_tokens} tokens = {s.tokens_per_s:.1f} tok/s, "
          f"{s.requests_per_s:.2f} req/s")
    print(f"latency p50 {s.latency_p50:.2f} s p99 {s.latency_p99:.2f} s; TTFT p50 {s.ttft_p50:.3f} s "
          f"p99 {s.ttft_p99:.3f} s; inter-token mean {itl_mean * 1000:.0f} ms (server histogram)")
    print(f"server exit code after SIGTERM: {code}")

    eng_tps, eng_n = engine_in_process(args.model, specs, args.concurrency, args.duration, args.max_model_len)
    print(f"engine in process, same closed loop without HTTP: {eng_n} requests, {eng_tps:.1f} tok/s; "
          f"through the server: {s.tokens_per_s / eng_tps:.2f} of that")

    ref_line = ""
    if not args.no_reference:
        tok = giants.load_tokenizer(args.model if args.model == "smollm2-135m" else "smollm2-135m")
        tps, n_tok, dt, outs = transformers_one_at_a_time(args.model, specs, tok)
        same_tok = sum(1 for o, a in zip(outs, alone) if tok.decode(o, skip_special_tokens=True) == a.text)
        print(f"transformers {transformers.__version__} generate, one request at a time: {n_tok} tokens in "
              f"{dt:.1f} s = {tps:.1f} tok/s; greedy text equal to giants' on {same_tok}/{len(specs)} requests")
        print(f"ratio giants serve (x{args.concurrency} clients) / transformers one-at-a-time: "
              f"{s.tokens_per_s / tps:.2f}x output tok/s")
        ref_line = (f"| transformers {transformers.__version__} `generate`, one request at a time (same ids, "
                    f"same weights) | {tps:.1f} tok/s | ratio **{s.tokens_per_s / tps:.2f}x** |\n")

    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print("\n--- markdown for benchmarks/HISTORY.md (## serve) ---")
    print(f"Model `{args.model}`, CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads), {date}, Python {sys.version.split()[0]}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; load average at start "
          f"{load_before:.1f}.\n")
    print("| measure | value | note |\n|---|---|---|")
    print(f"| closed loop | {args.concurrency} streaming clients, {args.duration:.0f} s | {len(specs)} distinct "
          "greedy requests, completions + chat |")
    print(f"| requests | {s.requests} | failed or lost: **{s.failed}** |")
    print(f"| identical to the request run alone | {same}/{s.requests} | greedy |")
    print(f"| output throughput | {s.tokens_per_s:.1f} tok/s | {s.requests_per_s:.2f} req/s |")
    print(f"| latency p50 / p99 | {s.latency_p50:.2f} s / {s.latency_p99:.2f} s | whole request |")
    print(f"| time to first token p50 / p99 | {s.ttft_p50:.3f} s / {s.ttft_p99:.3f} s | client side |")
    print(f"| inter-token latency mean | {itl_mean * 1000:.0f} ms | server histogram |")
    print(f"| SIGTERM after the run | exit code {code} | |")
    print(f"| engine in process, same loop, no HTTP | {eng_tps:.1f} tok/s | server reaches "
          f"{s.tokens_per_s / eng_tps:.2f} of it |")
    print(ref_line, end="")
    return 0 if s.failed == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
