"""CPU batch-1 greedy decode of SmolLM2-135M: giants' engine against transformers in the same run.

With the real weights (`--source smollm2-135m`, the Q4_1 GGUF from `giants download smollm2-135m`) both
load the same file (transformers through `gguf_file=`, dequantized to fp32); with `--source preset`
both get the same random weights. Reports tok/s, the ratio, and whether the greedy tokens are identical;
then giants' weight modes (bf16, int8 weight-only) beside fp32, each eager and (`*_compile`) through the
torch.compile'd batch-1 decode (`LLM(cpu_compile=True)`, compiled before timing starts), and llama-cpp-python
(when installed, built from PyPI: `pip install llama-cpp-python`) running the same Q4_1 file with the same
threads, in the same rounds.

    python benchmarks/bench_cpu.py --source smollm2-135m --new 128 --out cpu.json

`--contention N` runs N busy processes (`while True: pass`, each ending by itself after `--contention-seconds`)
beside the timed rounds, as a machine shared with other jobs: giants at its default threads (all cores, fewer
while they are busy: giants.inference.cpu_threads) against transformers at the same torch default.

    python benchmarks/bench_cpu.py --modes fp32 --contention 2 --new 64 --rounds 3 --no-llama-cpp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import giants
from bench_decode import env  # noqa: I001 - sibling script
from giants.inference import LLM, SamplingParams


def hf_from_giants(model):
    import transformers

    from giants.checkpoint.hf_map import giants_to_hf

    cfg = model.config
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf()),
                                                       dtype=torch.float32)
    hf.load_state_dict(dict(giants_to_hf(model.state_dict(), cfg)), strict=False)
    return hf.eval()


def hf_from_gguf(path: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32).eval()


def hf_greedy(hf, prompt: list[int], new: int, runs: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, temperature=None, top_p=None, top_k=None)

    def timed(n: int):
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0, out[0, len(prompt):].tolist()

    with torch.inference_mode():
        timed(4)
        t1 = statistics.median(timed(1)[0] for _ in range(runs))
        res = [timed(new) for _ in range(runs)]
    return (new - 1) / (statistics.median(r[0] for r in res) - t1), res[0][1]


def giants_greedy(llm: LLM, prompt: list[int], new: int, runs: int) -> tuple[float, list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    rates, toks = [], None
    for _ in range(runs):
        out = llm.generate([prompt], sp)[0]
        m = out.metrics
        rates.append((new - 1) / (m.finished_time - m.first_token_time))
        toks = out.outputs[0].token_ids
    return statistics.median(rates), toks


def llamacpp_runner(path: str, threads: int):
    """llama-cpp-python on the GGUF as shipped (Q4_1 kernels, no dequantization): greedy, ignoring EOS."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)

    def greedy(prompt: list[int], new: int) -> tuple[float, list[int]]:
        toks, first = [], None
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            toks.append(int(tok))
            if len(toks) >= new:
                break
        return (new - 1) / (time.perf_counter() - first), toks

    return greedy


@contextlib.contextmanager
def busy_processes(n: int, seconds: float):
    """n processes spinning on a core each, for at most `seconds` (they end by themselves if this one dies); ended
    by their own ids on the way out."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="smollm2-135m", help="'smollm2-135m' (real GGUF) or 'preset' (random)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--modes", default="fp32,fp32_compile,bf16,bf16_compile,int8",
                    help="giants weight modes; *_compile decode through torch.compile'd layers (LLM(cpu_compile=True))")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python even if installed")
    ap.add_argument("--contention", type=int, default=0, metavar="N",
                    help="N busy processes beside the timed rounds (a machine other jobs share)")
    ap.add_argument("--contention-seconds", type=float, default=1800.0,
                    help="the busy processes end by themselves after this long")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"env": env(torch.device("cpu")), "threads": args.threads, "new_tokens": args.new, "source": args.source,
           "contention": args.contention, "cpus": os.cpu_count()}
    if args.source == "preset":
        model = giants.build(giants.get_config("smollm2-135m"), seed=0).eval()
        hf = hf_from_giants(model)
        tok = None
        prompt = torch.randint(3, 49152, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        from giants.checkpoint import download

        path = str(download(args.source))
        model = giants.load(path, dtype=torch.float32)
        hf = hf_from_gguf(path)
        tok = giants.load_tokenizer(path)
        text = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a lighthouse."}],
                                       add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)
    res["prompt_tokens"] = len(prompt)
    # The box is shared: alternate transformers and giants runs and keep every run, so a busy moment
    # hits both; the ratio is reported for the medians and for the best runs.
    llms = {}
    for mode in args.modes.split(","):
        kw = {"fp32": dict(dtype="float32"), "bf16": dict(dtype="bfloat16"),
              "int8": dict(dtype="float32", weights="int8"),
              "fp32_compile": dict(dtype="float32", cpu_compile=True),
              "bf16_compile": dict(dtype="bfloat16", cpu_compile=True)}[mode]
        m = model if mode == "fp32" else giants.build(model.config, device="meta").materialize("cpu")
        if m is not model:
            m.load_state_dict(model.state_dict())
        llms[mode] = LLM(m, tokenizer=tok, device="cpu", max_model_len=1024, max_num_seqs=4, **kw)
    rates: dict[str, list[float]] = {"transformers_fp32": [], **{m: [] for m in llms}}
    toks: dict[str, list[int]] = {}
    lcpp = None
    if args.source != "preset" and not args.no_llama_cpp:
        try:
            import llama_cpp

            lcpp = llamacpp_runner(path, args.threads)
            lcpp(prompt, 4)
            rates["llama_cpp_q4_1"] = []
            res["llama_cpp_python"] = llama_cpp.__version__
        except ImportError:
            res["llama_cpp_python"] = "not installed"
    res["load_average_before"] = os.getloadavg()
    with busy_processes(args.contention, args.contention_seconds) as busy:
        if busy:
            print(f"{len(busy)} busy processes: {busy}", flush=True)
            time.sleep(2)  # let them take their cores
        for _ in range(args.rounds):
            r, toks["transformers_fp32"] = hf_greedy(hf, prompt, args.new, 1)
            rates["transformers_fp32"].append(r)
            for mode, llm in llms.items():
                r, toks[mode] = giants_greedy(llm, prompt, args.new, 1)
                rates[mode].append(r)
            if lcpp is not None:
                r, toks["llama_cpp_q4_1"] = lcpp(prompt, args.new)
                rates["llama_cpp_q4_1"].append(r)
            print({k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
        res["load_average_after"] = os.getloadavg()
    # (seconds since the LLM was built, threads) at each change of giants' thread count (cpu_threads)
    res["giants_threads"] = {m: [(round(t - h[0][0], 1), n) for t, n in h] if h else None
                             for m, h in ((m, getattr(llm.thread_governor, "history", None))
                                          for m, llm in llms.items())}
    hf_toks = toks["transformers_fp32"]
    hf_med, hf_best = statistics.median(rates["transformers_fp32"]), max(rates["transformers_fp32"])
    res["transformers_fp32"] = {"tok_s_median": hf_med, "tok_s_best": hf_best, "runs": rates["transformers_fp32"]}
    for mode in [*llms, *(["llama_cpp_q4_1"] if lcpp is not None else [])]:
        med, best = statistics.median(rates[mode]), max(rates[mode])
        first_diff = next((i for i, (a, b) in enumerate(zip(toks[mode], hf_toks)) if a != b), None)
        key = mode if mode.startswith("llama_cpp") else f"giants_{mode}"
        res[key] = {"tok_s_median": med, "tok_s_best": best, "runs": rates[mode],
                    "ratio_median": med / hf_med, "ratio_best": best / hf_best,
                    "tokens_identical_to_transformers": toks[mode] == hf_toks, "first_difference": first_diff}
        print(f"{mode}: median {med:.1f} tok/s ({med / hf_med:.2f}x), best {best:.1f} ({best / hf_best:.2f}x); "
              f"identical tokens: {toks[mode] == hf_toks}", flush=True)
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
