"""Batch-1 decode speed: giants' engine against transformers in the same run, same shapes, random weights.

GPU (bf16): Llama-3.1-8B shape (giants vs transformers eager and static cache + torch.compile),
gpt-oss-20b shape (giants vs transformers eager), gpt-oss-120b shape with MXFP4 experts (giants only:
in bf16 it does not fit one GPU); on request Gemma-2-27B in bf16 (`--models gemma-2-27b`) and the
Mixtral-8x22B shape with MXFP4 experts (`--models mixtral-8x22b`: one H200; `mixtral-8x22b-fp8`: the linears FP8
too, one H100). Roofline = measured
device-to-device copy bandwidth / bytes read per token (non-embedding weights the token touches + its KV
reads). A correctness check of the fused GPU path against the generic path on every tiny twin runs first.

    python benchmarks/bench_decode.py --models check,llama,gpt-oss-20b,gpt-oss-120b --out results.json
    python benchmarks/bench_decode.py --models tiny --device cpu      # smoke test of the script
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import time

import torch

import giants
import record
from giants.inference import LLM, SamplingParams
from giants.inference.mxfp4 import MXFP4MoE
from giants.model.mlp import MoE


def env(device: torch.device) -> dict:
    import transformers

    e = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
         "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    try:
        import triton

        e["triton"] = triton.__version__
    except ImportError:
        pass
    return e


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 20)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    times = []
    for i in range(23):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            torch.cuda.synchronize()
            t = s.elapsed_time(e) / 1e3
        else:
            t0 = time.perf_counter()
            b.copy_(a)
            t = time.perf_counter() - t0
        if i >= 3:
            times.append(t)
    del a, b
    return 2 * n / statistics.median(times)


def bytes_per_token(model, ctx: float) -> dict:
    """Weights one decode token reads (all but the input embedding; only its experts' share of MoE) + KV."""
    cfg = model.config
    total = active = 0
    for mod_name, mod in model.named_modules():
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            full = f"{mod_name}.{name}" if mod_name else name
            if full == "embed.weight" or name == "inv_freq":
                continue
            nb = t.numel() * t.element_size()
            total += nb
            expert = isinstance(mod, (MoE, MXFP4MoE)) and not full.endswith(("router.weight", "router.bias"))
            active += nb * cfg.experts_per_token / cfg.n_experts if expert else nb
    kv_elt = next(model.parameters()).element_size() if next(model.parameters()).is_floating_point() else 2
    kv = sum(2 * cfg.n_kv_heads * cfg.head_dim * kv_elt * (min(ctx, w) if w else ctx) for w in cfg.windows)
    return {"weights_total": total, "weights_active": active, "kv": kv, "per_token": active + kv}


def giants_decode(llm: LLM, prompt: list[int], new: int, runs: int = 3) -> dict:
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # captures the graph
    rates, ttfts, runs_toks = [], [], []
    llm.engine.timing = dict.fromkeys(llm.engine.timing, 0.0)
    steps0 = llm.engine.num_steps
    runner_host = getattr(llm.engine.runner, "host_time", None)
    if runner_host is not None:
        runner_host.update(dict.fromkeys(runner_host, 0.0))
    for _ in range(runs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out = llm.generate([prompt], sp)[0]
        m = out.metrics
        rates.append((new - 1) / (m.finished_time - m.first_token_time))
        ttfts.append(m.first_token_time - m.arrival_time)
        runs_toks.append(out.outputs[0].token_ids)
    toks = runs_toks[-1]
    # False when the model is not run-to-run deterministic (bf16 MoE prefill sums experts with atomics)
    res = {"tok_s": statistics.median(rates), "ttft_s": statistics.median(ttfts), "tokens": toks,
           "runs_identical": all(t == toks for t in runs_toks)}
    n_steps = llm.engine.num_steps - steps0
    res["host_ms_per_step"] = {k: round(1e3 * v / n_steps, 4) for k, v in llm.engine.timing.items()}
    if runner_host is not None:  # inside "launch": staging the inputs, the graph launch call
        res["host_ms_per_step"].update({f"runner_{k}": round(1e3 * v / n_steps, 4) for k, v in runner_host.items()})
    runner = llm.engine.runner
    graphs = getattr(runner, "graphs", {})
    if graphs:
        # GPU time of one decode step alone (graph replays back to back): the rest is host work.
        from giants.inference.cuda_runner import replay_ms

        res["graph_replay_ms"] = replay_ms(graphs[min(graphs)][0], 50)
        res["engine_step_ms"] = 1e3 / res["tok_s"]
        res["gemv_choice"] = {str(k): v for k, v in runner.gemv_choice.items()}
        res["gemv_times_us"] = {str(k): {n: round(t, 1) for n, t in v.items()} for k, v in runner.gemv_times.items()}
    return res


def rerun(name: str, label: str, llm: LLM, prompt: list[int], new: int, roof: float, g: dict, switch, value,
          default) -> dict:
    """Decode again with switch(value), the CUDA graphs captured afresh, then switch(default) back."""
    graphs = llm.engine.runner.graphs
    switch(value)
    graphs.clear()
    try:
        m = giants_decode(llm, prompt, new)
    except Exception as e:  # noqa: BLE001 - a variant that fails (e.g. does not compile) must not lose the run
        print(f"{name}: {label}: failed: {e!r}"[:2000], flush=True)
        return {"error": repr(e)[:2000]}
    finally:
        switch(default)
        graphs.clear()
    print(f"{name}: {label}: {m['tok_s']:.1f} tok/s = {m['tok_s'] / roof:.1%}; replay "
          f"{m.get('graph_replay_ms', 0):.3f} ms", flush=True)
    return {"tok_s": m["tok_s"], "fraction_of_roofline": m["tok_s"] / roof, "graph_replay_ms": m.get("graph_replay_ms"),
            "tokens_agree_with_default": agree(m["tokens"], g["tokens"])}


def hf_model(cfg, dtype: torch.dtype, device: torch.device):
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    return model.eval()


def hf_decode(model, prompt: list[int], new: int, static: bool, runs: int = 2) -> dict:
    ids = torch.tensor([prompt], device=model.device)
    kw = dict(do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"

    def timed(n: int) -> tuple[float, list[int]]:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out[0, len(prompt):].tolist()

    with torch.inference_mode():
        timed(new)  # warm-up (compiles the static-cache forward)
        timed(1)
        t1 = statistics.median(timed(1)[0] for _ in range(runs))
        results = [timed(new) for _ in range(runs)]
    tn = statistics.median(r[0] for r in results)
    return {"tok_s": (new - 1) / (tn - t1), "ttft_s": t1, "tokens": results[0][1]}


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_check(device: torch.device) -> dict:
    """The fused GPU decode path (CUDA graphs, Triton kernels) against the generic path: greedy tokens."""
    from giants.presets import TINY_PRESETS

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in (3, 17, 40, 70, 5, 33)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    res = {}
    for name in TINY_PRESETS:
        for quant in ([None, "mxfp4"] if giants.get_config(name).is_moe else [None]):
            dtype = "bfloat16" if giants.get_config(name).is_moe else "float32"
            key = name + (f"-{quant}" if quant else "") + f"-{dtype}"
            try:
                outs = []
                for graphs in (False, True):
                    llm = LLM(name, device=device, dtype=dtype, seed=0, num_blocks=512, max_model_len=256,
                              use_cuda_graphs=graphs, quantization=quant, max_num_seqs=16)
                    outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, sp)])
                # one at a time too: batch-1 steps take the fused norm/GLU GEMV kernels
                outs.append([llm.generate([p], sp)[0].outputs[0].token_ids for p in prompts])
                same = sum(a == b for a, b in zip(outs[0], outs[1]))
                same1 = sum(a == b for a, b in zip(outs[0], outs[2]))
                res[key] = f"batched {same}/{len(prompts)} identical, first-divergence tokens " + \
                    str([agree(a, b) for a, b in zip(outs[0], outs[1])]) + \
                    f"; batch-1 {same1}/{len(prompts)} identical, first-divergence tokens " + \
                    str([agree(a, b) for a, b in zip(outs[0], outs[2])])
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                res[key] = f"error: {e!r}"
            print("check", key, res[key], flush=True)
    return res


RERUNS = True  # --no-reruns: only the default decode of each model


def free() -> None:
    torch._dynamo.reset()  # compiled transformers forwards hold their model and CUDA-graph pools
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def section(name: str, preset: str, device: torch.device, bw: float, new: int, hf_modes: tuple[str, ...],
            quantization: str | None = None, hf_new: int | None = None, share_weights: bool = True,
            pdl_modes: tuple[bool, ...] = ()) -> dict:
    """share_weights: transformers gets giants' weights (same tokens expected up to bf16 rounding);
    otherwise its own random weights (when both copies would not fit on the GPU)."""
    cfg = giants.get_config(preset)
    prompt = torch.randint(3, min(cfg.vocab_size, 32000), (16,), generator=torch.Generator().manual_seed(1)).tolist()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    util = {"gpu_memory_utilization": 0.45} if device.type == "cuda" else {}  # CUDA only: refused on the CPU
    llm = LLM(preset, device=device, dtype=dtype, seed=0, max_model_len=1024, max_num_seqs=4,
              quantization=quantization, **util)
    build_s = time.perf_counter() - t0
    b = bytes_per_token(llm.model, 16 + new / 2)
    roof = bw / b["per_token"]
    r = {"preset": preset, "quantization": quantization, "build_s": round(build_s, 1), "new_tokens": new,
         "bytes_per_token": b, "roofline_tok_s": roof}
    g = giants_decode(llm, prompt, new)
    r["giants"] = {k: v for k, v in g.items() if k != "tokens"}
    r["giants"]["fraction_of_roofline"] = g["tok_s"] / roof
    if device.type == "cuda":  # weights, KV cache, CUDA graphs and workspace of the decode just measured
        r["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"{name}: giants {g['tok_s']:.1f} tok/s = {g['tok_s'] / roof:.1%} of roofline {roof:.1f}; graph replay "
          f"{g.get('graph_replay_ms', 0):.2f} ms/step; gemv {g.get('gemv_choice')}", flush=True)
    runner = llm.engine.runner
    if getattr(runner, "graphs", None) is not None and RERUNS:
        from giants.inference import kernels as tk

        # the same model and kernel picks, the decode graph captured again with one switch flipped
        for on in pdl_modes:
            r[f"pdl_{int(on)}"] = rerun(name, f"PDL {'on' if on else 'off'}", llm, prompt, new, roof, g,
                                        tk.set_pdl, on, tk.PDL_ON)
        if runner.chain is not None and runner.chain_possible:
            r["chain_flipped"] = rerun(name, f"chain={not runner.chain}", llm, prompt, new, roof, g,
                                       lambda v: setattr(runner, "chain", v), not runner.chain, runner.chain)
        r["short_splits_1"] = rerun(name, "short_splits=1", llm, prompt, new, roof, g,
                                    lambda v: setattr(runner, "short_splits", v), 1, runner.short_splits)
        if quantization == "mxfp4":  # the MXFP4 decode before the f16-lane one (hfma) became the default
            from giants.inference.kernels import mxfp4 as kmx

            def decode(v: tuple[str, str]) -> None:
                kmx.MXFP4_GEMV_DEFAULT["decode"], kmx.MXFP4_GEMV_GLU_DEFAULT["decode"] = v

            r["decode_ptx_e4m3"] = rerun(name, "MXFP4 decode=ptx_e4m3", llm, prompt, new, roof, g, decode,
                                         ("ptx_e4m3", "ptx_e4m3"), (kmx.MXFP4_GEMV_DEFAULT["decode"],
                                                                    kmx.MXFP4_GEMV_GLU_DEFAULT["decode"]))
        switches = ("fuse_attn_reduce",) + (("fuse_qkv_rope", "fuse_route") if llm.model.config.is_moe else ())
        for switch in switches + (("fuse_packed",) if quantization in ("mxfp4", "fp8") else ()):
            r[f"{switch}_off"] = rerun(name, f"{switch}=False", llm, prompt, new, roof, g,
                                       lambda v, s=switch: setattr(runner, s, v), False, getattr(runner, switch))
    runner = None  # it holds the model: with it alive, `del llm` below freed nothing (gemma-2-27b's
    # transformers copy then ran out of memory on an 80 GB card)
    state = None
    if hf_modes and share_weights:
        from giants.checkpoint.hf_map import giants_to_hf

        state = dict(giants_to_hf(llm.model.state_dict(), cfg))
    else:
        del llm
        free()
    if hf_modes:
        hf = hf_model(cfg, dtype, device)
        if state is not None:
            missing, unexpected = hf.load_state_dict(state, strict=False)
            r["transformers_weights"] = f"giants' (missing {missing}, unexpected {unexpected})"
            del state, llm
            free()
        else:
            r["transformers_weights"] = "own random init"
        for mode in hf_modes:
            n = hf_new or new
            h = hf_decode(hf, prompt, n, static=mode == "static+compile")
            r[f"transformers_{mode}"] = {"tok_s": h["tok_s"], "ttft_s": h["ttft_s"], "new_tokens": n,
                                         "tokens_agree_with_giants": agree(h["tokens"], g["tokens"])}
            r[f"ratio_vs_{mode}"] = g["tok_s"] / h["tok_s"]
            print(f"{name}: transformers {mode} {h['tok_s']:.1f} tok/s; giants/transformers = "
                  f"{g['tok_s'] / h['tok_s']:.2f}x", flush=True)
        del hf
        free()
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="check,gpt-oss-120b,gpt-oss-20b,llama")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--out", default=None)
    ap.add_argument("--llama-hf-modes", default="eager,static+compile")
    ap.add_argument("--no-hf-20b", action="store_true", help="skip transformers on the gpt-oss-20b shape")
    ap.add_argument("--pdl-modes", default="0",
                    help="also decode with programmatic dependent launch set so: comma list of 0 (off) / 1 (on)")
    ap.add_argument("--no-reruns", action="store_true",
                    help="skip the same-run decodes with one switch flipped (PDL, chain, splits, fusions, decode)")
    record.add_argument(ap)
    args = ap.parse_args()
    global RERUNS
    RERUNS = not args.no_reruns
    device = torch.device(args.device)
    torch.manual_seed(0)
    results = {"env": env(device)}
    bw = copy_bandwidth(device)
    results["copy_bandwidth_GBs"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    todo = args.models.split(",")
    oss20_hf = () if args.no_hf_20b else ("eager",)
    pdl = tuple(m == "1" for m in args.pdl_modes.split(",") if m)
    llama_hf = tuple(m for m in args.llama_hf_modes.split(",") if m)  # "" runs no transformers mode
    jobs = {
        "check": ("check", lambda: run_check(device)),
        "tiny": ("tiny-llama", lambda: section("tiny-llama", "tiny-llama", device, bw, args.new, ("eager",))),
        "llama": ("llama-3.1-8b", lambda: section("llama-3.1-8b", "llama-3.1-8b", device, bw, args.new,
                                                  llama_hf, pdl_modes=pdl)),
        "gpt-oss-20b": ("gpt-oss-20b", lambda: section("gpt-oss-20b", "gpt-oss-20b", device, bw, args.new,
                                                       oss20_hf, hf_new=32, share_weights=False, pdl_modes=pdl)),
        "gpt-oss-120b": ("gpt-oss-120b-mxfp4", lambda: section("gpt-oss-120b-mxfp4", "gpt-oss-120b", device, bw,
                                                               args.new, (), quantization="mxfp4", pdl_modes=pdl)),
        # the article's "runs on one 80 GB card" model, bf16; transformers with its own weights (two copies of
        # 54 GB do not fit an H100), fewer tokens (its eager decode is slow)
        "gemma-2-27b": ("gemma-2-27b", lambda: section("gemma-2-27b", "gemma-2-27b", device, bw, args.new,
                                                       ("eager",), hf_new=32, share_weights=False)),
        # 141B parameters: MXFP4 experts (~82 GB) fit one H200, not an 80 GB H100 (`giants fit`)
        "mixtral-8x22b": ("mixtral-8x22b-mxfp4", lambda: section("mixtral-8x22b-mxfp4", "mixtral-8x22b", device, bw,
                                                                 args.new, (), quantization="mxfp4")),
        # the same with the attention in FP8 too (~78 GB): one 80 GB H100
        "mixtral-8x22b-fp8": ("mixtral-8x22b-fp8-mxfp4", lambda: section(
            "mixtral-8x22b-fp8-mxfp4", "mixtral-8x22b", device, bw, args.new, (), quantization="fp8+head+mxfp4")),
    }
    for t in todo:
        key, fn = jobs[t]
        try:
            results[key] = fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not hide the others' numbers
            import traceback

            traceback.print_exc()
            results[key] = {"error": repr(e)}
        free()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    record.record(args.record, [record.entry(r["preset"], device, dtype, quantization=r["quantization"],
                                             tok_s_batch1=r["giants"]["tok_s"], memory_gib=r.get("max_allocated_gib"),
                                             memory_what="max allocated by torch (weights, KV cache, CUDA graphs)",
                                             note=f"{r['giants']['fraction_of_roofline']:.1%} of its "
                                                  f"{r['roofline_tok_s']:.1f} tok/s roofline")
                                for r in results.values() if isinstance(r, dict) and "giants" in r])
    text = json.dumps(results, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
