"""Which FP8 matmul path is fastest at small batches (the decode of 2-256 concurrent requests), per Llama-3-70B
weight shape: the Triton GEMV (rows <= GEMV_ROWS), the Triton GEMM, torch._scaled_mm with per-row activation
scales, dequantize + cuBLAS; bf16 cuBLAS for reference. Answers why 32 concurrent requests on the 70B FP8 model
decoded barely faster than one (HISTORY.md, 2026-12-06).

    python benchmarks/investigations/fp8_small_batch.py
"""

from __future__ import annotations

import json

import torch

from giants.inference import kernels as tk
from giants.inference.fp8 import FP8Weight, quantize

SHAPES = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}


def main() -> None:
    dev = torch.device("cuda")
    out: dict = {}
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        for label, block in (("fp8", None), ("fp8-block", (128, 128))):
            w8 = FP8Weight(*quantize(w, block), block)
            for M in (1, 2, 8, 16, 32, 64, 128, 256):
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                row = {"bf16": tk.time_ms(lambda i, x=x, w=w: torch.nn.functional.linear(x, w), 10) * 1e3}
                for path in ("gemv", "gemm", "scaled_mm", "dequant", "auto"):
                    if path == "gemv" and M > 8 or path == "scaled_mm" and block is not None:
                        continue
                    try:
                        row[path] = tk.time_ms(lambda i, x=x, p=path, w8=w8: w8.linear(x, path=p), 10) * 1e3
                    except Exception as e:  # noqa: BLE001
                        row[path] = repr(e)[:80]
                row = {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}
                out[f"{name} {label} M={M}"] = row
                print(f"{name:8s} {label:9s} M={M:4d} us: {row}", flush=True)
            del w8
        del w
        torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
