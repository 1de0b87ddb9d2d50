"""Speculative decoding against plain decoding, in one run, batch 1, greedy (the tokens must be identical).

CPU (default): SmolLM2-135M (the real GGUF) on repetitive prompts (a code edit the answer copies, a list), prompt
lookup (`{"method": "ngram"}`): tokens per verify step, acceptance rate, tok/s with and without, the ratio.

    python benchmarks/bench_spec.py [--tokens 128] [--repeats 3] [--k 4] [--threads 1]

GPU (`--device cuda`): the Llama-3.1-8B shape (random weights, bf16), 16-token prompt, 256 new tokens: plain, a
random-weight Llama-3.2-1B-shaped draft (same vocabulary; random drafts are almost never accepted, so this is
the cost of drafting), prompt lookup, and the draft-equals-target UPPER BOUND (the 8B drafting for itself: every
draft accepted, k+1 tokens per step, at the price of a second 8B forward per drafted token).

    python benchmarks/bench_spec.py --device cuda [--tokens 256] [--k 4]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from giants import LLM, SamplingParams

CODE = '''def load(path):
    with open(path) as f:
        rows = [line.strip().split(",") for line in f]
    header, body = rows[0], rows[1:]
    return [dict(zip(header, r)) for r in body]


def total(records, field):
    s = 0
    for r in records:
        s += float(r[field])
    return s
'''
PROMPTS = {
    "code edit (chat)": [{"role": "user", "content": "Rename the function `total` to `column_sum` in this code and "
                                                     "show the whole file:\n\n" + CODE}],
    "list": "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,",
}


def _spec_stats(llm: LLM, before: dict) -> tuple[float, float]:
    s = llm.stats()
    n = s["spec_num_drafts"] - before["spec_num_drafts"]
    d = s["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    a = s["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    return (1 + a / n if n else 1.0), (a / d if d else 0.0)


def _run(llm: LLM, prompt, sp: SamplingParams) -> tuple[list[int], float]:
    t = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    return out, time.perf_counter() - t


def cpu(args: argparse.Namespace) -> None:
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    kw = {"max_model_len": 1024, "cpu_threads": args.threads, "max_num_seqs": 1}
    plain = LLM(args.model, **kw)
    ngram = LLM(args.model, speculative_config=spec, **kw)
    sp = SamplingParams(temperature=0, max_tokens=args.tokens)
    print(f"{args.model} | CPU fp32, {args.threads} thread(s) | batch 1, greedy, up to {args.tokens} new tokens | "
          f"prompt lookup k={args.k}, n 4..1 | median of {args.repeats}, alternating")
    for name, p in PROMPTS.items():
        prompt = plain.apply_chat_template(p) if isinstance(p, list) else p
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        _run(plain, prompt, sp), _run(ngram, prompt, sp)  # warm-up
        t_plain, t_spec = [], []
        for _ in range(args.repeats):
            want, t = _run(plain, prompt, sp)
            t_plain.append(t)
            before = ngram.stats()
            got, t = _run(ngram, prompt, sp)
            t_spec.append(t)
            per_step, rate = _spec_stats(ngram, before)
        n = len(want)
        a, b = n / statistics.median(t_plain), len(got) / statistics.median(t_spec)
        print(f"  {name:18s} {n:4d} tokens | plain {a:6.1f} tok/s | ngram {b:6.1f} tok/s ({b / a:.2f}x) | "
              f"{per_step:.2f} tokens per verify step, acceptance {rate:.0%} | identical: {got == want}")


def cuda(args: argparse.Namespace) -> None:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    prompt = [int(t) for t in torch.randint(1000, 100000, (16,), generator=g)]
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    kw = {"device": dev, "dtype": "bfloat16", "max_model_len": 1024, "max_num_seqs": 8, "num_blocks": 512}
    cases = [("plain", None),
             ("draft llama-3.2-1b (random)", {"model": "llama-3.2-1b", "num_speculative_tokens": args.k}),
             ("prompt lookup", {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
                                "prompt_lookup_min": 1}),
             ("UPPER BOUND: draft = target", {"model": "llama-3.1-8b", "num_speculative_tokens": args.k})]
    print(f"llama-3.1-8b shape, random weights, bf16 | {torch.cuda.get_device_name()} | batch 1, 16-token prompt, "
          f"{args.tokens} new tokens, greedy | k={args.k} | verification: 1-token decode rows in the CUDA graphs")
    want, base = None, None
    for name, spec in cases:
        llm = LLM("llama-3.1-8b", speculative_config=spec, **kw)
        _run(llm, prompt, sp)  # warm-up: graph captures, kernel tuning
        before = llm.stats() if spec else None
        times = []
        for _ in range(args.repeats):
            out, t = _run(llm, prompt, sp)
            times.append(t)
        tps = len(out) / statistics.median(times)
        base = base or tps
        want = want or out
        extra = ""
        if spec:
            per_step, rate = _spec_stats(llm, before)
            extra = f" | {per_step:.2f} tokens per verify step, acceptance {rate:.0%}"
        print(f"  {name:30s} {tps:7.1f} tok/s ({tps / base:.2f}x){extra} | identical: {out == want}")
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="smollm2-135m", help="CPU mode's model (a GGUF, a known name)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens (default: CPU 128, GPU 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a shared box: 1 is the steady choice)")
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = 256 if args.device == "cuda" else 128
    cpu(args) if args.device == "cpu" else cuda(args)


if __name__ == "__main__":
    main()
