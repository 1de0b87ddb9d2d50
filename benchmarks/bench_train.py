"""Training step speed: giants' Trainer against transformers in the same run, same shapes, same settings.

Both sides: fp32 master weights, bf16 autocast, fused AdamW (weight decay 0.1), gradient clipping at 1.0,
random tokens. transformers reads its loss back every step (--block 1); giants' Trainer reads step k's loss and
gradient norm back after queueing step k+1 (no host sync inside a step). giants runs its real Trainer (data
reader, losses, metrics) on a prepared dataset of random tokens; transformers runs the textbook loop around
`model(input_ids, labels=...)`.

    dense: Llama-3.2-1B shape (preset llama-3.2-1b), seq 2048, micro-batch 4 -> tokens/s, MFU vs 989 TFLOP/s
    moe:   Mixtral-style MoE, 8 experts top-2, d_model 2048 (4 layers, expert width 5632), seq 2048, batch 4,
           router load-balancing loss on both sides (coefficient 0.02) -> step time vs MixtralForCausalLM

MFU = tokens/s * FLOPs per token / 989e12, FLOPs per token two ways: giants.analysis (causal attention:
each query meets only the keys it may see) and the PaLM convention 6N + 12*L*H*Dh*T (full T x T
attention), which is the one the issue's transformers figure (45,400 tok/s = 37.7%) matches.

    python benchmarks/bench_train.py --cases dense,moe --out train.json
    python benchmarks/bench_train.py --cases dense --skip-eager   # only the compiled giants run + transformers
    python benchmarks/bench_train.py --cases dense --skip-eager --accum 1,4   # also with gradient accumulation
    python benchmarks/bench_train.py --smoke          # CPU check of the script on tiny shapes

--accum N: N micro-batches of 4 x 2048 tokens per optimizer step on both sides (giants' TrainConfig.grad_accum;
transformers sums (loss / N).backward() over N micro-batches, then clips and steps). Tokens/s count every
micro-batch; "step" is one optimizer step.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

import giants
from giants.analysis.flops import training_flops_per_token
from giants.analysis.params import count_params
from giants.config import ModelConfig
from giants.train.data import prepare_documents
from giants.train.trainer import TrainConfig, Trainer

H100_BF16 = 989e12


class RandomTokens:
    """A stand-in tokenizer whose 'documents' are random ids (speed does not depend on the text)."""

    def __init__(self, vocab: int) -> None:
        self.vocab_size, self.eos_token_id = vocab, vocab - 1
        self.rng = np.random.default_rng(0)

    def encode_batch(self, texts, add_special_tokens=False):
        return [self.rng.integers(0, self.vocab_size - 1, int(t)).tolist() for t in texts]


def env(device: torch.device) -> dict[str, Any]:
    import transformers

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def palm_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    pc = count_params(cfg)
    n = pc.active  # no input embedding; the (tied) head counts once
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq


def make_data(root: Path, vocab: int, tokens: int) -> Path:
    docs = [(f"doc{i}", str(4096)) for i in range(tokens // 4096 + 2)]
    prepare_documents(docs, RandomTokens(vocab), root / "ds", tokenizer_name="random", val_fraction=0.02)
    return root / "ds"


def clear(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_giants(cfg: ModelConfig, data: Path, *, seq: int, batch: int, warmup: int, steps: int, device: str,
                 compile: bool, aux: float | None, master_weights: bool | None = None, block: int = 1,
                 compile_mode: str | None = None, accum: int = 1, fsdp: bool = False) -> dict[str, Any]:
    warmup = -(-warmup // block) * block
    steps = -(-steps // block) * block
    with tempfile.TemporaryDirectory() as run:
        tc = TrainConfig(out=run, preset=None, model_config=None, data=str(data), tokenizer="bytes", seq_len=seq,
                         ckpt_minutes=0,
                         batch_size=batch, steps=warmup + steps, lr=1e-4, warmup_steps=0, schedule="constant",
                         device=device, compile=compile, eval_every=0, checkpoint_at_end=False, save_final=False,
                         progress=False, log_every=block, aux_loss_coef=aux, z_loss_coef=0.0,
                         master_weights=master_weights, compile_mode=compile_mode, grad_accum=accum,
                         fsdp_always=fsdp)
        cfg_file = Path(run) / "model.json"
        cfg_file.write_text(json.dumps(cfg.to_dict()))
        tc.model_config = str(cfg_file)
        t0 = time.perf_counter()
        tr = Trainer(tc)
        tr.run()
        wall = time.perf_counter() - t0
        # each logged entry's tokens/s covers exactly its `block` steps (the trainer syncs before reading the clock)
        rates = [h["tokens_per_s"] for h in tr.history[warmup // block:]]
        # The last interval reads fast: with the pipelined loop a step's end is stamped once the host has queued
        # the next step, except the last step's, which nothing follows. Both statistics leave it out.
        timed = rates[:-1] if len(rates) > 2 else rates
        out = {"tokens_per_s": statistics.median(timed), "step_s": accum * batch * seq / statistics.median(timed),
               "accum": accum,
               "tokens_per_s_all": len(timed) / sum(1 / r for r in timed),  # tokens over time, slow steps included
               "rates": rates, "block": block,
               "first_steps_s": [accum * batch * seq / h["tokens_per_s"] for h in tr.history[:warmup // block]],
               "loss_first_last": [tr.history[0]["train_loss"], tr.history[-1]["train_loss"]], "wall_s": wall,
               "optimizer": type(tr.optimizer).__name__, "fsdp": fsdp}
        if tr.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(tr.device) / 2**30
        del tr
    return out


def bench_transformers(cfg: ModelConfig, *, seq: int, batch: int, warmup: int, steps: int, device: torch.device,
                       aux: float | None, experts: str | None = None, block: int = 1,
                       accum: int = 1) -> dict[str, Any]:
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    if cfg.is_moe:
        hf_cfg.output_router_logits = True
        hf_cfg.router_aux_loss_coef = aux or 0.0
    kw: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch.float32}
    if experts:
        kw["experts_implementation"] = experts
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, **kw)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    warmup, steps = -(-warmup // block) * block, -(-steps // block) * block
    for _ in range((warmup + steps) // block):
        # block 1: one loss read-back per step; block N: none inside the block, one read-back at its end
        ids = [[torch.randint(0, cfg.vocab_size - 1, (batch, seq), generator=g).to(device) for _ in range(accum)]
               for _ in range(block)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        block_losses = []
        for micro in ids:
            step_loss = 0.0
            for x in micro:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = model(input_ids=x, labels=x)
                # transformers shifts labels itself; `ids` as labels is its standard usage (same loss work)
                (out.loss / accum).backward()
                step_loss = step_loss + out.loss.detach() / accum
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            block_losses.append(step_loss)
        losses += torch.stack(block_losses).tolist()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t) / block)
    step = statistics.median(times[warmup // block:])
    timed = times[warmup // block:]
    res = {"tokens_per_s": accum * batch * seq / step, "step_s": step, "times": times, "accum": accum,
           "tokens_per_s_all": accum * batch * seq * len(timed) / sum(timed), "loss_first_last": [losses[0],
                                                                                                  losses[-1]]}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    res["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    del model, opt
    return res


def check_moe_autocast(cfg: ModelConfig, device: torch.device) -> dict[str, float]:
    """The MoE layer under bf16 autocast (grouped GEMMs over bf16 copies of fp32 weights) against the same layer
    in fp32 (per-expert loop): relative error of the output and of the weight gradient."""
    from giants.model.mlp import MoE

    torch.manual_seed(0)
    moe = MoE(cfg).to(device)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(2, 256, cfg.d_model, device=device)
    outs, grads = [], []
    for amp in (True, False):
        moe.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y, _ = moe(x)
        y.float().square().mean().backward()
        outs.append(y.float())
        grads.append(moe.w_up.grad.clone())
    rel = lambda a, b: float((a - b).detach().norm() / b.detach().norm())  # noqa: E731
    return {"out_rel_err": rel(outs[0], outs[1]), "grad_rel_err": rel(grads[0], grads[1])}


def run_case(name: str, cfg: ModelConfig, args, device: torch.device, root: Path, results: dict) -> None:
    seq, batch = args.seq, args.batch
    aux = 0.02 if cfg.is_moe else None
    fpt, palm = training_flops_per_token(cfg, seq), palm_flops_per_token(cfg, seq)
    case: dict[str, Any] = {"config": cfg.to_dict(), "seq": seq, "batch": batch, "flops_per_token": fpt,
                            "palm_flops_per_token": palm, "params": count_params(cfg).total}
    results["cases"][name] = case
    if cfg.is_moe:
        case["autocast_check"] = check_moe_autocast(cfg, device)
        print(f"[{name}] MoE autocast vs fp32: {case['autocast_check']}", flush=True)
    accums = [int(a) for a in str(args.accum).split(",")]
    data = make_data(root / name, cfg.vocab_size,
                     (args.warmup + args.steps + 2) * max(accums) * batch * (seq + 1) * 2)
    variants = [("giants", False), ("giants+compile", True)] if not args.no_compile else [("giants", False)]
    if args.skip_eager and not args.no_compile:
        variants = [("giants+compile", True)]
    if cfg.is_moe and not args.moe_compile:
        variants = [("giants", False)]
    masters = {"auto": [(None, "")], "on": [(True, "")], "off": [(False, "")],
               "both": [(False, " fp32w"), (True, " master")]}[args.master_weights]
    modes = [(None, "")] if not args.compile_modes else [
        (None if m == "default" else m, f" {m}") for m in args.compile_modes.split(",")]
    variants = [(label + suffix + (msuffix if comp else ""), comp, mw, mode, False) for label, comp in variants
                for mw, suffix in masters for mode, msuffix in (modes if comp else [(None, "")])]
    if args.fsdp1 and not cfg.is_moe:  # FSDP2 over one rank (a one-process group): what the wrapping costs
        variants.append(("giants+compile fsdp1" if not args.no_compile else "giants fsdp1", not args.no_compile,
                         None, None, True))
    for accum in accums:
        asuffix = accum_suffix(accum)
        for label, comp, mw, mode, fsdp in variants:
            label += asuffix
            clear(device)
            print(f"[{name}] {label} ...", flush=True)
            try:
                case[label] = bench_giants(cfg, data, seq=seq, batch=batch,
                                           warmup=args.warmup + (2 if comp else 0), steps=args.steps,
                                           device=str(device), compile=comp, aux=aux, master_weights=mw,
                                           block=args.block, compile_mode=mode, accum=accum, fsdp=fsdp)
            except Exception as e:  # keep going: one failure must not lose the other numbers
                case[label] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
                print(case[label]["trace"], flush=True)
            save(args, results)
        clear(device)
        ref = "transformers" + asuffix
        print(f"[{name}] {ref} ...", flush=True)
        try:
            case[ref] = bench_transformers(cfg, seq=seq, batch=batch, warmup=args.warmup, steps=args.steps,
                                           device=device, aux=aux, block=args.block, accum=accum)
        except Exception as e:
            case[ref] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            print(case[ref]["trace"], flush=True)
            if cfg.is_moe:  # grouped_mm may refuse fp32 weights: measure its eager experts loop instead
                clear(device)
                try:
                    case[ref] = bench_transformers(cfg, seq=seq, batch=batch, warmup=args.warmup,
                                                   steps=args.steps, device=device, aux=aux, experts="eager",
                                                   block=args.block, accum=accum)
                    case[ref]["note"] = "grouped_mm failed under autocast; eager experts"
                except Exception as e2:
                    case[ref] = {"error": f"{type(e2).__name__}: {e2}"}
        save(args, results)


def accum_suffix(accum: int) -> str:
    return "" if accum == 1 else f" accum{accum}"


def save(args, results: dict) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def summarize(results: dict) -> None:
    peak = H100_BF16
    print("\ncase   | variant                        | tokens/s   | step ms | MFU (causal) | MFU (PaLM) | "
          "x transformers | peak GiB")
    for name, case in results["cases"].items():
        labels = [k for k, v in case.items() if isinstance(v, dict) and k.startswith(("giants", "transformers"))]
        for label in labels:
            r = case.get(label)
            if "error" in r:
                print(f"{name:6s} | {label:30s} | ERROR {r['error'][:80]}")
                continue
            accum = r.get("accum", 1)
            ref = case.get("transformers" + accum_suffix(accum), {}).get("tokens_per_s")
            tps = r["tokens_per_s"]
            mfu = tps * case["flops_per_token"] / peak
            mfu_p = tps * case["palm_flops_per_token"] / peak
            ratio = f"{tps / ref:.2f}x" if ref else "-"
            print(f"{name:6s} | {label:30s} | {tps:10,.0f} | {r['step_s'] * 1e3:7.1f} | {100 * mfu:11.1f}% | "
                  f"{100 * mfu_p:9.1f}% | {ratio:>14s} | {r.get('peak_mem_gib', 0):.1f}")
            if "tokens_per_s_all" in r:
                a = r["tokens_per_s_all"]
                step_ms = accum * case["batch"] * case["seq"] / a * 1e3
                print(f"{'':6s} | {'  all timed steps':30s} | {a:10,.0f} | {step_ms:7.1f} | "
                      f"{100 * a * case['flops_per_token'] / peak:11.1f}% | "
                      f"{100 * a * case['palm_flops_per_token'] / peak:9.1f}% |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="dense,moe")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--moe-compile", action="store_true", help="also time the MoE case with torch.compile")
    ap.add_argument("--skip-eager", action="store_true", help="time only the compiled giants variant")
    ap.add_argument("--moe-layers", type=int, default=4)
    ap.add_argument("--accum", default="1", help="comma-separated gradient-accumulation counts to time (micro-batches "
                    "per optimizer step, both sides)")
    ap.add_argument("--master-weights", choices=("auto", "on", "off", "both"), default="auto",
                    help="giants' TrainConfig.master_weights (both: time the two in the same run)")
    ap.add_argument("--compile-modes", help="comma-separated torch.compile modes to time for giants (e.g. "
                    "default,reduce-overhead); default: the TrainConfig default")
    ap.add_argument("--block", type=int, default=1,
                    help="time blocks of N steps: giants logs (and syncs for its clock) every N steps, transformers "
                         "reads its losses back once a block (giants still reads loss and grad norm every step)")
    ap.add_argument("--fsdp1", action="store_true",
                    help="also the giants Trainer under FSDP2 over one rank (--fsdp-always in a 1-process group)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, no timings")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.smoke:
        device = torch.device("cpu")
        args.seq, args.batch, args.warmup, args.steps = 32, 2, 1, 2
        args.no_compile = True
        dense = giants.get_config("tiny-llama")
        moe = giants.get_config("tiny-mixtral").replace(layer_windows=(), ffn_dim=64)
    else:
        device = torch.device("cuda")
        dense = giants.get_config("llama-3.2-1b")
        moe = giants.get_config("mixtral-8x7b").replace(d_model=2048, n_layers=args.moe_layers, n_heads=16,
                                                        n_kv_heads=8, head_dim=128, ffn_dim=5632)
    results: dict[str, Any] = {"env": env(device), "args": vars(args), "peak_flops": H100_BF16, "cases": {}}
    print(json.dumps(results["env"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            cfg = {"dense": dense, "moe": moe}[name]
            run_case(name, cfg, args, device, Path(tmp), results)
    save(args, results)
    summarize(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
