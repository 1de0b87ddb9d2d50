"""`giants fit MODEL`: the `giants serve` line that runs MODEL on the GPUs given, accepted as is.

The smallest tensor-parallel size within the machine's GPU count that `giants serve --tensor-parallel-size`
accepts (parallel.layout.check_tp: heads, KV heads or their replicas, FFN columns and vocabulary divide) and
whose per-GPU memory (weights / TP + KV cache + workspace, analysis.memory.serving_memory) fits the card.
When none does, a layer placement: `--device-map auto --max-memory ...` with each GPU's weight budget left
after its KV cache and workspace (the serving engine's gpu_memory_utilization of the card), planned by the
same planner the server runs (inference.placement.plan_units), the rest of the blocks in host memory,
streamed to GPU 0 every step; its decode speed is bounded by the host-to-GPU link.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from giants.analysis.hardware import GPU
from giants.analysis.memory import ServingMemory, serving_memory, weight_bytes
from giants.config import ModelConfig

TP_SIZES = (1, 2, 4, 8)
UTILIZATION = 0.9  # giants serve / LLM default gpu_memory_utilization
GiB = 2**30
# Host -> GPU bandwidth of pinned copies, bytes/s: PCIe 5.0 x16 (H100/H200/MI300X; 54 GB/s measured on an H100
# SXM by benchmarks/bench_offload.py), PCIe 4.0 x16 elsewhere (~25 GB/s).
HOST_LINK = {"h100-80gb": 50e9, "h200-141gb": 50e9, "mi300x-192gb": 50e9}
HOST_LINK_DEFAULT = 25e9


@dataclass
class ServePlan:
    kind: str  # "tp" | "device_map"
    command: str
    tp: int = 1
    memory: ServingMemory | None = None  # per GPU, "tp"
    skipped: dict[int, str] = field(default_factory=dict)  # TP sizes serve refuses, and why
    max_memory: dict[str, int] = field(default_factory=dict)  # "device_map": bytes per device
    blocks_on_gpus: int = 0
    blocks_streamed: int = 0
    host_bytes: int = 0
    streamed_bytes_per_step: int = 0
    decode_tokens_per_s: float = 0.0  # "device_map": batch-1 roofline with the streaming

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "command": self.command, "tensor_parallel_size": self.tp,
             "skipped_tp": {str(k): v for k, v in self.skipped.items()}}
        if self.memory is not None:
            d["memory_per_gpu"] = self.memory.as_dict()
        if self.kind == "device_map":
            d.update(max_memory=self.max_memory, blocks_on_gpus=self.blocks_on_gpus,
                     blocks_streamed=self.blocks_streamed, host_bytes=self.host_bytes,
                     streamed_bytes_per_step=self.streamed_bytes_per_step,
                     decode_batch1_tokens_per_s=self.decode_tokens_per_s)
        return d


def serve_target(model: str) -> str:
    """What `giants serve` takes for MODEL: a preset name as is; a config.json -> its checkpoint folder."""
    if model.endswith(".json") and os.path.isfile(model):
        return os.path.dirname(model) or "."
    return model


def _flags(weight_dtype: str) -> str:
    return " --dtype bfloat16" if weight_dtype == "bf16" else f" --quantization {weight_dtype}"


def serve_options() -> set[str]:
    """The option strings `giants serve` accepts (read from its parser, so the line printed is one it takes)."""
    import argparse

    from giants.serve.cli import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    return set(sub.choices["serve"]._option_string_actions)


def serve_dtype(cfg: ModelConfig, weight_dtype: str) -> str:
    """The weight format the server can run for a `giants fit --dtype`: bf16, or MXFP4 experts where serve
    has --quantization; anything else is planned as bf16."""
    if weight_dtype == "mxfp4" and cfg.is_moe and "--quantization" in serve_options():
        return "mxfp4"
    return "bf16"


def propose_fp8(cfg: ModelConfig, model: str, gpu: GPU, context: int, batch: int = 1,
                kv_dtype: str | None = None, weight_dtype: str = "fp8") -> ServePlan | None:
    """`giants serve --quantization fp8` (or fp8+mxfp4, for MoE models) runs FP8 weights on one GPU only (not under
    tensor parallelism or layer placement): its plan where one GPU holds the model, else None."""
    if weight_dtype == "fp8+mxfp4" and not cfg.is_moe:
        return None
    mem = serving_memory(cfg, context, batch, weight_dtype, kv_dtype, tp=1)
    if mem.total > gpu.memory_bytes:
        return None
    return ServePlan("tp", f"giants serve {serve_target(model)}{_flags(weight_dtype)} --max-model-len {context}",
                     tp=1, memory=mem, skipped={})


def max_memory_arg(max_memory: dict[str, int]) -> str:
    """{'cuda:0': bytes, 'cpu': bytes} -> '0=64GiB,cpu=80GiB' (what `giants serve --max-memory` reads)."""
    parts = []
    for dev, n in max_memory.items():
        key = dev.split(":")[1] if dev.startswith("cuda:") else dev
        parts.append(f"{key}={n // GiB}GiB")
    return ",".join(parts)


def propose(cfg: ModelConfig, model: str, gpu: GPU, num_gpus: int, context: int, batch: int = 1,
            weight_dtype: str = "bf16", kv_dtype: str | None = None) -> ServePlan:
    from giants.parallel.layout import LayoutError, check_tp

    target = serve_target(model)
    skipped: dict[int, str] = {}
    for tp in (n for n in TP_SIZES if n <= num_gpus):
        try:
            check_tp(cfg, tp, replicate_kv=True)
        except LayoutError as e:
            skipped[tp] = str(e)
            continue
        mem = serving_memory(cfg, context, batch, weight_dtype, kv_dtype, tp=tp)
        if mem.total <= gpu.memory_bytes:
            flag = f" --tensor-parallel-size {tp}" if tp > 1 else ""
            return ServePlan("tp", f"giants serve {target}{flag}{_flags(weight_dtype)} --max-model-len {context}",
                             tp=tp, memory=mem, skipped=skipped)
    return _device_map(cfg, target, gpu, num_gpus, context, batch, weight_dtype, kv_dtype, skipped)


def _device_map(cfg: ModelConfig, target: str, gpu: GPU, num_gpus: int, context: int, batch: int,
                weight_dtype: str, kv_dtype: str | None, skipped: dict[int, str]) -> ServePlan:
    from giants.inference.placement import plan_units, unit_sizes
    from giants.model.transformer import build

    mem = serving_memory(cfg, context, batch, weight_dtype, kv_dtype, tp=1)
    usable = UTILIZATION * gpu.memory_bytes - mem.workspace
    # GPU 0 holds the KV cache of every streamed block as well as of its own: keep all of it there
    budgets = {f"cuda:{g}": max(0, int(usable - (mem.kv_cache if g == 0 else mem.kv_cache / num_gpus)))
               for g in range(num_gpus)}
    budgets = {d: b // GiB * GiB for d, b in budgets.items()}
    meta = build(cfg, device="meta")
    sizes = unit_sizes(meta)
    scale = weight_bytes(cfg, weight_dtype) / max(1, sum(sizes.values()))  # meta is fp32: the format's bytes
    sizes = {n: int(s * scale) for n, s in sizes.items()}
    plan = plan_units(sizes, {**budgets, "cpu": 1 << 62}, "auto")
    host = sum(s for n, s in sizes.items() if plan[n] == "cpu")
    max_memory = {**budgets, "cpu": math.ceil(host * 1.05 / GiB + 1) * GiB}
    layers = [n for n in sizes if n.startswith("layers.")]
    streamed = [n for n in layers if plan[n] == "cpu"]
    on_gpu = sum(s for n, s in sizes.items() if plan[n].startswith("cuda"))
    link = HOST_LINK.get(gpu.name, HOST_LINK_DEFAULT)
    step = max(on_gpu / num_gpus / gpu.bandwidth, host / link)  # the GPU reads its blocks; the link streams
    command = (f"giants serve {target} --device-map auto --max-memory {max_memory_arg(max_memory)}"
               f"{_flags(weight_dtype)} --max-model-len {context}")
    return ServePlan("device_map", command, skipped=skipped, max_memory=max_memory,
                     blocks_on_gpus=len(layers) - len(streamed), blocks_streamed=len(streamed), host_bytes=host,
                     streamed_bytes_per_step=sum(sizes[n] for n in streamed), decode_tokens_per_s=1 / step)
