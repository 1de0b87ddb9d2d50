"""The optimizer step alone at Llama-3.2-1B shape (1.24 B parameters) on CUDA: torch's fused AdamW over fp32
weights (the Trainer's fp32-weight path, clip scale folded in) against giants.train.optim.MasterAdamW (one Triton
pass per tensor; bf16 matmul weights + fp32 masters, and fp32 weights with no cast), plus the gradient norm
over fp32 and over bf16 gradients. CUDA-event medians.

    python benchmarks/investigations/bench_train_optim.py --out optim.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import giants
import giants.train.optim as optim
from giants.train.optim import MasterAdamW, matmul_weights


def timeit(fn, reps: int = 20, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def copy_rate() -> float:
    """Device-to-device copy bandwidth in TB/s, bytes read and written (a 2 GiB copy)."""
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / 1e9 / timeit(lambda: y.copy_(x))


def setup(cast: bool, fused_ref: bool):
    model = giants.build(giants.get_config("llama-3.2-1b"), device="cuda", seed=0)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    if fused_ref:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    else:
        opt = MasterAdamW(groups, cast=matmul_weights(model) if cast else [], lr=1e-4, betas=(0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model, opt


def measure(cast: bool, fused: bool) -> dict:
    model, opt = setup(cast, fused)
    n = sum(p.numel() for p in model.parameters())
    grads = [p.grad for p in model.parameters()]
    scale = torch.tensor(1.3, device="cuda")

    def step():
        opt.grad_scale = scale
        opt.step()

    row = {"step_ms": timeit(step), "params": n}
    if cast:
        row["norm_ms"] = timeit(lambda: optim.grad_norm(grads))
        ref = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))
        row["norm_rel_err"] = float(abs(optim.grad_norm(grads).double() - ref) / ref)
        default = optim.BLOCK, optim.NUM_WARPS
        for block, warps in ((512, 4), (1024, 2), (1024, 8), (2048, 4), (4096, 8)):
            optim.BLOCK, optim.NUM_WARPS = block, warps
            row[f"step_ms_block{block}_w{warps}"] = timeit(step)
        optim.BLOCK, optim.NUM_WARPS = default
    else:
        row["norm_ms"] = timeit(lambda: torch.nn.utils.get_total_norm(grads, foreach=True))
    row["bytes_GB"] = 28 * n / 1e9
    row["TB_per_s"] = row["bytes_GB"] / row["step_ms"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    res = {}
    for name, cast, fused in (("fused AdamW, fp32 weights", False, True), ("MasterAdamW, bf16 + masters", True, False),
                              ("MasterAdamW, fp32 weights", False, False)):
        res[name] = measure(cast, fused)
        print(name, json.dumps(res[name]), flush=True)
        torch.cuda.empty_cache()
    res["copy_TB_per_s"] = copy_rate()
    print("copy TB/s", res["copy_TB_per_s"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
