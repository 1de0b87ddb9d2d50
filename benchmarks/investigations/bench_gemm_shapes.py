"""The rate of each GEMM in the Llama-3.2-1B training step (8192 tokens: seq 2048 x micro-batch 4, bf16), in the
three layouts a linear layer runs: forward y = x W^T, input gradient dx = dy W, weight gradient dW = dy^T x.
A square 8192^3 GEMM gives the ceiling. CUDA-event medians.

    python benchmarks/investigations/bench_gemm_shapes.py
"""

from __future__ import annotations

import sys

import torch

import giants
from bench_train_optim import timeit


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    cfg = giants.get_config("llama-3.2-1b")
    M, d, L = 2048 * 4, cfg.d_model, cfg.n_layers
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    # name: (in, out, launches a step)
    shapes = {"q/o": (d, q, 2 * L), "k/v": (d, kv, 2 * L), "gate/up": (d, cfg.ffn_dim, 2 * L),
              "down": (cfg.ffn_dim, d, L), "head": (d, cfg.vocab_size, 1)}
    bf = dict(device="cuda", dtype=torch.bfloat16)
    a, b = torch.randn(8192, 8192, **bf), torch.randn(8192, 8192, **bf)
    ms = timeit(lambda: a @ b, reps=30)
    print(f"square 8192^3: {ms * 1e3:.0f} us, {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
    total_ms, total_flop = 0.0, 0.0
    for name, (k, n, count) in shapes.items():
        x, w, dy = torch.randn(M, k, **bf), torch.randn(n, k, **bf), torch.randn(M, n, **bf)
        flop = 2 * M * k * n
        fns = {"fwd": lambda x=x, w=w: torch.nn.functional.linear(x, w), "dgrad": lambda dy=dy, w=w: dy @ w,
               "wgrad": lambda dy=dy, x=x: dy.t() @ x}
        for layout, fn in fns.items():
            t = timeit(fn, reps=30)
            total_ms += t * count
            total_flop += flop * count
            print(f"{name:8} {layout:6} M={M} K={k} N={n}: {t * 1e3:7.0f} us, {flop / t / 1e9:4.0f} TFLOP/s "
                  f"(x{count} a step)")
    print(f"all GEMMs of a step: {total_ms:.1f} ms, {total_flop / 1e12:.1f} TFLOP, "
          f"{total_flop / total_ms / 1e9:.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
