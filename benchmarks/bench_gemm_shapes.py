"""The rate of each GEMM in the Llama-3.2-1B training step (8192 tokens: seq 2048 x micro-batch 4, bf16), in the
three layouts a linear layer runs: forward y = x W^T, input gradient dx = dy W, weight gradient dW = dy^T x.
A square 8192^3 GEMM gives the ceiling. CUDA-event medians.

    python benchmarks/bench_gemm_shapes.py
"""

from __future__ import annotations

import sys

import torch

from bench_train_optim import timeit

SHAPES = {
    "q/o": (2048, 2048),
    "k/v": (2048, 512),
    "gate/up": (2048, 8192),
    "down": (8192, 2048),
    "head": (2048, 128256),
}


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    M = 8192
    bf = dict(device="cuda", dtype=torch.bfloat16)
    a = torch.randn(8192, 8192, **bf)
    b = torch.randn(8192, 8192, **bf)
    ms = timeit(lambda: a @ b, reps=30)
    print(f"square 8192^3: {ms * 1e3:.0f} us, {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
    total_ms, total_flop = 0.0, 0.0
    for name, (k, n) in SHAPES.items():
        x = torch.randn(M, k, **bf)
        w = torch.randn(n, k, **bf)
        dy = torch.randn(M, n, **bf)
        flop = 2 * M * k * n
        fns = {
            "fwd": lambda x=x, w=w: torch.nn.functional.linear(x, w),
            "dgrad": lambda dy=dy, w=w: dy @ w,
            "wgrad": lambda dy=dy, x=x: dy.t() @ x,
        }
        for layout, fn in fns.items():
            t = timeit(fn, reps=30)
            count = 1 if name == "head" else (2 if "/" in name else 1) * 16
            total_ms += t * count
            total_flop += flop * count
            print(
                f"{name:8} {layout:6} M={M} K={k} N={n}: {t * 1e3:7.0f} us, {flop / t / 1e9:4.0f} TFLOP/s "
                f"(x{count} a step)"
            )
    print(
        f"all GEMMs of a step: {total_ms:.1f} ms, {total_flop / 1e12:.1f} TFLOP, {total_flop / total_ms / 1e9:.0f} "
        "TFLOP/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
