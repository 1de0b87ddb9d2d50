"""From bytes and FLOPs to GPUs and seconds: fit, roofline decode, prefill time, training GPU-days.

Roofline: a step takes max(bytes moved / bandwidth, FLOPs / peak FLOP/s) summed over the GPUs of a
tensor-parallel group, with no communication cost and 100% of peak; real systems reach a fraction of it
(decode typically 50-80% of bandwidth), so read the tokens/s as an upper bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from giants.analysis.flops import forward_flops_per_token, prefill_flops, training_flops_per_token
from giants.analysis.hardware import GPU, NODE_SIZE
from giants.analysis.memory import (
    ServingMemory,
    default_kv_dtype,
    kv_cache_bytes,
    kv_heads_per_gpu,
    mlp_weight_bytes,
    serving_memory,
    weight_bytes,
)
from giants.config import ModelConfig

TP_SIZES = (1, 2, 4, 8)


class FitError(ValueError):
    """The model does not fit the GPUs asked for; the message says what it would need."""


@dataclass(frozen=True)
class Fit:
    gpu: GPU
    gpus: int  # tensor-parallel degree = GPUs used
    weight_dtype: str
    kv_dtype: str
    context: int
    batch: int
    memory: ServingMemory  # per GPU

    @property
    def free_bytes(self) -> int:
        return self.gpu.memory_bytes - self.memory.total

    def layout(self, cfg: ModelConfig) -> str:
        if self.gpus == 1:
            return "single GPU"
        heads = cfg.n_heads // self.gpus
        kvh = kv_heads_per_gpu(cfg, self.gpus)
        rep = " (kv heads replicated)" if self.gpus > cfg.n_kv_heads else ""
        experts = f", 1/{self.gpus} of each of {cfg.n_experts} experts" if cfg.is_moe else ""
        return f"TP={self.gpus}: {heads} q / {kvh} kv heads{rep}{experts} per GPU"

    def as_dict(self, cfg: ModelConfig) -> dict:
        return {"gpu": self.gpu.name, "gpus": self.gpus, "tensor_parallel": self.gpus,
                "layout": self.layout(cfg), "weight_dtype": self.weight_dtype, "kv_dtype": self.kv_dtype,
                "context": self.context, "batch": self.batch, "gpu_memory_bytes": self.gpu.memory_bytes,
                "memory_per_gpu_bytes": self.memory.total, "memory_per_gpu": self.memory.as_dict(),
                "free_per_gpu_bytes": self.free_bytes}


def tp_candidates(cfg: ModelConfig, max_gpus: int = NODE_SIZE) -> list[int]:
    """Tensor-parallel sizes that split the query heads evenly."""
    return [n for n in TP_SIZES if n <= max_gpus and cfg.n_heads % n == 0]


def fit(cfg: ModelConfig, gpu: GPU, context: int, batch: int = 1, weight_dtype: str = "bf16",
        kv_dtype: str | None = None, max_gpus: int = NODE_SIZE) -> Fit:
    """Fewest GPUs (a tensor-parallel group within `max_gpus`) that hold weights, KV cache and workspace."""
    kv_dtype = kv_dtype or default_kv_dtype(weight_dtype)
    if context > cfg.max_context:
        raise ValueError(f"context {context} exceeds the model's max_context {cfg.max_context}")
    if max_gpus < 1:
        raise ValueError(f"max_gpus must be >= 1 (got {max_gpus})")
    candidates = tp_candidates(cfg, max_gpus)
    for n in candidates:
        mem = serving_memory(cfg, context, batch, weight_dtype, kv_dtype, tp=n)
        if mem.total <= gpu.memory_bytes:
            return Fit(gpu, n, weight_dtype, kv_dtype, context, batch, mem)
    largest = max(candidates)  # 1 always divides the heads
    one = serving_memory(cfg, context, batch, weight_dtype, kv_dtype, tp=1)
    room = gpu.memory_bytes - one.workspace
    need = math.ceil((one.weights + one.kv_cache) / room) if room > 0 else math.inf
    need = max(need, largest + 1)  # the largest usable group did not fit (KV heads replicate beyond n_kv_heads)
    what = (f"{one.weights / 1e9:.1f} GB of {weight_dtype} weights + {one.kv_cache / 1e9:.1f} GB of {kv_dtype} "
            f"KV cache ({batch} x {context} tokens)")
    where = "one node" if max_gpus >= NODE_SIZE else f"the {max_gpus} GPU(s) given"
    limit = f"the limit is {largest}"
    if largest < max_gpus:
        limit += (f" (tensor parallelism over {', '.join(map(str, TP_SIZES[:-1]))} or {TP_SIZES[-1]} GPUs that "
                  f"divide the {cfg.n_heads} query heads, one {NODE_SIZE}-GPU node at most)")
    need_text = f"at least {need}" if need != math.inf else "more than any number of"
    raise FitError(f"does not fit {where}: {what} need {need_text} x {gpu.label} "
                   f"({gpu.memory_bytes / 1e9:.0f} GB each) but {limit}; try --dtype int4 or "
                   f"mxfp4, a shorter --context, a smaller --batch, or a larger GPU")


@dataclass(frozen=True)
class Decode:
    step_seconds: float
    tokens_per_s_per_seq: float
    tokens_per_s: float  # aggregate over the batch
    bound: str  # "memory" or "compute"
    bytes_per_step: float
    flops_per_step: float

    def as_dict(self) -> dict:
        return asdict(self)


def expected_experts_touched(cfg: ModelConfig, batch: int) -> float:
    """Distinct experts a layer reads for `batch` tokens, routing uniform and independent (what load
    balancing aims for): E * (1 - (1 - k/E)^batch)."""
    if not cfg.is_moe:
        return 1.0
    E, k = cfg.n_experts, cfg.experts_per_token
    return E * (1 - (1 - k / E) ** batch)


def embedding_lookup_saving(cfg: ModelConfig, batch: int) -> int:
    """Bytes of the (bf16) input embedding table a decode step does NOT read: the lookup fetches one row
    per sequence. A tied table is read in full anyway, as the output head, so nothing is saved."""
    if cfg.tie_embeddings:
        return 0
    return 2 * cfg.d_model * (cfg.vocab_size - min(batch, cfg.vocab_size))


def decode(cfg: ModelConfig, gpu: GPU, gpus: int, context: int, batch: int = 1, weight_dtype: str = "bf16",
           kv_dtype: str | None = None) -> Decode:
    """One decode step for `batch` sequences at `context` tokens each on a TP group of `gpus`. Bytes read:
    every weight but the experts nobody routed to and the input embedding rows nobody looked up, plus the
    whole KV cache (replicated KV heads read on each GPU that holds them)."""
    kv_dtype = kv_dtype or default_kv_dtype(weight_dtype)
    mlp = mlp_weight_bytes(cfg, weight_dtype)
    other = weight_bytes(cfg, weight_dtype) - mlp - embedding_lookup_saving(cfg, batch)
    touched = mlp * (expected_experts_touched(cfg, batch) / cfg.n_experts if cfg.is_moe else 1.0)
    kv = kv_cache_bytes(cfg, context, batch, kv_dtype) * kv_heads_per_gpu(cfg, gpus) * gpus / cfg.n_kv_heads
    nbytes = other + touched + kv
    flops = batch * forward_flops_per_token(cfg, context).total
    t_mem = nbytes / (gpus * gpu.bandwidth)
    t_cmp = flops / (gpus * gpu.peak_flops(weight_dtype))
    step = max(t_mem, t_cmp)
    return Decode(step, 1 / step, batch / step, "memory" if t_mem >= t_cmp else "compute", nbytes, flops)


def prefill_seconds(cfg: ModelConfig, gpu: GPU, gpus: int, tokens: int, batch: int = 1,
                    weight_dtype: str = "bf16", kv_dtype: str | None = None) -> float:
    """Roofline time to prefill `batch` prompts of `tokens` tokens (causal attention)."""
    flops = prefill_flops(cfg, tokens, batch).total
    kv_dtype = kv_dtype or default_kv_dtype(weight_dtype)
    nbytes = weight_bytes(cfg, weight_dtype) + kv_cache_bytes(cfg, tokens, batch, kv_dtype)
    return max(flops / (gpus * gpu.peak_flops(weight_dtype)), nbytes / (gpus * gpu.bandwidth))


def training_gpu_days(cfg: ModelConfig, gpu: GPU, tokens: float, mfu: float = 0.4, seq_len: int = 4096) -> float:
    """GPU-days to train on `tokens` tokens at model-FLOPs utilisation `mfu` of the dense bf16 peak."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1] (got {mfu})")
    return tokens * training_flops_per_token(cfg, seq_len) / (mfu * gpu.bf16_flops) / 86400
