"""Tensor-parallel inference on GPUs: greedy tokens against one process, decode throughput, and how fast a
killed worker is reported.

    GIANTS_TP_CUDA_FAST=1 python benchmarks/bench_tp.py check   # every tiny twin, tp=2, fused kernels + graphs
    python benchmarks/bench_tp.py speed --model llama-3.1-8b --tp 1 2 --batch 1 32
    python benchmarks/bench_tp.py kill                     # SIGKILL rank 1 mid-decode: seconds to the error

Each result is one JSON line on stdout. Without GIANTS_TP_CUDA_FAST=1 the ranks run the generic runner; with
GIANTS_TP_SHARE_GPU=1 every rank shares GPU 0 (gloo, kernels eager): a check of the local-shape kernels on one
GPU. Not yet run on a machine of several GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time

import torch

from giants.inference import LLM, SamplingParams

TINY = ("tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss", "tiny-gpt-oss-described")
PREFIX = [(i * 37 + 11) % 4000 + 100 for i in range(24)]
PROMPTS = [PREFIX + [5000 + i for i in range(n)] for n in (3, 17, 9, 11)] + [[42] * 6]
ENGINE = dict(block_size=4, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def divergence(ref_out: list, out: list) -> dict:
    """Where greedy tokens differ: the reference's top-1 minus top-2 logprob at the first differing step (a near
    tie that rounding can flip is a margin of the order of the dtype's epsilon times the logit scale) and the
    largest |logprob| difference of the shared tokens before it (how far the two computations drift apart)."""
    margins, drift = [], 0.0
    for r, o in zip(ref_out, out):
        n = next((i for i, (a, b) in enumerate(zip(r.token_ids, o.token_ids)) if a != b), len(r.token_ids))
        for i in range(n):
            t = r.token_ids[i]
            drift = max(drift, abs(r.logprobs[i][t] - o.logprobs[i][t]))
        if n < len(r.token_ids):
            top = sorted(r.logprobs[n].values(), reverse=True)
            margins.append(round(top[0] - top[1], 5) if len(top) > 1 else None)
    return {"ref_top2_margin_at_divergence": margins, "max_logprob_drift_before": round(drift, 5)}


def check(args) -> None:
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2)
    for name in TINY:
        dtype = "bfloat16" if name in ("tiny-mixtral", "tiny-gpt-oss") else "float32"  # CUDA MoE fast path: bf16
        ref = LLM(name, dtype=dtype, device="cuda", **ENGINE)
        ref_out = [o.outputs[0] for o in ref.generate(PROMPTS, sp)]
        want = [o.token_ids for o in ref_out]
        del ref
        t0 = time.perf_counter()
        llm = LLM(name, dtype=dtype, device="cuda", tensor_parallel_size=args.tp, **ENGINE)
        start = time.perf_counter() - t0
        out = [o.outputs[0] for o in llm.generate(PROMPTS, sp)]
        got = [o.token_ids for o in out]
        local = llm.engine.runner.local
        emit(test="check", model=name, dtype=dtype, tp=args.tp, same=got == want,
             first_differing_prompt=next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None),
             runner=type(local).__name__, graphs=sorted(map(list, getattr(local, "graphs", {}))),
             preemptions=llm.engine.num_preemptions, prefix_hits=llm.engine.kv.prefix_hits, start_s=round(start, 1),
             **divergence(ref_out, out))
        llm.executor.close()


def speed(args) -> None:
    for tp in args.tp:
        llm = LLM(args.model, dtype="bfloat16", device="cuda", tensor_parallel_size=tp, max_model_len=1024,
                  max_num_seqs=max(args.batch))
        for batch in args.batch:
            prompts = [[(i * 7 + j) % 1000 + 10 for j in range(32)] for i in range(batch)]
            sp = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
            llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # capture
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp)
            dt = time.perf_counter() - t0
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            emit(test="speed", model=args.model, tp=tp, batch=batch, tokens=n, seconds=round(dt, 3),
                 tok_s=round(n / dt, 1), ms_per_step=round(1000 * dt / args.tokens, 2),
                 gpu=torch.cuda.get_device_name(0))
        if llm.executor is not None:
            llm.executor.close()
        del llm
        torch.cuda.empty_cache()


def kill(args) -> None:
    llm = LLM("tiny-llama", dtype="float32", device="cuda", tensor_parallel_size=2, max_model_len=2048)
    pid = llm.executor.pids[0]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    t_kill = []

    def killer() -> None:
        time.sleep(1.0)
        t_kill.append(time.perf_counter())
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    err = None
    try:
        llm.generate([[1, 2, 3]] * 8, SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True))
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    t_err = time.perf_counter()
    alive = []
    for p in llm.executor.pids:
        try:
            os.kill(p, 0)
            alive.append(p)
        except ProcessLookupError:
            pass
    emit(test="kill", error=err and err[:300], seconds_to_error=round(t_err - t_kill[0], 2) if t_kill else None,
         workers_alive=alive)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["check", "speed", "kill"])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, nargs="+", default=[2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    if args.what == "check":
        args.tp = args.tp[0]
    {"check": check, "speed": speed, "kill": kill}[args.what](args)


if __name__ == "__main__":
    main()
