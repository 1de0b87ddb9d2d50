"""Measure what the analysis predicts, on a real (small) model: FLOPs and KV-cache bytes.

FlopCounterMode has no formulas for two CPU kernels our model reaches: SDPA's CPU flash kernel and
`torch._grouped_mm` (the MoE expert matmul). Without them it silently reports 0 for attention and
experts on CPU, so `flop_counter()` registers both with torch's own conventions (2*M*K*N per matmul,
SDPA = q.k + p.v over the full score matrix).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape=None,
                            **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _grouped_mm_flop(a_shape, b_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    # a: (M, K) rows grouped by expert, b: (E, K, N): each row meets exactly one expert's matrix.
    if len(a_shape) != 2 or len(b_shape) != 3:
        raise ValueError(f"_grouped_mm flop formula: unsupported shapes {a_shape} x {b_shape}")
    return 2 * a_shape[0] * a_shape[1] * b_shape[2]


def flop_counter() -> FlopCounterMode:
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop}
    if hasattr(aten, "_grouped_mm"):
        mapping[aten._grouped_mm] = _grouped_mm_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


ATTENTION_OPS = ("_scaled_dot_product", "bmm", "_flash_attention", "_efficient_attention")


def split_counts(counter: FlopCounterMode) -> dict[str, int]:
    """{'matmul': projections/MLP/head, 'attention': score and value products} from a finished count.
    Our model only uses bmm (or SDPA) inside attention; every mm/addmm/_grouped_mm is a projection."""
    out = {"matmul": 0, "attention": 0}
    for op, n in counter.get_flop_counts()["Global"].items():
        key = "attention" if any(tag in str(op) for tag in ATTENTION_OPS) else "matmul"
        out[key] += n
    return out
