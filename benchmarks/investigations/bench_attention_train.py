"""Causal attention forward + backward at the training benchmark's shape (Llama-3.2-1B: batch 4, 32 query heads,
8 key/value heads, head dim 64, sequence 2048, bf16): SDPA's backends against FlexAttention (compiled, causal
block mask), timed with CUDA events in one process. Outputs and gradients are checked against the cuDNN result.

    python benchmarks/investigations/bench_attention_train.py [--seq 2048 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench_train_optim import timeit as timed


def main() -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    B, T, H, Hkv, D = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    flops_fwd = 4 * B * H * T * T * D / 2  # causal: half the score matrix
    variants = {}
    for name, backend in (("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend, bwd=True):
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            if bwd:
                o.backward(do)
            return o
        variants[name] = run
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
    flex = torch.compile(flex_attention)
    for name, opts in (("flex", None), ("flex 128x64", {"BLOCK_M": 128, "BLOCK_N": 64}),
                       ("flex 128x128", {"BLOCK_M": 128, "BLOCK_N": 128})):
        def run(opts=opts, bwd=True):
            o = flex(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=opts)
            if bwd:
                o.backward(do)
            return o
        variants[name] = run
    results, ref = {}, None
    for name, run in variants.items():
        try:
            for t in (q, k, v):
                t.grad = None
            out = run()
            grads = [t.grad.float() for t in (q, k, v)]
            if ref is None:
                ref = (out.float(), grads)
            err = max(float((a - b).abs().max()) for a, b in zip([out.float()] + grads, [ref[0]] + ref[1]))
            fwd = timed(lambda run=run: run(bwd=False))
            both = timed(lambda run=run: run())
            results[name] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "bwd_ms": both - fwd,
                             "fwd_tflops": flops_fwd / fwd / 1e9, "bwd_tflops": 2.5 * flops_fwd / (both - fwd) / 1e9,
                             "max_abs_err_vs_first": err}
            bwd_tf = 2.5 * flops_fwd / (both - fwd) / 1e9
            print(f"{name:15s} fwd {fwd:6.3f} ms ({flops_fwd / fwd / 1e9:5.0f} TFLOP/s)  fwd+bwd {both:6.3f} ms  "
                  f"bwd {(both - fwd):6.3f} ms ({bwd_tf:5.0f})  err {err:.3g}", flush=True)
        except Exception as e:  # keep the other variants
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(name, results[name]["error"], flush=True)
    print(json.dumps({"shape": vars(args), "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
