"""Calibrated FP8: GPTQ's rounding onto the E4M3 grid (Frantar et al., 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"; llm-compressor runs the same algorithm for FP8 schemes).

Round-to-nearest FP8 (giants.inference.fp8.quantize) rounds each weight on its own. GPTQ rounds the columns of a
weight one at a time and moves each column's rounding error onto the columns not yet rounded, weighted by the
inverse of the layer's input Hessian H = X^T X over calibration tokens, so the layer's output on inputs like X
changes least. The scales and the stored format are the round-to-nearest ones (per output channel or 128 x 128
blocks, amax / 448 of the float weight): only which E4M3 value each weight gets differs, so the result is an
ordinary FP8 checkpoint that every FP8 loader reads, transformers included.

What is calibrated: every linear of every block (q, k, v, o, gate, up, down) and, with "+head", the output head,
from one pass of the float model over the calibration windows (each layer's inputs come from the float layers
before it; the sequential variant, which feeds each layer the already-quantized layers' outputs, is not
implemented). MoE experts are rounded to nearest, and the report says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from giants.inference import fp8
from giants.inference.fp8 import FP8_DTYPE, FP8_MAX, LINEARS, FP8Linear, FP8Options
from giants.model.mlp import MoE


def calibration_windows(source: str | os.PathLike, tokenizer: Any, samples: int = 64,
                        length: int = 256) -> torch.Tensor:
    """(samples, length) int64 token windows spread evenly over `source`: a prepared token dataset directory (its
    train split; `giants prepare` writes them), or a UTF-8 text file encoded with `tokenizer`."""
    if samples < 1 or length < 2:
        raise ValueError(f"calibration: samples ({samples}) must be >= 1 and length ({length}) >= 2")
    path = Path(source).expanduser()
    if path.is_dir():
        from giants.train.data import TokenStream, load_meta

        meta = load_meta(path)
        split = "train" if meta["splits"].get("train", {}).get("tokens") else "val"
        ts = TokenStream(path, split, meta)
        n = meta["splits"][split]["tokens"]
        read = lambda at: torch.from_numpy(ts.get(at, length).astype("int64"))  # noqa: E731
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"calibration file {path}: not UTF-8 text ({e})") from None
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
        n = ids.numel()
        read = lambda at: ids[at:at + length]  # noqa: E731
    else:
        raise FileNotFoundError(f"calibration data {path}: no such file or prepared dataset directory")
    if n < length:
        raise ValueError(f"calibration data {path}: {n} tokens, fewer than one window of {length}")
    step = (n - length) / max(samples - 1, 1)
    return torch.stack([read(int(i * step)) for i in range(samples)])


def _linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, owner, attribute, layer) of every float block linear GPTQ calibrates."""
    out = []
    for i, layer in enumerate(model.layers):
        for owner_name, names in LINEARS:
            owner = getattr(layer, owner_name)
            for name in names:
                mod = getattr(owner, name, None)
                if type(mod) is nn.Linear:
                    out.append((f"layers.{i}.{owner_name}.{name}", owner, name, mod))
    return out


@torch.no_grad()
def input_hessians(model: nn.Module, tokens: torch.Tensor, batch: int = 4,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """X^T X (float64 sums, returned float32) of every block linear's inputs over the windows, by qualified name,
    and of the output head's (the final norm's output) as "head"."""
    lins = _linears(model)
    if not lins:
        raise ValueError("GPTQ: the model has no float block linears to calibrate (already quantized?)")
    vocab = model.config.vocab_size
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise ValueError(f"calibration tokens must lie in [0, {vocab}) (the model's vocabulary); got "
                         f"{int(tokens.min())}..{int(tokens.max())}: a dataset made with another tokenizer?")
    sums: dict[str, torch.Tensor] = {}
    # q, k, v (gate, up) read the same input tensor: one product for them all. The inputs seen are held (so no
    # other tensor can take their place) and dropped when the next module owner starts.
    seen: dict[str, Any] = {"owner": None, "items": []}

    def hook(name):
        owner = name.rsplit(".", 1)[0]

        def fn(mod, inp, out):
            x = inp[0]
            if seen["owner"] != owner:
                seen["owner"], seen["items"] = owner, []
            xtx = next((h for t, h in seen["items"] if t is x), None)
            if xtx is None:
                x2 = x.detach().reshape(-1, x.shape[-1]).double()
                xtx = x2.t() @ x2
                seen["items"].append((x, xtx))
            sums[name] = sums[name] + xtx if name in sums else xtx.clone()
        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, _, _, mod in lins]

    def head_hook(mod, inp, out):
        x2 = out.detach().reshape(-1, out.shape[-1]).double()
        sums["head"] = sums["head"] + x2.t() @ x2 if "head" in sums else x2.t() @ x2

    handles.append(model.norm.register_forward_hook(head_hook))
    was_training = model.training
    model.eval()
    steps = range(0, len(tokens), batch)
    try:
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task("calibrating", total=len(steps))
            for i in steps:
                seen["owner"], seen["items"] = None, []
                model(tokens[i:i + batch].to(next(model.parameters()).device))
                bar.advance(task)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v.float() for k, v in sums.items()}


def gptq_fp8(w: torch.Tensor, hessian: torch.Tensor, block: tuple[int, int] | None = None, damp: float = 0.01,
             cols: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn (N, K), scale) of the float weight w (N, K) in quantize()'s layout (block None: per output
    channel), q chosen by GPTQ against the input Hessian (K, K). damp: the fraction of the mean diagonal added to
    H's diagonal (GPTQ's percdamp); cols: columns rounded between two full error updates (GPTQ's lazy batch)."""
    N, K = w.shape
    if hessian.shape != (K, K):
        raise ValueError(f"GPTQ: Hessian {tuple(hessian.shape)} does not match the weight's {K} inputs")
    w = w.detach().float().clone()
    _, scale = fp8.quantize(w, block)  # the round-to-nearest scales: amax / 448 of the float weight
    s = _expand(scale, (N, K), block)
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: their weights do not matter; keep H invertible
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"GPTQ: the input Hessian is not positive definite even with damp={damp}; raise damp "
                         f"({e})") from None
    q = torch.empty(N, K, dtype=FP8_DTYPE)
    for c0 in range(0, K, cols):
        c1 = min(c0 + cols, K)
        w1, err, h1 = w[:, c0:c1].clone(), torch.empty(N, c1 - c0), hinv[c0:c1, c0:c1]
        for j in range(c1 - c0):
            col, sj = w1[:, j], s[:, c0 + j]
            qj = (col / sj).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            q[:, c0 + j] = qj
            e = (col - qj.float() * sj) / h1[j, j]
            w1[:, j:] -= e[:, None] * h1[j, j:][None, :]
            err[:, j] = e
        w[:, c1:] -= err @ hinv[c0:c1, c1:]
    return q, scale


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None) -> torch.Tensor:
    """The per-weight scale (N, K) of quantize()'s scale tensor."""
    N, K = shape
    if block is None:
        return scale.reshape(N, 1).expand(N, K)
    rows = fp8.expand_rows(scale, N, block)  # (N, ceil(K / bk))
    return rows.repeat_interleave(block[1], dim=1)[:, :K]


def quantize_model_gptq(model: nn.Module, tokens: torch.Tensor | None, options: FP8Options | str = "fp8",
                        damp: float = 0.01, batch: int = 4, progress: bool = False,
                        hessians: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Every block linear of `model` (float, in place) to an FP8Linear whose values GPTQ chose on `tokens`
    ((samples, length) windows) or on `hessians` already collected from them (input_hessians: one pass serves
    several layouts); with "+head" the output head too (by GPTQ on the final norm's outputs); MoE experts rounded
    to nearest. Returns a report: layers calibrated, whether the head was, what was rounded to nearest, and the
    rms relative output error of the block linears on the calibration inputs (tr(E H E^T) / tr(W H W^T), E the
    weight error) with GPTQ and with round to nearest."""
    opts = fp8.parse_fp8(options) if isinstance(options, str) else options
    if hessians is None:
        if tokens is None:
            raise ValueError("quantize_model_gptq: give calibration tokens or their hessians")
        hessians = input_hessians(model, tokens, batch=batch, progress=progress)
    lins = _linears(model)
    block = opts.block
    err_gptq = err_rtn = 0.0
    missing = [name for name, *_ in lins if name not in hessians]
    if missing:
        raise ValueError(f"quantize_model_gptq: no Hessian for {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''} (collected from another model?)")
    done = []  # the model changes only once every layer is rounded: an error leaves it as it was
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("GPTQ", total=len(lins))
        for name, owner, attr, mod in lins:
            done.append((owner, attr, _gptq_layer(mod, hessians[name], block, damp)))
            err_gptq += done[-1][2][1]
            err_rtn += done[-1][2][2]
            bar.advance(task)
    head = None
    if opts.head and isinstance(model.output_weight, torch.Tensor) and "head" in hessians:
        head = _gptq_layer(_HeadView(model.output_weight), hessians["head"], block, damp)[0]
    for owner, attr, (layer, _, _) in done:
        setattr(owner, attr, layer)
    if head is not None:
        model.lm_head = head  # a tied head becomes an FP8 copy of the embedding, as quantize_head makes it
    rtn = ["MoE experts"] if any(isinstance(layer.mlp, MoE) for layer in model.layers) else []
    # what is left, rounded to nearest: MoE experts, the head with +head when it was not calibrated
    fp8.quantize_model(model, dataclasses.replace(opts, head=opts.head and head is None))
    if opts.head and head is None:
        rtn.append("output head")
    n = len(lins)
    return {"calibrated_linears": n, "calibrated_head": head is not None, "round_to_nearest": rtn,
            "windows": int(tokens.shape[0]) if tokens is not None else None,
            "tokens": int(tokens.numel()) if tokens is not None else None, "damp": damp,
            "output_error_rel": {"gptq": math.sqrt(err_gptq / n), "round_to_nearest": math.sqrt(err_rtn / n)}}


class _HeadView:
    """The output head's weight as _gptq_layer reads a linear (no bias)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.bias = weight, None


def _gptq_layer(mod: nn.Linear | _HeadView, H: torch.Tensor, block: tuple[int, int] | None,
                damp: float) -> tuple[FP8Linear, float, float]:
    """(the FP8Linear GPTQ makes of mod, its relative output error on H's inputs, round to nearest's)."""
    w, H = mod.weight.detach().float().cpu(), H.cpu()
    q, scale = gptq_fp8(w, H, block, damp)
    layer = FP8Linear(w.shape[1], w.shape[0], mod.bias is not None, block, device=mod.weight.device,
                      dtype=mod.weight.dtype)
    layer.qweight.copy_(q)
    layer.weight_scale.copy_(scale)
    if mod.bias is not None:
        layer.bias.data.copy_(mod.bias.detach())
    deq = layer.weight.dequantize(torch.float32).cpu()
    ref = max(_quad(w, H), 1e-30)  # an all-zero weight: both errors are zero
    return layer, _quad(deq - w, H) / ref, _quad(fp8.dequantize(*fp8.quantize(w, block), block) - w, H) / ref


def _quad(e: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T): the squared output error of weight error E summed over the calibration inputs."""
    return float(((e @ H) * e).sum())
