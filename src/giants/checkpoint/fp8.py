"""FP8 checkpoints the way transformers writes and reads them (config.json `quantization_config`):

  quant_method "fbgemm_fp8" (FbgemmFp8Config): per output channel, `<module>.weight` F8_E4M3 (N, K) and
      `<module>.weight_scale` F32 (N, 1); W = weight * weight_scale. giants' "fp8" (per-channel) writes this.
  quant_method "fp8" (FineGrainedFP8Config) with weight_block_size [bn, bk]: `<module>.weight` F8_E4M3 and
      `<module>.weight_scale_inv` F32 (ceil(N/bn), ceil(K/bk)); W = weight * weight_scale_inv per block (the
      "inverse" is transformers' name for the dequantization factor). weight_block_size null: one scalar
      weight_scale_inv per tensor. giants' "fp8-block" writes [128, 128].

Linears listed in modules_to_not_convert (lm_head, routers, gpt-oss' fused experts, which transformers' FP8
integrations do not convert) are stored in the model's dtype. Activation scales (activation_scheme "static")
are refused: giants quantizes activations dynamically.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from giants.checkpoint import hf_map
from giants.config import ModelConfig

FBGEMM, FINEGRAINED = "fbgemm_fp8", "fp8"
METHODS = (FBGEMM, FINEGRAINED)


def quantization_config(path: Path) -> dict[str, Any]:
    """config.json's quantization_config of a checkpoint directory ({} when none)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return {}
    try:
        qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return qc if isinstance(qc, dict) else {}


def stored_layout(qc: dict[str, Any]) -> tuple[str, tuple[int, int] | None, bool]:
    """(method, block, per_tensor) of an FP8 quantization_config: block None means per output channel."""
    method = qc.get("quant_method")
    if method == FBGEMM:
        return method, None, False
    if method != FINEGRAINED:
        raise ValueError(f"not an FP8 quantization_config: quant_method {method!r}")
    if str(qc.get("activation_scheme", "dynamic")).lower() != "dynamic":
        raise ValueError(f"FP8 activation_scheme {qc.get('activation_scheme')!r}: only 'dynamic' is supported")
    if qc.get("scale_fmt", "float") != "float":
        raise ValueError(f"FP8 scale_fmt {qc.get('scale_fmt')!r}: only 'float' scales are supported")
    bs = qc.get("weight_block_size")
    if bs is None:
        return method, None, True
    if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
        raise ValueError(f"FP8 weight_block_size {bs!r}: expected two positive integers")
    return method, (bs[0], bs[1]), False


def scale_name(weight_name: str, method: str) -> str:
    """The scale tensor beside an FP8 weight, named as transformers names it."""
    return weight_name + "_scale" if method == FBGEMM else weight_name + "_scale_inv"


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] | None, per_tensor: bool) -> tuple[int, ...]:
    if per_tensor:
        return ()
    if block is None:
        return (shape[0], 1)
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def to_module_scale(scale: torch.Tensor, n: int, per_tensor: bool) -> torch.Tensor:
    """A stored scale in the layout of giants' FP8 modules (a per-tensor scalar becomes (n, 1))."""
    return scale.float().reshape(1, 1).expand(n, 1) if per_tensor else scale.float()


# ---- export ----------------------------------------------------------------------------------------
def model_layout(model) -> tuple[str, tuple[int, int] | None]:
    """(method, block) for writing `model`'s FP8 modules; they must all share one layout."""
    from giants.inference.fp8 import FP8Linear, FP8MoE

    layouts = set()
    for m in model.modules():
        if isinstance(m, FP8Linear):
            layouts.add(None if m.per_channel else m.block)
        elif isinstance(m, FP8MoE):
            layouts.update(None if m.per_channel(n) else m.blocks[n] for n in FP8MoE.NAMES)
    if len(layouts) != 1:
        raise ValueError(f"FP8 export: the model's FP8 weights mix scale layouts {sorted(map(str, layouts))}; "
                         "a checkpoint holds one")
    block = layouts.pop()
    if block is not None and block[0] == 1:
        raise ValueError(f"FP8 export: per-row block scales {block} have no transformers format")
    return (FBGEMM, None) if block is None else (FINEGRAINED, block)


def hf_tensors(model, cfg: ModelConfig, dtype: torch.dtype | None = None
               ) -> tuple[Iterator[tuple[str, torch.Tensor]], dict[str, Any]]:
    """((HF name, tensor) for every tensor of an FP8 model, its quantization_config)."""
    from giants.inference.fp8 import FP8Linear, FP8MoE
    from giants.inference.mxfp4 import MXFP4MoE

    if any(isinstance(m, MXFP4MoE) for m in model.modules()):
        raise ValueError("save: a model with packed MXFP4 experts is not written yet; save the model the checkpoint "
                         "was loaded from (quantize='mxfp4' writes MXFP4 experts)")
    method, block = model_layout(model)
    modules = dict(model.named_modules())
    state = dict(model.state_dict())
    skip: list[str] = []
    rules = hf_map.family_rules(cfg)
    E = cfg.n_experts
    for rule in rules:
        owner, leaf = rule.ours[0].rsplit(".", 1)
        per_expert = len(rule.hf) == E and len(rule.ours) == 1
        if isinstance(modules.get(owner), FP8MoE) and leaf in FP8MoE.NAMES and not per_expert:
            skip.append(rule.hf[0].rsplit(".", 1)[0])  # fused experts (gpt-oss): written in the model's dtype
    if model.lm_head is None or not isinstance(model.lm_head, FP8Linear) or cfg.tie_embeddings:
        skip.append("lm_head")
    if cfg.is_moe and cfg.hf_model_type == "mixtral":
        skip.append("block_sparse_moe.gate")
    qc: dict[str, Any] = {"quant_method": method, "modules_to_not_convert": sorted(set(skip))}
    if method == FBGEMM:
        qc["activation_scale_ub"] = 1200.0
    else:
        qc.update(activation_scheme="dynamic", weight_block_size=list(block))

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype.itemsize > 1 else t

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for rule in rules:
            owner, leaf = rule.ours[0].rsplit(".", 1)
            mod = modules.get(owner)
            if rule.identity and isinstance(mod, FP8Linear) and leaf == "weight":
                if rule.hf[0] == "lm_head.weight" and cfg.tie_embeddings:
                    continue
                yield rule.hf[0], mod.qweight.contiguous()
                yield scale_name(rule.hf[0], method), mod.weight_scale.contiguous()
                continue
            if isinstance(mod, FP8MoE) and leaf in FP8MoE.NAMES:
                if len(rule.hf) == E and len(rule.ours) == 1:  # one tensor per expert: FP8 per expert
                    w = mod.weight(leaf)
                    for e, name in enumerate(rule.hf):
                        yield name, w.q[e].contiguous()
                        yield scale_name(name, method), w.scale[e].contiguous()
                    continue
                ours = {o: mod.weight(o.rsplit(".", 1)[1]).dequantize(dtype or torch.float32) for o in rule.ours}
                for name, t in zip(rule.hf, rule.to_hf([ours[o] for o in rule.ours])):
                    yield name, cast(t)
                continue
            for name, t in zip(rule.hf, rule.to_hf([state[o] for o in rule.ours])):
                yield name, cast(t)

    return items(), qc
