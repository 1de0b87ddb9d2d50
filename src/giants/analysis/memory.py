"""Bytes: KV cache, weights at several precisions, serving memory, training memory per GPU.

Weight formats (what is quantised follows common practice; everything not quantised stays bf16):
- bf16: every tensor 2 bytes.
- fp8, int8: the matrices inside the blocks (attention q/k/v/o, MLP or experts) at 1 byte plus one bf16
  scale per output row (per-channel, as Llama 3.1 FP8 / LLM.int8 ship); embeddings, output head,
  router, norms, biases and sinks bf16.
- int4: the same matrices at 4 bits plus one bf16 scale per group of 128 inputs (GPTQ/AWQ default).
- mxfp4: only the MLP matrices (the experts of an MoE) at 4-bit e2m1 plus one 8-bit e8m0 scale per
  block of 32 (4.25 bits), the rest bf16, as gpt-oss ships.
- fp8+mxfp4: the MLP matrices as mxfp4, the attention matrices as fp8 (giants' quantization="fp8+mxfp4").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from giants.analysis.params import count_params
from giants.config import ModelConfig

WEIGHT_FORMATS = ("bf16", "fp8", "int8", "int4", "mxfp4", "fp8+mxfp4")
# the format each kind of block matrix is stored in, where a weight format mixes two
MIXED_FORMATS = {"fp8+mxfp4": {"attn": "fp8", "mlp": "mxfp4"}}
# Bytes per stored element; 4-bit formats carry their scales inside this figure for KV use only.
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5, "mxfp4": 17 / 32}
INT4_GROUP = 128
MXFP4_BLOCK = 32
GIB = 2**30


def dtype_bytes(dtype: str) -> float:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})") from None


def default_kv_dtype(weight_dtype: str) -> str:
    """The KV-cache dtype a deployment pairs with a weight format: weight-only 4-bit formats (int4
    GPTQ/AWQ, gpt-oss MXFP4) keep a bf16 cache; 8-bit ones run an 8-bit cache."""
    return "bf16" if weight_dtype in ("int4", "mxfp4", "fp8+mxfp4") else weight_dtype


# ---- KV cache --------------------------------------------------------------------------------

def kv_slots(cfg: ModelConfig, context: int) -> list[int]:
    """Cached positions per layer: a sliding layer keeps a ring of `window` slots once the context is
    longer than the window (Transformer.make_cache allocates exactly this)."""
    return [w if (w and w < context) else context for w in cfg.windows]


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype: str = "bf16") -> int:
    """K and V for `batch` sequences of `context` tokens, GQA-aware (n_kv_heads), windows capped."""
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1 (got {context}, {batch})")
    elems = 2 * batch * cfg.n_kv_heads * cfg.head_dim * sum(kv_slots(cfg, context))
    return math.ceil(elems * dtype_bytes(dtype))


def kv_cache_bytes_per_layer(cfg: ModelConfig, context: int, batch: int = 1, dtype: str = "bf16") -> list[int]:
    per_slot = 2 * batch * cfg.n_kv_heads * cfg.head_dim * dtype_bytes(dtype)
    return [math.ceil(per_slot * s) for s in kv_slots(cfg, context)]


# ---- weights ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightBytes:
    fmt: str
    quantized_params: int  # parameters stored in the low-precision format
    quantized_bytes: int  # their values
    scale_bytes: int  # their scales
    bf16_bytes: int  # everything else at 2 bytes

    @property
    def total(self) -> int:
        return self.quantized_bytes + self.scale_bytes + self.bf16_bytes


def _block_matrices(cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
    """(kind, out rows, in cols, count over the whole model) of every matrix inside the blocks."""
    D, F, L = cfg.d_model, cfg.ffn_dim, cfg.n_layers
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    n_mlp = L * (cfg.n_experts if cfg.is_moe else 1)
    return [("attn", q, D, L), ("attn", kv, D, 2 * L), ("attn", D, q, L),
            ("mlp", F, D, 2 * n_mlp), ("mlp", D, F, n_mlp)]


def _quantized_bytes(mats: list[tuple[int, int, int]], fmt: str) -> tuple[int, int]:
    """(value bytes, scale bytes) of matrices (out, in, count) stored in `fmt`."""
    n = sum(o * i * c for o, i, c in mats)
    if fmt in ("fp8", "int8"):
        return n, 2 * sum(o * c for o, i, c in mats)
    if fmt == "int4":
        return math.ceil(n / 2), 2 * sum(o * math.ceil(i / INT4_GROUP) * c for o, i, c in mats)
    if fmt == "mxfp4":  # blocks of 32 along the input dimension share one e8m0 byte
        return math.ceil(n / 2), sum(o * math.ceil(i / MXFP4_BLOCK) * c for o, i, c in mats)
    raise ValueError(f"unknown weight format {fmt!r} (known: {', '.join(WEIGHT_FORMATS)})")


def _quantized_kinds(fmt: str) -> tuple[str, ...]:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r} (known: {', '.join(WEIGHT_FORMATS)})")
    return {"bf16": (), "mxfp4": ("mlp",)}.get(fmt, ("attn", "mlp"))


def _kind_format(fmt: str, kind: str) -> str:
    return MIXED_FORMATS.get(fmt, {}).get(kind, fmt)


def weight_bytes_breakdown(cfg: ModelConfig, fmt: str = "bf16") -> WeightBytes:
    kinds = _quantized_kinds(fmt)
    total = count_params(cfg).total
    qparams = values = scales = 0
    for kind in kinds:
        mats = [(o, i, n) for k, o, i, n in _block_matrices(cfg) if k == kind]
        v, s = _quantized_bytes(mats, _kind_format(fmt, kind))
        qparams, values, scales = qparams + sum(o * i * n for o, i, n in mats), values + v, scales + s
    return WeightBytes(fmt, qparams, values, scales, 2 * (total - qparams))


def mlp_weight_bytes(cfg: ModelConfig, fmt: str = "bf16") -> int:
    """Bytes of the MLP (all experts of an MoE, with their biases) in `fmt`; the rest is the difference."""
    mlp_params = count_params(cfg).mlp
    mats = [(o, i, n) for kind, o, i, n in _block_matrices(cfg) if kind == "mlp"]
    if "mlp" not in _quantized_kinds(fmt):
        return 2 * mlp_params
    values, scales = _quantized_bytes(mats, _kind_format(fmt, "mlp"))
    return values + scales + 2 * (mlp_params - sum(o * i * n for o, i, n in mats))


def weight_bytes(cfg: ModelConfig, fmt: str = "bf16") -> int:
    return weight_bytes_breakdown(cfg, fmt).total


def weight_bytes_all(cfg: ModelConfig) -> dict[str, int]:
    return {fmt: weight_bytes(cfg, fmt) for fmt in WEIGHT_FORMATS}


# ---- serving ---------------------------------------------------------------------------------

RUNTIME_BYTES = 10**9  # CUDA context, cuBLAS/NCCL workspaces, allocator slack: ~1 GB per GPU
PREFILL_CHUNK = 8192  # tokens per prefill step (vLLM's chunked-prefill budget)


def activation_bytes_per_token(cfg: ModelConfig, tp: int = 1) -> int:
    """Peak live activations of one token inside a block during inference (bf16): the residual stream and
    its normed copy, plus the larger of attention's q/k/v/out and the MLP's gate/up/act tensors."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    k = cfg.experts_per_token if cfg.is_moe else 1
    inner = max(2 * q + 2 * kv, 3 * cfg.ffn_dim * k + (cfg.n_experts if cfg.is_moe else 0))
    return 2 * (2 * cfg.d_model + math.ceil(inner / tp))


def workspace_bytes(cfg: ModelConfig, context: int, batch: int = 1, tp: int = 1) -> int:
    """Runtime overhead + activations of one prefill chunk + fp32 logits and probabilities for a batch."""
    chunk = min(context * batch, PREFILL_CHUNK)
    logits = 2 * 4 * batch * cfg.vocab_size
    return RUNTIME_BYTES + chunk * activation_bytes_per_token(cfg, tp) + logits


@dataclass(frozen=True)
class ServingMemory:
    weights: int
    kv_cache: int
    workspace: int
    tp: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["total"] = self.total
        return d


def kv_heads_per_gpu(cfg: ModelConfig, tp: int) -> int:
    """Tensor parallelism splits KV heads; beyond n_kv_heads GPUs each one keeps a replica of one head."""
    return max(1, math.ceil(cfg.n_kv_heads / tp))


def serving_memory(cfg: ModelConfig, context: int, batch: int = 1, weight_dtype: str = "bf16",
                   kv_dtype: str | None = None, tp: int = 1) -> ServingMemory:
    """Memory on each of `tp` GPUs serving `batch` sequences of `context` tokens."""
    kv_dtype = kv_dtype or default_kv_dtype(weight_dtype)
    kv = kv_cache_bytes(cfg, context, batch, kv_dtype)
    kv_gpu = math.ceil(kv * kv_heads_per_gpu(cfg, tp) / cfg.n_kv_heads)
    return ServingMemory(weights=math.ceil(weight_bytes(cfg, weight_dtype) / tp), kv_cache=kv_gpu,
                         workspace=workspace_bytes(cfg, context, batch, tp), tp=tp)


# ---- training --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingMemory:
    params: int
    grads: int
    optimizer: int  # AdamW moments (+ fp32 master weights under mixed precision)
    activations: int
    logits: int
    runtime: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.runtime

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["total"] = self.total
        return d


def saved_activation_bytes_per_token(cfg: ModelConfig, tp: int = 1, dtype: str = "bf16") -> int:
    """Tensors one block keeps for backward, per token: norm inputs and outputs, q/k/v and the attention
    output (flash attention keeps no score matrix), the MLP input copy per expert, gate/up and the
    activation output; sandwich norms add their inputs. Tensor parallelism splits the inner widths."""
    D = cfg.d_model
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    k = cfg.experts_per_token if cfg.is_moe else 1
    replicated = 4 * D + (2 * D if cfg.post_norms else 0) + (k * D if cfg.is_moe else 0)
    inner = 2 * q + 2 * kv + 3 * cfg.ffn_dim * k
    return math.ceil((replicated + inner / tp) * dtype_bytes(dtype))


def training_memory(cfg: ModelConfig, *, micro_batch: int = 1, seq_len: int = 4096, param_dtype: str = "bf16",
                    master_weights: bool | None = None, zero_stage: int = 3, dp: int = 1, tp: int = 1,
                    checkpointing: bool = True) -> TrainingMemory:
    """Per-GPU memory of AdamW training with data-parallel sharding (ZeRO stage 0-3; 3 = FSDP) over
    `dp` GPUs and tensor parallelism over `tp`.

    Model state per parameter: params and grads in `param_dtype`, AdamW's two fp32 moments and, when
    params are 16-bit, an fp32 master copy (`master_weights`, default on for bf16/fp16).
    ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, ZeRO-3 / FSDP also the parameters.
    Activations: with checkpointing each block keeps only its input, plus one block recomputed at a
    time; without, every block keeps `saved_activation_bytes_per_token`. Logits: bf16 logits, an fp32
    log-softmax and a bf16 gradient for each vocabulary entry."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3 (got {zero_stage})")
    if min(micro_batch, seq_len, dp, tp) < 1:
        raise ValueError("micro_batch, seq_len, dp and tp must be >= 1")
    if param_dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"param_dtype must be bf16, fp16 or fp32 (got {param_dtype!r})")
    if master_weights is None:
        master_weights = param_dtype != "fp32"
    n = count_params(cfg).total / tp
    pb = dtype_bytes(param_dtype)
    params = n * pb / (dp if zero_stage >= 3 else 1)
    grads = n * pb / (dp if zero_stage >= 2 else 1)
    optim = n * (8 + (4 if master_weights else 0)) / (dp if zero_stage >= 1 else 1)
    tokens = micro_batch * seq_len
    per_block = saved_activation_bytes_per_token(cfg, tp, "bf16" if param_dtype != "fp32" else "fp32")
    if checkpointing:
        act_dtype = 2 if param_dtype != "fp32" else 4
        acts = tokens * (cfg.n_layers * cfg.d_model * act_dtype + per_block)
    else:
        acts = tokens * cfg.n_layers * per_block
    logits = tokens * cfg.vocab_size * 8 / tp
    return TrainingMemory(params=math.ceil(params), grads=math.ceil(grads), optimizer=math.ceil(optim),
                          activations=math.ceil(acts), logits=math.ceil(logits), runtime=RUNTIME_BYTES)
