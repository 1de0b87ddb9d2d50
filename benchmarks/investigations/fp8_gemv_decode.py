"""Is the batch-1 FP8 GEMV bound by its E4M3 -> fp32 conversions? The block-scaled (128 x 128) one-row GEMV
streams its biggest weight (gate|up, 117 MB) at ~89% of the copy bandwidth where the bf16 GEMV reaches ~96%.
This times, per Llama-3.1-8B weight shape, cold weights in CUDA graphs:

- giants' FP8 GEMV (kernels.gemv, the best of its tiles) and the bf16 GEMV on the same shape;
- "load": the same tiles loaded as int32 words and xor-folded (the streaming ceiling of this kernel shape);
- "int": each byte turned into fp32 bits by shifts (value * 2**-120, no conversion instruction);
- "hfma": two bytes at a time converted to f16x2 (cvt.rn.f16x2.e4m3x2) and multiplied by x in f16x2, one widening
  per word (the MXFP4 hfma decode's idea).

    python benchmarks/investigations/fp8_gemv_decode.py [--out f.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from giants.inference import kernels as tk
from giants.inference.fp8 import FP8Weight, quantize
from giants.inference.kernels.fp8 import FP8_GEMV_CONFIGS

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}
TILES = [(8, 256, 4, 3), (4, 256, 4, 3), (4, 1024, 4, 3), (2, 1024, 4, 3), (1, 1024, 4, 3), (4, 512, 4, 3),
         (2, 2048, 8, 3), (4, 1024, 8, 3), (8, 512, 8, 3)]
TWO_120 = 2.0 ** 120

_HFMA = tl.constexpr("""{
.reg .b16 lo, hi;
.reg .b32 fl, fh, acc;
.reg .f32 a, b;
mov.b32 {lo, hi}, $1;
cvt.rn.f16x2.e4m3x2 fl, lo;
cvt.rn.f16x2.e4m3x2 fh, hi;
mul.rn.f16x2 acc, fl, $2;
fma.rn.f16x2 acc, fh, $3, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 a, lo;
cvt.f32.f16 b, hi;
add.f32 $0, a, b;
}""")


@triton.jit
def _variant_kernel(X, XI, W, S, Y, N, KW, KB, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """W: int32 words (N, KW) of E4M3 bytes; S (N/128, KB) block scales; X fp32 (4 KW,); XI f16 pairs as int32."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, BLOCK_W)
    NBK: tl.constexpr = BLOCK_W // 32
    rows = W + rn.to(tl.int64)[:, None] * KW
    srows = S + (rn // 128).to(tl.int64) * KB
    acc = tl.zeros((BLOCK_N, NBK), tl.float32)
    fold = tl.zeros((BLOCK_N, BLOCK_W), tl.int32)
    for k0 in range(0, KW, BLOCK_W):
        km = k0 + rw < KW
        w = tl.load(rows + (k0 + rw)[None, :], mask=km[None, :], other=0)
        if MODE == 0:
            fold = fold ^ w
        else:
            if MODE == 1:
                u = w.to(tl.uint32, bitcast=True)
                p = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
                for b in tl.static_range(4):
                    t = u >> (8 * b)
                    bits = ((t & 0x7F) << 20) | ((t & 0x80) << 24)
                    xb = tl.load(X + 4 * (k0 + rw) + b, mask=km, other=0.0)
                    p += bits.to(tl.float32, bitcast=True) * xb[None, :]
            else:
                x01 = tl.load(XI + 2 * (k0 + rw), mask=km, other=0)
                x23 = tl.load(XI + 2 * (k0 + rw) + 1, mask=km, other=0)
                p = tl.inline_asm_elementwise(_HFMA, "=r,r,r,r",
                                              [w, tl.broadcast_to(x01[None, :], (BLOCK_N, BLOCK_W)),
                                               tl.broadcast_to(x23[None, :], (BLOCK_N, BLOCK_W))],
                                              dtype=tl.float32, is_pure=True, pack=1)
            part = tl.sum(tl.reshape(p, (BLOCK_N, NBK, 32)), axis=2)
            kb = k0 // 32 + tl.arange(0, NBK)
            acc += part * tl.load(srows[:, None] + kb[None, :], mask=(kb < KB)[None, :], other=0.0)
    if MODE == 0:
        tl.store(Y + rn, tl.sum(fold, axis=1).to(tl.float32))
    elif MODE == 1:
        tl.store(Y + rn, tl.sum(acc, axis=1) * 1.329227995784916e36)
    else:
        tl.store(Y + rn, tl.sum(acc, axis=1))


def _variant(mode: int, x32, xi, q_words, scale, y, bn, bw, nw, ns):
    N, KW = q_words.shape
    _variant_kernel[(triton.cdiv(N, bn),)](x32, xi, q_words, scale, y, N, KW, scale.shape[1], MODE=mode, BLOCK_N=bn,
                                           BLOCK_W=bw, num_warps=nw, num_stages=ns)


def _copy_bw(dev) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = tk.time_ms(lambda i: b.copy_(a), 5)
    return 2 * a.numel() / (t * 1e-3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw_copy = _copy_bw(dev)
    print(f"copy bandwidth {bw_copy:.0f} GB/s", flush=True)
    out: dict = {"copy_gbs": round(bw_copy, 1), "shapes": {}}
    torch.manual_seed(0)
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        w8 = FP8Weight(*quantize(w, (128, 128)), (128, 128))
        x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        ref = (x.float() @ w8.dequantize(torch.float32).t()).squeeze(0)
        row: dict = {}

        def gbs(t_ms: float, nbytes: int) -> float:
            return round(nbytes / (t_ms * 1e-3) / 1e9, 1)

        fp8_bytes = N * K + w8.scale.numel() * 4
        copies8 = [w8] + [FP8Weight(w8.q.clone(), w8.scale.clone(), (128, 128))
                          for _ in range(256 // (N * K >> 20) + 1)]
        c8, t8 = tk.pick_config_timed(lambda i, x=x, cs=copies8, **c: tk.gemv(x, cs[i % len(cs)], **c),
                                      FP8_GEMV_CONFIGS)
        y = tk.gemv(x, w8, **c8).float().squeeze(0)
        row["giants_fp8"] = dict(us=round(t8 * 1e3, 2), gbs=gbs(t8, fp8_bytes), tile=c8,
                                 err=float((y - ref).abs().max() / ref.abs().max()))
        copies16 = tk.cold_copies(w)
        c16, t16 = tk.pick_config_timed(lambda i, x=x, cs=copies16, **c: tk.gemv(x, cs[i % len(cs)], **c),
                                        tk.GEMV_CONFIGS)
        row["giants_bf16"] = dict(us=round(t16 * 1e3, 2), gbs=gbs(t16, 2 * N * K), tile=c16)
        words = [c.q.view(torch.int32) for c in copies8]
        scales = [c.scale for c in copies8]
        x32 = x.float().squeeze(0).contiguous()
        xi = x.to(torch.float16).squeeze(0).contiguous().view(torch.int32)
        yv = torch.empty(N, device=dev, dtype=torch.float32)
        for mode, label in ((0, "load"), (1, "int"), (2, "hfma")):
            res = {}
            for bn, bwd, nw, ns in TILES:
                try:
                    args = (mode, x32, xi, words, scales, yv, bn, bwd, nw, ns)
                    t = tk.time_ms(lambda i, a=args: _variant(a[0], a[1], a[2], a[3][i % len(a[3])],
                                                              a[4][i % len(a[3])], *a[5:]), 20)
                    _variant(mode, x32, xi, words[0], scales[0], yv, bn, bwd, nw, ns)
                    err = float((yv - ref).abs().max() / ref.abs().max()) if mode else None
                    res[f"{bn}x{4 * bwd}w{nw}s{ns}"] = dict(us=round(t * 1e3, 2), gbs=gbs(t, fp8_bytes), err=err)
                except Exception as e:  # noqa: BLE001
                    torch.cuda.synchronize()
                    res[f"{bn}x{4 * bwd}w{nw}s{ns}"] = repr(e)[:120]
            ok = {k: v for k, v in res.items() if isinstance(v, dict)}
            bestk = min(ok, key=lambda k: ok[k]["us"]) if ok else None
            row[label] = dict(best=bestk, **(ok[bestk] if bestk else {}), all=res)
        for v in row.values():
            if isinstance(v, dict) and "gbs" in v:
                v["of_copy"] = round(v["gbs"] / bw_copy, 3)
        out["shapes"][name] = row
        print(name, json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "all"} for k, v in row.items()}),
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
