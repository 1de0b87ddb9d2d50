"""Triton kernels for the GPU decode path, by op family: norm_rotary (fused residual + RMSNorm, gated activation,
rotary + paged KV write), attention (paged decode attention), gemv (one-row GEMVs with fused norm / rotary
epilogues), moe (expert-indexed GEMVs, router top-k), mxfp4 (the packed-FP4 expert GEMV), common (PDL, shared
in-kernel helpers, config timing). Callers use the package as one namespace:
`from giants.inference import kernels as tk`.

Imported only on CUDA (or under TRITON_INTERPRET=1 for checking on a CPU). Shapes: B sequences (one
token each), H query heads, Hkv kv heads, G = H // Hkv, D head dim, bs block size.
"""

from __future__ import annotations

from giants.inference.kernels import common
from giants.inference.kernels.attention import PagedAttention
from giants.inference.kernels.common import ACTS, cold_copies, pick_config_timed, set_pdl, time_ms
from giants.inference.kernels.gemv import (
    GEMV_CONFIGS,
    NORM_GEMV_CONFIGS,
    ChainNorm,
    gemv,
    norm_gemv,
    pick_linear_1row,
    qkv_rope_gemv,
)
from giants.inference.kernels.moe import (
    EXPERT_GEMV_CONFIGS,
    SPLITK_CONFIGS,
    expert_down_combine,
    expert_gemv,
    norm_route,
    pick_expert_act,
    pick_expert_down,
    pick_expert_gemv,
    pick_gemv_act,
    route_topk,
    splitk_gemv,
)
from giants.inference.kernels.mxfp4 import mxfp4_gemv
from giants.inference.kernels.norm_rotary import glu, rmsnorm, rope_kv_write

__all__ = ["ACTS", "ChainNorm", "EXPERT_GEMV_CONFIGS", "GEMV_CONFIGS", "NORM_GEMV_CONFIGS", "SPLITK_CONFIGS",
           "PagedAttention",
           "cold_copies", "expert_down_combine", "expert_gemv", "gemv", "glu", "mxfp4_gemv", "norm_gemv", "norm_route",
           "pick_config_timed", "pick_expert_act", "pick_expert_down", "pick_expert_gemv", "pick_gemv_act",
           "pick_linear_1row", "qkv_rope_gemv", "rmsnorm", "rope_kv_write", "route_topk", "set_pdl", "splitk_gemv",
           "time_ms"]


def __getattr__(name: str):
    # PDL_ON is rebound by set_pdl; read it from common at each access so `tk.PDL_ON` is never a stale copy
    if name == "PDL_ON":
        return common.PDL_ON
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
