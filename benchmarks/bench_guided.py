"""Structured output's per-token cost: SmolLM2-135M (the real GGUF) decoding at batch 1 and 32, with and without
a JSON schema, in one run; prints tok/s, the ratio, and the grammar mask's own time per masked row.

The schema holds one long string field, so constrained sequences run to max_tokens like the free ones
(ignore_eos) and both modes generate the same number of tokens.

    python benchmarks/bench_guided.py [--tokens 48] [--batches 1,32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import giants.inference.sampling as sampling
from giants import LLM, SamplingParams
from giants.inference import guided

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "maxLength": 2000}}, "required": ["story"],
          "additionalProperties": False}
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper, as JSON."}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    mask = {"s": 0.0, "rows": 0}

    def timed(logits, guides):
        t = time.perf_counter()
        out = guided.apply_guides(logits, guides)
        mask["s"] += time.perf_counter() - t
        mask["rows"] += sum(g is not None for g in guides)
        return out

    sampling.apply_guides = timed  # the sampler's call, timed
    llm = LLM("smollm2-135m", max_model_len=512)
    import llguidance

    print(f"llguidance {llguidance.__version__} | SmolLM2-135M GGUF fp32 | {args.tokens} new tokens per sequence, "
          "temperature 1")
    for b in [int(x) for x in args.batches.split(",")]:
        row = {}
        for mode in ("free", "schema"):
            kw = {"guided_json": SCHEMA} if mode == "schema" else {"ignore_eos": True}
            sp = SamplingParams(temperature=1.0, max_tokens=args.tokens, seed=0, **kw)
            llm.chat([PROMPT] * b, sp)  # warm-up (and the grammar's first compile)
            rates, mask["s"], mask["rows"] = [], 0.0, 0
            for _ in range(args.repeats):
                t = time.perf_counter()
                outs = llm.chat([PROMPT] * b, sp)
                dt = time.perf_counter() - t
                n = sum(len(o.outputs[0].token_ids) for o in outs)
                rates.append(n / dt)
            row[mode] = statistics.median(rates)
            if mode == "schema":
                us = 1e6 * mask["s"] / max(mask["rows"], 1)
                print(f"batch {b:3d}: free {row['free']:.1f} tok/s, schema {row['schema']:.1f} tok/s, ratio "
                      f"{row['schema'] / row['free']:.3f}; mask {us:.0f} us per masked row per step")


if __name__ == "__main__":
    main()
