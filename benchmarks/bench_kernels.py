"""Kernel-level measurements behind the decode and training speed work (CUDA events, one run):

- one-row GEMVs at the Llama-3.1-8B and gpt-oss-20b decode shapes: cuBLAS, the Triton GEMV and the
  split-K GEMV, as GB/s of weight read;
- gpt-oss-20b expert GEMVs (4 routed pairs): the expert GEMV against the split-K one;
- SDPA fwd+bwd at the Llama-3.2-1B training shape for each backend;
- AdamW (fused) with clip_grad_norm_ against the clip folded into the fused step as grad_scale.

    python benchmarks/bench_kernels.py --out kernels.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from giants.inference import kernels as tk


def best(fn, configs):
    cfg, ms = tk.pick_config_timed(fn, configs, reps=50)
    return cfg, ms * 1e3


def event_ms(fn, reps: int) -> float:
    """Milliseconds per call by CUDA events around eager calls (for millisecond-long work)."""
    fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def gemvs(dev) -> dict:
    out = {}
    shapes = {"llama-qkv": (6144, 4096), "llama-o": (4096, 4096), "llama-gate-up": (28672, 4096),
              "llama-down": (4096, 14336), "oss-qkv": (5120, 2880), "oss-o": (2880, 4096)}
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, dtype=torch.bfloat16, device=dev)
        ws = tk.cold_copies(w)
        x = torch.randn(1, K, dtype=torch.bfloat16, device=dev)
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        mb = w.numel() * 2 / 1e6
        t_cublas = tk.time_ms(lambda i: F.linear(x, ws[i % len(ws)]), 50) * 1e3  # noqa: B023
        _, t_gemv = best(lambda i, **c: tk.gemv(x, ws[i % len(ws)], None, **c), tk.GEMV_CONFIGS)  # noqa: B023
        cfg, t_split = best(lambda i, **c: tk.splitk_gemv(x, zero, zero, ws[i % len(ws)], None, **c),  # noqa: B023
                            tk.SPLITK_CONFIGS)
        ref = F.linear(x.float(), w.float())
        c = dict(cfg)
        got = tk.splitk_gemv(x, zero, zero, w, None, **c).view(c["split"], N).sum(0)
        err = float((got - ref[0]).abs().max() / ref.abs().max())
        out[name] = {"MB": round(mb, 1), "cublas_us": round(t_cublas, 1), "gemv_us": round(t_gemv, 1),
                     "splitk_us": round(t_split, 1), "splitk_cfg": cfg, "splitk_rel_err": err,
                     "GBs": {k: round(mb / v * 1e3) for k, v in
                             (("cublas", t_cublas), ("gemv", t_gemv), ("splitk", t_split))}}
        print(name, out[name], flush=True)
    E, D, Fi, P = 32, 2880, 2880, 4
    x = torch.randn(1, D, dtype=torch.bfloat16, device=dev)
    rows0 = torch.zeros(P, dtype=torch.long, device=dev)
    pid = torch.arange(P, device=dev)
    experts = [(pid * 7 + P * i) % E for i in range(8)]
    w_gu = torch.randn(E, 2 * Fi, D, dtype=torch.bfloat16, device=dev)
    w_dn = torch.randn(E, D, Fi, dtype=torch.bfloat16, device=dev)
    gu = torch.randn(P, 2 * Fi, dtype=torch.bfloat16, device=dev)
    g1 = gu[:, :Fi].contiguous()
    for name, fn_e, fn_s, mb in (
        ("oss-expert-gate-up", lambda i, **c: tk.expert_gemv(x, rows0, experts[i % 8], w_gu, None, **c),
         lambda i, **c: tk.splitk_gemv(x, rows0, experts[i % 8], w_gu, None, **c), P * 2 * Fi * D * 2 / 1e6),
        ("oss-expert-down-act", lambda i, **c: tk.expert_gemv(gu, pid, experts[i % 8], w_dn, None,
                                                              activation="clamped_swiglu", **c),
         lambda i, **c: tk.splitk_gemv(gu, pid, experts[i % 8], w_dn, None, activation="clamped_swiglu", **c),
         P * Fi * D * 2 / 1e6),
        ("oss-expert-down-plain", lambda i, **c: tk.expert_gemv(g1, pid, experts[i % 8], w_dn, None, **c),
         lambda i, **c: tk.splitk_gemv(g1, pid, experts[i % 8], w_dn, None, **c), P * Fi * D * 2 / 1e6),
    ):
        ce, te = best(fn_e, tk.EXPERT_GEMV_CONFIGS)
        cs, ts = best(fn_s, tk.SPLITK_CONFIGS)
        out[name] = {"MB": round(mb, 1), "expert_gemv_us": round(te, 1), "expert_cfg": ce, "splitk_us": round(ts, 1),
                     "splitk_cfg": cs, "GBs": {"expert_gemv": round(mb / te * 1e3), "splitk": round(mb / ts * 1e3)}}
        print(name, out[name], flush=True)
    return out


def sdpa(dev) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, Hkv, T, D = 4, 32, 8, 2048, 64
    q = torch.randn(B, H, T, D, dtype=torch.bfloat16, device=dev, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, dtype=torch.bfloat16, device=dev, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, dtype=torch.bfloat16, device=dev, requires_grad=True)
    go = torch.randn(B, H, T, D, dtype=torch.bfloat16, device=dev)
    flops = 3.5 * 4 * B * H * T * T * D / 2  # causal fwd + bwd (bwd 2.5x fwd)
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for gqa in (True, False):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1))

            def step():
                with sdpa_kernel([backend]):  # noqa: B023
                    o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)  # noqa: B023
                o.backward(go, retain_graph=False)

            key = f"{name}{'-gqa' if gqa else '-repeated-kv'}"
            try:
                ms = event_ms(step, 20)
                out[key] = {"ms_fwd_bwd": round(ms, 3), "TFLOPs": round(flops / ms / 1e9, 0)}
            except Exception as e:  # noqa: BLE001
                out[key] = {"error": repr(e)[:200]}
            print("sdpa", key, out[key], flush=True)
    return out


def adamw(dev) -> dict:
    shapes = [(128256, 2048)] + [s for _ in range(16) for s in ((2048, 2048), (512, 2048), (512, 2048),
                                                                 (2048, 2048), (8192, 2048), (8192, 2048),
                                                                 (2048, 8192), (2048,), (2048,))] + [(2048,)]
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)

    def clip_then_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def folded():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        opt.grad_scale = torch.clamp(norm / 1.0, min=1.0)
        opt.step()
        opt.grad_scale = None

    r = {"params": n, "ideal_MB": n * 4 * 8 / 1e6}
    for name, fn in (("step_only", opt.step), ("clip_grad_norm_+step", clip_then_step), ("folded", folded)):
        ms = event_ms(fn, 10)
        r[name + "_ms"] = round(ms, 3)
    r["ideal_ms_at_4.2TBs"] = round(n * 4 * 8 / 4.2e12 * 1e3, 3)
    print("adamw", r, flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="gemv,sdpa,adamw")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for part in a.parts.split(","):
        res[part] = {"gemv": gemvs, "sdpa": sdpa, "adamw": adamw}[part](dev)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
