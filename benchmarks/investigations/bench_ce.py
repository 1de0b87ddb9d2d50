"""The training loss over Llama 3's vocabulary alone (8192 rows x 128,256 bf16 logits, an H200's L2 is 60 MB):
the two-kernel Triton cross-entropy (forward, then backward from the saved logits) against the one-kernel loss +
gradient that the fused head + loss uses, at several persistent-grid sizes. CUDA-event medians.

    python benchmarks/investigations/bench_ce.py [--out ce.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench_train_optim import copy_rate, timeit
from giants.train import cross_entropy as ce


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--out")
    args = ap.parse_args()
    N, V = args.rows, args.vocab
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(N, V, generator=g, device="cuda") * 4).bfloat16()
    labels = torch.randint(0, V, (N,), generator=g, device="cuda")
    gb = logits.numel() * 2 / 1e9
    res: dict[str, float] = {}

    def two_kernels():
        loss, lse = ce._ce_rows_fwd(logits, labels, -100)
        ce._ce_rows_bwd(logits, labels, lse, torch.ones_like(loss), -100)

    res["two_kernels_ms"] = timeit(two_kernels)
    res["fwd_only_ms"] = timeit(lambda: ce._ce_rows_fwd(logits, labels, -100))
    for per_sm in (1, 2, 3, 4, 8):
        ce.GRAD_PROGRAMS_PER_SM = per_sm
        res[f"one_kernel_{per_sm}_per_sm_ms"] = timeit(lambda: ce._ce_rows_grad(logits, labels, -100))
    res["copy_TB_per_s"] = copy_rate()
    for k, v in res.items():
        if k.endswith("_ms"):
            # logits-sized transfers to memory: two kernels read, read, write; one kernel reads and writes, its
            # second read served by L2 if the rows in flight fit
            passes = 2 if k.startswith("one") else (1 if k.startswith("fwd") else 3)
            print(f"{k:28s} {v:7.3f} ms  ({passes * gb / v:5.2f} TB/s over {passes} logits-sized passes)")
    print(f"copy {res['copy_TB_per_s']:.2f} TB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
