"""One tensor-parallel rank's model: a Transformer whose modules have the rank's local shapes, filled with its
slices of the weights, never a full copy of a checkpoint.

Which dim of which parameter is split (and which rank holds what) comes from giants.parallel.layout
(`tp_local_config`, `tp_shard`, `tp_reduced_bias`), the table the training TP plan reads too.
Sources: a checkpoint directory or GGUF file (each rank reads only its slices, giants.checkpoint.sharded), a
random-weight preset (every rank builds the same seeded model and keeps its slices: presets are small), or an
in-memory Transformer (rank 0 slices it and hands each worker its share).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from giants.config import ModelConfig
from giants.model.transformer import Transformer, build
from giants.parallel.layout import tp_local_config, tp_reduced_bias, tp_shard


@dataclass
class ShardSpec:
    """What every rank needs to build its shard (sent to the workers as a giants.inference.wire message)."""

    kind: str  # "preset" | "dir" | "gguf" | "state"
    source: str | None
    cfg: ModelConfig
    tp: int
    dtype: torch.dtype | None
    seed: int = 0
    quantization: str | None = None
    weights: str | None = None
    naming: str = "hf"  # "dir": the tensor names
    states: list[dict[str, torch.Tensor]] | None = None  # "state": per-rank slices of an in-memory model


def vocab_start(cfg: ModelConfig, rank: int, tp: int) -> int:
    shard = tp_shard(cfg, "embed.weight", (cfg.vocab_size, cfg.d_model), rank, tp)
    return shard[1] if shard is not None else 0


def skeleton(cfg: ModelConfig, tp: int, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The rank's modules, uninitialised: local heads / KV heads / FFN columns, vocab-parallel embedding and head
    (the config keeps the whole vocabulary: token ids are checked against it)."""
    from giants.checkpoint.loading import _no_meta_init

    local = tp_local_config(cfg, tp)
    with _no_meta_init():
        m = build(local, device="meta")
        rows = cfg.vocab_size // tp
        m.embed = nn.Embedding(rows, cfg.d_model, device="meta")
        if m.lm_head is not None:
            m.lm_head = nn.Linear(cfg.d_model, rows, bias=False, device="meta")
    # Each tensor allocated on its own (Module.to_empty was measured to leave ~2x a weight's bytes resident
    # before anything is written: the RSS this loader exists to keep at one shard).
    for mod in m.modules():
        for name, t in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, nn.Parameter(torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype,
                                                         device=device), requires_grad=False))
        for name, t in list(mod.named_buffers(recurse=False)):
            setattr(mod, name, torch.empty(t.shape, dtype=t.dtype, device=device))
    if m.rotary is not None:
        m.rotary.reset_buffers()
    return m


def slice_params(full: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """rank's share of a whole model's parameters (views; clone to keep)."""
    out = {}
    for name, t in full.items():
        shard = tp_shard(cfg, name, tuple(t.shape), rank, tp)
        out[name] = t if shard is None else t.narrow(shard[0], shard[1], shard[2] - shard[1])
    return out


def default_dtype(spec: ShardSpec, device: torch.device) -> torch.dtype:
    if spec.dtype is not None:
        return spec.dtype
    if spec.kind == "preset":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec.kind == "dir":
        from giants.checkpoint.loading import _default_dtype
        from giants.checkpoint.safetensors_io import SafetensorsSet

        return _default_dtype(SafetensorsSet.from_dir(Path(spec.source)))
    if spec.kind == "state":
        return next(t for s in spec.states for t in s.values()).dtype
    return torch.float32  # GGUF: dequantized


def build_shard(spec: ShardSpec, rank: int, device: torch.device) -> tuple[Transformer, int]:
    """(this rank's model in eval mode, bytes of checkpoint read)."""
    cfg, tp = spec.cfg, spec.tp
    dtype = default_dtype(spec, device)
    model = skeleton(cfg, tp, device, dtype)
    params = dict(model.named_parameters())
    nbytes = 0
    with torch.no_grad():
        if spec.kind == "dir":
            from giants.checkpoint.sharded import load_dir_shard

            nbytes = load_dir_shard(Path(spec.source), cfg, spec.naming, params, rank, tp)
        elif spec.kind == "gguf":
            from giants.checkpoint.sharded import load_gguf_shard

            nbytes = load_gguf_shard(Path(spec.source), params, rank, tp)
        elif spec.kind == "preset":
            from giants.inference.llm import random_model

            full = random_model(spec.source, device, dtype, spec.seed)  # same seed on every rank: same weights
            for name, t in slice_params(dict(full.named_parameters()), cfg, rank, tp).items():
                params[name].copy_(t)
            del full
        elif spec.kind == "state":
            for name, t in spec.states[rank].items():
                params[name].copy_(t)
        else:
            raise ValueError(f"unknown shard source kind {spec.kind!r}")
        if rank:
            for name, p in params.items():
                if tp_reduced_bias(name):
                    p.zero_()  # added once, by rank 0, inside the all-reduced sum
    model.eval()
    if spec.quantization == "mxfp4":
        from giants.inference.mxfp4 import pack_experts

        model = pack_experts(model)
    if spec.weights == "int8":
        from giants.inference.quant import int8_weights

        model = int8_weights(model)
    return model, nbytes
