"""The MXFP4 expert GEMV at gpt-oss-120b batch-1 decode shapes (128 experts, 4 routed pairs, K = 2880, bf16 x):
the legacy byte-wise kernel against the word-wise one ("bits": each decode of MXFP4_DECODES over the tiles of
MXFP4_GEMV_CONFIGS), as microseconds a call and effective GB/s of weight bytes read (blocks + scales of the 4
experts used).

    python benchmarks/bench_mxfp4_gemv.py --json mxfp4_gemv.json
    python benchmarks/bench_mxfp4_gemv.py --decodes triton,ptx_e4m3 --configs 0,1,8 --reps 64

Cold weights: each call of a timed sequence reads a different set of 4 experts (32 disjoint sets of the 128: about
1 GB of gate_up weights, far past the 50 MB L2), as decode does. Times are CUDA-graph replays of --reps calls
(giants.inference.kernels.time_ms); the hfma decode reads x already in f16 lanes, as in decode (the kernel before
hands them on), its lanes kernel untimed. Every configuration's output is checked against the legacy kernel's
(max |diff| / max |y|); one that disagrees is marked WRONG and never chosen best. Compilation dominates the run (one
kernel per decode and tile, shared by both shapes); past --budget-s no new configuration is started (what was
measured is still printed and saved).
"""

from __future__ import annotations

import argparse
import json
import time

SHAPES = {"gate_up": (5760, 2880), "down": (2880, 2880)}  # (N, K) of gpt-oss-120b's expert matrices
# "glu": the gate|up matrix through the GLU epilogue (what decode runs), timed against gate_up + the GLU kernel
EXTRA = {"glu": (5760, 2880)}
E, P, LAYERS = 128, 4, 36


class Shape:
    """One expert matrix shape: E experts of random packed weights (gpt-oss-like scales), a bias, and x."""

    def __init__(self, name: str, reps: int, g) -> None:
        import torch

        dev = torch.device("cuda")
        self.name, self.reps = name, reps
        self.N, self.K = N, K = {**SHAPES, **EXTRA}[name]
        self.glu = dict(glu="clamped_swiglu", alpha=1.702, limit=7.0) if name == "glu" else {}
        self.sets = [torch.arange(P, device=dev) + P * i for i in range(E // P)]  # 32 disjoint expert sets
        self.blocks = torch.randint(0, 256, (E, N, K // 2), device=dev, dtype=torch.uint8, generator=g)
        self.scales = torch.randint(117, 121, (E, N, K // 32), device=dev, dtype=torch.uint8, generator=g)
        self.bias = torch.randn(E, N, device=dev, generator=g).to(torch.bfloat16)
        if name != "down":  # one token's hidden state, read by every pair
            self.x = torch.randn(1, K, device=dev, generator=g).to(torch.bfloat16)
            self.rows = torch.zeros(P, dtype=torch.long, device=dev)
        else:  # each pair's own activation row
            self.x = torch.randn(P, K, device=dev, generator=g).to(torch.bfloat16)
            self.rows = torch.arange(P, device=dev)
        self.out = torch.empty(P, N // 2 if self.glu else N, device=dev, dtype=torch.bfloat16)
        self.mb = P * N * (K // 2 + K // 32) / 1e6  # weight bytes a call reads
        if self.glu:
            from giants.inference import kernels as tk

            self.ref = tk.glu(self.call(0, impl="legacy", out=None, glu_off=True), "clamped_swiglu").float()
        else:
            self.ref = self.call(0, impl="legacy", out=None).float()
        self.results: list[dict] = []

    def call(self, i: int, out="self", glu_off: bool = False, **kw):
        from giants.inference import kernels as tk
        from giants.inference.kernels import mxfp4 as kmx

        glu = {} if glu_off else self.glu
        if glu and kw.get("impl") == "legacy":  # the unfused pair: legacy gate|up GEMV, then the GLU kernel
            return tk.glu(self.call(i, out=None, glu_off=True, **kw), "clamped_swiglu", out=self.out)
        x = self.x
        if kw.get("decode") == "hfma":  # in decode the kernel before hands on x in f16 lanes: made once, untimed
            if not hasattr(self, "lanes"):
                self.lanes = kmx.mxfp4_lanes(self.x)
            x = self.lanes
        return kmx.mxfp4_gemv(x, self.rows, self.sets[i % len(self.sets)], self.blocks, self.scales, self.bias,
                              out=self.out if out == "self" else out, **kw, **glu)

    def measure(self, label: str, **kw) -> dict:
        import torch

        from giants.inference import kernels as tk

        try:
            y = self.call(0, out=None, **kw).float()
            err = float((y - self.ref).abs().max() / self.ref.abs().max())
            us = tk.time_ms(lambda i: self.call(i, **kw), self.reps) * 1e3
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile here is reported, not fatal
            torch.cuda.synchronize()
            r = {"label": label, **kw, "error": repr(e)[:300]}
            print(f"  {self.name:<7} {label:<52} ERROR {r['error'][:120]}", flush=True)
        else:
            ok = err < 2e-2  # bf16 outputs of fp32 sums in different orders agree far closer than this
            r = {"label": label, **kw, "us": round(us, 2), "GBs": round(self.mb / us * 1e3, 1), "rel_err": err,
                 "ok": ok}
            print(f"  {self.name:<7} {label:<52} {us:8.2f} us {r['GBs']:8.1f} GB/s  err {err:.1e}"
                  f"{'' if ok else '  WRONG'}", flush=True)
        self.results.append(r)
        return r


def _label(c: dict) -> str:
    return (f"bn={c['block_n']} bk={c['block_k']} w={c['num_warps']} s={c['num_stages']}"
            + _pf(c.get("prefetch")))


def _pf(p) -> str:
    """prefetch in a label: " pf" (the next tile's words), " pf2" (and x lanes), " pf3" (words two tiles ahead)."""
    return "" if not p else " pf" if p is True or p == 1 else f" pf{int(p)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    ap.add_argument("--decodes", default=None,
                    help="comma-separated subset of the decodes to sweep (default: all of MXFP4_DECODES)")
    ap.add_argument("--configs", default=None,
                    help="comma-separated indices into MXFP4_GEMV_CONFIGS to sweep (default: all)")
    ap.add_argument("--shapes", default="gate_up,down,glu",
                    help="comma-separated subset of gate_up,down,glu (glu: gate_up with the activation fused; its "
                         "'legacy' row is the legacy gate_up GEMV then the GLU kernel)")
    ap.add_argument("--reps", type=int, default=32, help="calls a CUDA graph replays (rotating expert sets)")
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="start no new configuration after this many seconds (default 100)")
    a = ap.parse_args()

    import torch
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("bench_mxfp4_gemv.py needs a CUDA GPU")
    from giants.inference import kernels as tk
    from giants.inference.kernels import mxfp4 as kmx

    t_start = time.time()
    decodes = a.decodes.split(",") if a.decodes else list(kmx.MXFP4_DECODES)
    bad = [d for d in decodes if d not in kmx.MXFP4_DECODES]
    if bad:
        raise SystemExit(f"unknown decode(s) {bad}; choose from {kmx.MXFP4_DECODES}")
    idx = [int(i) for i in a.configs.split(",")] if a.configs else list(range(len(kmx.MXFP4_GEMV_CONFIGS)))
    configs = [kmx.MXFP4_GEMV_CONFIGS[i] for i in idx]
    names = a.shapes.split(",")
    if any(n not in SHAPES and n not in EXTRA for n in names):
        raise SystemExit(f"--shapes: choose from {list(SHAPES) + list(EXTRA)}")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "pdl": bool(tk.PDL_ON), "E": E, "P": P, "reps": a.reps, "default": dict(kmx.MXFP4_GEMV_DEFAULT),
           "shapes": {}}
    print(f"{res['device']}  torch {res['torch']}  triton {res['triton']}  PDL {res['pdl']}  E={E} P={P} "
          f"reps={a.reps}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [Shape(n, a.reps, g) for n in names]
    for s in shapes:
        print(f"{s.name}: N={s.N} K={s.K}, {s.mb:.1f} MB of weights a call", flush=True)
    legacy = {s.name: s.measure("legacy", impl="legacy") for s in shapes}
    dflt = {}
    for s in shapes:  # what a call leaving the tile unset runs for bf16 x (the decode resolved, then its tile)
        d = (kmx.MXFP4_GEMV_GLU_DEFAULT if s.glu else kmx.MXFP4_GEMV_DEFAULT)["decode"]
        d = kmx._auto_decode(torch.device("cuda"), torch.bfloat16) if d == "auto" else d
        dflt[s.name] = dict(kmx._default_tile(bool(s.glu), d), decode=d)
    default = {s.name: s.measure("bits default " + _label(dflt[s.name]) + " " + dflt[s.name]["decode"], impl="bits")
               for s in shapes}
    budget_hit = False
    for decode in decodes:
        for c in configs:
            if time.time() - t_start > a.budget_s:
                budget_hit = True
                break
            for s in shapes:
                s.measure(f"bits {decode:<8} " + _label(c), impl="bits", decode=decode, **c)
    print("summary:", flush=True)
    for s in shapes:
        good = [r for r in s.results if r.get("ok") and r.get("impl") == "bits"]
        best = min(good, key=lambda r: r["us"]) if good else None
        lg = legacy[s.name]
        if best is not None:
            vs = f", {lg['us'] / best['us']:.2f}x legacy ({lg['us']:.2f} us)" if "us" in lg else ""
            print(f"  {s.name:<7} best: {best['label']}  {best['us']:.2f} us, {best['GBs']:.0f} GB/s{vs}", flush=True)
        else:
            print(f"  {s.name:<7} no working bits configuration", flush=True)
        res["shapes"][s.name] = {"N": s.N, "K": s.K, "MB": round(s.mb, 2), "legacy": lg, "default": default[s.name],
                                 "best": best, "results": s.results}
    if all(n in res["shapes"] for n in SHAPES):
        per_tok = {}
        for k in ("legacy", "default", "best"):
            rs = [res["shapes"][n][k] for n in (("glu", "down") if "glu" in res["shapes"] else SHAPES)]
            if all(r and "us" in r for r in rs):
                per_tok[k] = round(LAYERS * sum(r["us"] for r in rs) / 1e3, 3)
        res["moe_gemv_ms_per_token"] = per_tok  # 36 layers x (gate_up + down): the expert GEMVs alone
        print(f"  expert GEMVs a token (36 layers x ({'glu' if 'glu' in res['shapes'] else 'gate_up'} + down)): "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in per_tok.items()), flush=True)
    if budget_hit:
        print(f"  (stopped at --budget-s {a.budget_s:.0f}: not every configuration was measured)", flush=True)
    res["budget_hit"] = budget_hit
    res["wall_s"] = round(time.time() - t_start, 1)
    print(f"done in {res['wall_s']} s", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.json}", flush=True)


if __name__ == "__main__":
    main()
