"""Accelerators: memory, bandwidth and dense peak FLOP/s from the vendors' datasheets.

Memory is the datasheet capacity in 10^9 bytes. The devices expose a little more than that (their
HBM stacks are GiB-sized) minus a driver reserve, so fits computed against it err on the safe side.
FLOP/s are dense (no 2:4 sparsity): datasheets quote sparse figures with an asterisk, dense = half.
GPUs without fp8 tensor cores (A100) run fp8-stored weights at their bf16 rate.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

NODE_SIZE = 8  # GPUs per node: HGX/DGX H100/H200/A100, MI300X platforms


@dataclass(frozen=True)
class GPU:
    name: str
    label: str
    memory_bytes: int
    bandwidth: float  # bytes/s
    bf16_flops: float  # dense FLOP/s
    fp8_flops: float | None  # dense FLOP/s; None = no fp8 tensor cores
    source: str

    def peak_flops(self, dtype: str) -> float:
        """Compute rate for matmuls whose weights are stored in `dtype` (weight-only formats dequantise to
        bf16; fp8 uses fp8 tensor cores where the GPU has them)."""
        if dtype == "fp8" and self.fp8_flops:
            return self.fp8_flops
        return self.bf16_flops


GB, TB, T = 10**9, 10**12, 10**12

GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h100-80gb", "H100 80GB SXM", 80 * GB, 3.35 * TB, 989.4 * T, 1978.9 * T,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3, 3.35 TB/s, BF16 1,979 / FP8 3,958 "
        "TFLOPS with sparsity"),
    GPU("h200-141gb", "H200 141GB SXM", 141 * GB, 4.8 * TB, 989.4 * T, 1978.9 * T,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 1,979 / FP8 3,958 "
        "TFLOPS with sparsity"),
    GPU("a100-80gb", "A100 80GB SXM", 80 * GB, 2.039 * TB, 312 * T, None,
        "NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS "
        "dense (624 sparse), no FP8"),
    GPU("a100-40gb", "A100 40GB SXM", 40 * GB, 1.555 * TB, 312 * T, None,
        "NVIDIA A100 Tensor Core GPU datasheet (SXM 40GB): 40 GB HBM2, 1,555 GB/s, BF16 312 TFLOPS "
        "dense, no FP8"),
    GPU("l40s-48gb", "L40S 48GB", 48 * GB, 0.864 * TB, 362.05 * T, 733 * T,
        "NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 362.05 / FP8 733 TFLOPS dense "
        "(733 / 1,466 with sparsity)"),
    GPU("rtx-4090-24gb", "RTX 4090 24GB", 24 * GB, 1.008 * TB, 165.2 * T, 330.3 * T,
        "NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 24 GB GDDR6X, 1,008 GB/s, "
        "BF16 165.2 / FP8 330.3 TFLOPS dense with FP32 accumulate"),
    GPU("mi300x-192gb", "MI300X 192GB", 192 * GB, 5.3 * TB, 1307.4 * T, 2614.9 * T,
        "AMD Instinct MI300X datasheet: 192 GB HBM3, 5.3 TB/s, BF16 1,307.4 / FP8 2,614.9 TFLOPS dense"),
)}

_ALIASES = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "h100-80gb-sxm": "h100-80gb", "h200": "h200-141gb",
            "a100": "a100-80gb", "a100-80g": "a100-80gb", "a100-40g": "a100-40gb", "l40s": "l40s-48gb",
            "rtx-4090": "rtx-4090-24gb", "rtx4090": "rtx-4090-24gb", "4090": "rtx-4090-24gb",
            "mi300x": "mi300x-192gb", "mi300": "mi300x-192gb"}


def get_gpu(name: str) -> GPU:
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    close = difflib.get_close_matches(key, list(GPUS) + list(_ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown GPU {name!r}{hint} (known: {', '.join(GPUS)})")


def parse_budget(text: str) -> tuple[int, GPU]:
    """'2x a100-80gb' -> (2, A100 80GB); a bare GPU name means one."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[x×*]\s*)?(.+?)\s*", text, flags=re.IGNORECASE)
    if not m or not m.group(2):
        raise ValueError(f"--budget {text!r}: expected COUNTxGPU, e.g. '2x a100-80gb'")
    count = int(m.group(1) or 1)
    if count < 1:
        raise ValueError(f"--budget {text!r}: GPU count must be >= 1")
    return count, get_gpu(m.group(2))
