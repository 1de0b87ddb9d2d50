"""The word-wise MXFP4 expert GEMV (giants.inference.kernels.mxfp4, impl="bits"): its bit decodes checked over every
16-bit pattern in numpy, and the kernel under TRITON_INTERPRET on the CPU (fresh processes, two at once: the
interpreter is chosen when triton is first imported) against dequantize_mxfp4 + a float64 matmul, against the legacy
byte-wise kernel, and inside MXFP4MoE._forward_packed. tests/test_cuda_mxfp4.py runs the same comparisons on a GPU at
gpt-oss-120b shapes, the inline-PTX decodes included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from giants.inference.mxfp4 import FP4_VALUES
from subprocess_utils import run_concurrently

FP4 = np.array(FP4_VALUES, dtype=np.float64)
M16 = 0x0E000E00  # fp16 lanes: exponent bits 1..0 and the top mantissa bit of both halves
S16 = 0x80008000  # fp16 lanes: both sign bits


def _words() -> np.ndarray:
    """uint32 words whose low 16 bits (bytes 0, 1) run over all 65536 patterns and whose high 16 bits (bytes 2, 3)
    do too (a permutation of them), so every byte pair is decoded in both fp16 lanes."""
    b = np.arange(65536, dtype=np.uint32)
    return b | (((b * 40503) & 0xFFFF) << 16)  # 40503 is odd: a bijection of the 16-bit values


def _nibbles(w: np.ndarray) -> list[np.ndarray]:
    return [(w >> (4 * i)) & 15 for i in range(8)]  # element i of the word (byte i // 2, low nibble first)


def _fp16_lanes(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = (v & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = (v >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
    return lo, hi


def test_fp16_lane_decode_of_every_byte_pair():
    """_fp4x8's DECODE 0/1 shifts and masks (uint32, logical shifts): each pair of fp16 lanes reads E2M1 * 2**-14
    exactly, signs (and -0) included, for elements (0, 4), (1, 5), (2, 6), (3, 7) of the word."""
    u = _words()
    nib = _nibbles(u)
    pairs = {(0, 4): ((u << 9) & M16) | ((u << 12) & S16),
             (1, 5): ((u << 5) & M16) | ((u << 8) & S16),
             (2, 6): ((u << 1) & M16) | ((u << 4) & S16),
             (3, 7): ((u >> 3) & M16) | (u & S16)}
    for (a, b), v in pairs.items():
        lo, hi = _fp16_lanes(v.astype(np.uint32))
        for got, i in ((lo, a), (hi, b)):
            assert np.array_equal(got, FP4[nib[i]] * 2.0 ** -14), i
            assert np.array_equal(np.signbit(got), nib[i] >= 8), i
    # an arithmetic right shift would be as good here: the bits it fills in are masked away
    s = u.view(np.int32)
    assert np.array_equal(((s >> 3) & M16).view(np.uint32), (u >> 3) & M16)


def _run_ptx_f16(text: str, w: np.ndarray) -> dict[int, np.ndarray]:
    """A numpy reading of the fp16 decode's inline PTX (only the instructions it uses), input $8 = w: the outputs
    $0..$7 as float64."""
    regs: dict[str, np.ndarray] = {"$8": w}
    out: dict[int, np.ndarray] = {}

    def val(x: str) -> np.ndarray:
        return regs[x] if x in regs else np.uint32(int(x, 0))

    for line in text.split("\n"):
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(" ", 1)
        if op == "mov.b32":
            (lo, hi), src = args.split("}, ")[0].strip("{").split(", "), args.split("}, ")[1]
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        d, a, *b = [x.strip() for x in args.split(",")]
        if op == "cvt.f32.f16":
            out[int(d[1:])] = regs[a].astype(np.uint16).view(np.float16).astype(np.float64)
        elif op in ("shl.b32", "shr.b32"):
            regs[d] = (val(a) << int(b[0])) & 0xFFFFFFFF if op == "shl.b32" else val(a) >> int(b[0])
        elif op in ("and.b32", "or.b32"):
            regs[d] = (val(a) & val(b[0])) if op == "and.b32" else (val(a) | val(b[0]))
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    return out


def test_inline_ptx_f16_decode_of_every_byte_pair():
    """DECODE 1's PTX text (generated from the same lanes as the pure-Triton decode), read instruction by
    instruction in numpy: output $i is element i of the word, E2M1 * 2**-14, for every byte pair."""
    from giants.inference.kernels import mxfp4 as kmx

    u = _words()
    nib = _nibbles(u)
    out = _run_ptx_f16(getattr(kmx._PTX_F16, "value", kmx._PTX_F16), u.astype(np.uint64))
    assert sorted(out) == list(range(8))
    for i in range(8):
        assert np.array_equal(out[i], FP4[nib[i]] * 2.0 ** -14), i
        assert np.array_equal(np.signbit(out[i]), nib[i] >= 8), i


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PTX prmt.b32 (default mode): byte i of the result is byte c[4i+2:4i] of {b, a} (a: bytes 0-3), or with
    c's bit 4i+3 set the sign of that byte replicated."""
    a, b, c = np.broadcast_arrays(*(np.asarray(v, dtype=np.uint64) & np.uint64(0xFFFFFFFF) for v in (a, b, c)))
    pool = a | (b << np.uint64(32))
    out = np.zeros(a.shape, dtype=np.uint64)
    for i in range(4):
        sel = (c >> np.uint64(4 * i)) & np.uint64(15)
        byte = (pool >> (np.uint64(8) * (sel & np.uint64(7)))) & np.uint64(0xFF)
        sign = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0)).astype(np.uint64)
        byte = np.where(sel & np.uint64(8), sign, byte).astype(np.uint64)
        out |= byte << np.uint64(8 * i)
    return out


def test_inline_ptx_prmt_decode_of_every_byte_pair():
    """DECODE 3's PTX text (no conversion instruction: a byte-permute table lookup), read instruction by instruction
    in numpy: output $i, read as fp32 bits, is element i of the word times 2**-2, signs (and -0) included, for every
    byte pair; the table itself is the fp32 exponent and top mantissa bit of E2M1 / 4."""
    from giants.inference.kernels import mxfp4 as kmx

    lut = np.array(kmx._PRMT_LUT, dtype=np.uint32)
    assert np.array_equal((lut << 22).view(np.float32).astype(np.float64), FP4[:8] / 4)
    u = _words()
    nib = _nibbles(u)
    regs: dict[str, np.ndarray] = {"$8": u.astype(np.uint64)}

    def val(x: str) -> np.ndarray:
        return regs[x] if x in regs else np.uint64(int(x, 0))

    for line in getattr(kmx._PTX_PRMT, "value", kmx._PTX_PRMT).split("\n"):
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(" ", 1)
        d, *src = [x.strip() for x in args.split(",")]
        if op == "mov.b32":
            regs[d] = val(src[0])
        elif op == "prmt.b32":
            regs[d] = _prmt(*(val(x) for x in src))
        elif op in ("shl.b32", "shr.b32"):
            n = np.uint64(int(src[1]))
            regs[d] = (val(src[0]) << n) & np.uint64(0xFFFFFFFF) if op == "shl.b32" else val(src[0]) >> n
        elif op in ("and.b32", "or.b32"):
            regs[d] = (val(src[0]) & val(src[1])) if op == "and.b32" else (val(src[0]) | val(src[1]))
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    for i in range(8):
        got = (regs[f"${i}"] & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32).astype(np.float64)
        assert np.array_equal(got, FP4[nib[i]] / 4), i
        assert np.array_equal(np.signbit(got), nib[i] >= 8), i


def test_e4m3_byte_decode_of_every_byte_pair():
    """_fp4x8's DECODE 2 (PTX, GPU only): low nibbles -> ((u << 2) & 0x1C..) | ((u << 4) & 0x80..), high nibbles
    -> ((u >> 2) & 0x1C..) | (u & 0x80..); each byte then reads, as FP8 E4M3, E2M1 * 2**-6 exactly."""
    u = _words()
    nib = _nibbles(u)
    lo = ((u << 2) & 0x1C1C1C1C) | ((u << 4) & 0x80808080)  # bytes: elements 0, 2, 4, 6
    hi = ((u >> 2) & 0x1C1C1C1C) | (u & 0x80808080)  # bytes: elements 1, 3, 5, 7

    def e4m3(v):
        return torch.from_numpy(v.astype("<u4").view(np.uint8).copy()).view(torch.float8_e4m3fn).double().view(
            -1, 4).numpy()

    for v, first in ((lo, 0), (hi, 1)):
        got = e4m3(v)
        for byte in range(4):
            i = first + 2 * byte
            assert np.array_equal(got[:, byte], FP4[nib[i]] * 2.0 ** -6), i
            assert np.array_equal(np.signbit(got[:, byte]), nib[i] >= 8), i


# ---- the kernel under the interpreter ------------------------------------------------------------------------------
_SCRIPT = r'''
import os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
from giants.inference import kernels as tk
from giants.inference.kernels import mxfp4 as kmx
from giants.inference.mxfp4 import dequantize_mxfp4

torch.manual_seed(0)


def packed(E, N, K, lo=110, hi=140, g=None):
    """Random blocks with every byte value (so all 16 nibbles in both positions) in each expert, and scales."""
    blocks = torch.randint(0, 256, (E, N, K // 2), dtype=torch.int32, generator=g).to(torch.uint8)
    flat = blocks.view(E, -1)
    flat[:, :256] = torch.arange(256, dtype=torch.uint8)
    scales = torch.randint(lo, hi, (E, N, K // 32), dtype=torch.int32, generator=g).to(torch.uint8)
    return blocks, scales


def reference(x, rows, ex, blocks, scales, bias):
    """float64: the exact E2M1 values (dequantize_mxfp4 at scale 2**0) times 2**(s - 127), per (x row, expert) pair;
    also sum |w x| per output, the scale of the fp32 accumulation error."""
    vals = dequantize_mxfp4(blocks, torch.full_like(scales, 127), torch.float64)
    w = vals * torch.exp2(scales.double() - 127).repeat_interleave(32, -1)
    xs = x.double()
    ref = torch.stack([w[e] @ xs[r] for r, e in zip(rows.tolist(), ex.tolist())])
    mag = torch.stack([w[e].abs() @ xs[r].abs() for r, e in zip(rows.tolist(), ex.tolist())])
    if bias is not None:
        b = bias.double()[ex]
        ref, mag = ref + b, mag + b.abs()
    return ref, mag


def check(y, ref, mag, what, rtol=2e-6):
    """fp32 accumulation: |err| <= rtol * sum |w x|; a bf16 output also rounds (an ulp at most, 2**-7 relative:
    the interpreter may truncate)."""
    tol = rtol * mag + (2.0 ** -7 * ref.abs() if y.dtype == torch.bfloat16 else 0) + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), (what, float((err / tol).max()), y[:2, :6], ref[:2, :6])


def case_shapes():
    """K = 96, 160, 832 (tails of 1, 3, 10 blocks past the tile; 832 = 26 blocks leaves the same tails as gpt-oss's
    2880 = 90 blocks: 10 past 512-wide tiles, 2 past 256-wide ones, at a third of the interpreter's time), N not a
    multiple of block_n, several experts and x rows (repeated, out of order), with and without bias, fp32 and bf16
    x, several tiles and prefetch."""
    g = torch.Generator().manual_seed(1)
    for K, N, cfgs in ((96, 20, [dict(block_n=8, block_k=64), dict(block_n=16, block_k=32, prefetch=True)]),
                       (160, 24, [dict(block_n=8, block_k=128), dict(block_n=4, block_k=64, prefetch=True)]),
                       (832, 12, [dict(block_n=8, block_k=512), dict(block_n=8, block_k=256, prefetch=True)])):
        E = 4
        blocks, scales = packed(E, N, K, g=g)
        rows, ex = torch.tensor([2, 0, 1, 2, 0]), torch.tensor([3, 1, 0, 3, 2])
        for xdt in (torch.float32, torch.bfloat16):
            x = torch.randn(3, K, generator=g).to(xdt)
            for bias in (None, torch.randn(E, N, generator=g)):
                ref, mag = reference(x, rows, ex, blocks, scales, bias)
                for c in cfgs:
                    out = torch.full((5, N), float("nan"), dtype=xdt)
                    assert tk.mxfp4_gemv(x, rows, ex, blocks, scales, bias, out=out, **c) is out
                    check(out, ref, mag, (K, N, xdt, bias is not None, c))
                y = tk.mxfp4_gemv(x, rows, ex, blocks, scales, bias)  # the default config, a new output
                assert y.dtype == xdt and y.shape == (5, N)
                check(y, ref, mag, (K, N, xdt, bias is not None, "default"))


def case_extreme_scales():
    """E8M0 exponents from 1 (2**-126) to 254 (2**127): pair i reads expert i, all of whose blocks have scale s_i,
    with x row i scaled by 2**t_i so the result is O(2**+-30): every exponent is applied exactly."""
    K, N = 96, 8
    ss = [1, 2, 13, 14, 15, 64, 100, 127, 150, 200, 240, 241, 250, 253, 254]
    P = len(ss)
    blocks, _ = packed(P, N, K)
    scales = torch.tensor(ss, dtype=torch.uint8)[:, None, None].expand(P, N, K // 32).contiguous()
    t = torch.tensor([min(100, max(-100, 127 - s)) for s in ss], dtype=torch.float64)
    x = torch.randn(P, K, dtype=torch.float64) * torch.exp2(t)[:, None]
    rows = ex = torch.arange(P)
    for xdt in (torch.float32, torch.bfloat16):
        xx = x.to(xdt)
        ref, mag = reference(xx, rows, ex, blocks, scales, None)
        for c in (dict(block_n=8, block_k=64), dict(block_n=4, block_k=32, prefetch=True)):
            y = tk.mxfp4_gemv(xx, rows, ex, blocks, scales, None, out=torch.empty(P, N), **c)
            check(y, ref, mag, (xdt, c))
        y = tk.mxfp4_gemv(xx, rows, ex, blocks, scales, None, out=torch.empty(P, N), impl="legacy")
        check(y, ref, mag, "legacy")


def case_bits_equals_legacy():
    """The two kernels (different sum orders) agree to fp32 rounding, gpt-oss-like scales, K = 2880."""
    K, N, E = 2880, 24, 5
    blocks, scales = packed(E, N, K, lo=115, hi=125)
    rows, ex = torch.tensor([0, 0, 0, 0]), torch.tensor([4, 1, 2, 0])
    bias = torch.randn(E, N)
    for xdt in (torch.float32, torch.bfloat16):
        x = torch.randn(1, K).to(xdt)
        _, mag = reference(x, rows, ex, blocks, scales, bias)
        a = tk.mxfp4_gemv(x, rows, ex, blocks, scales, bias, out=torch.empty(4, N), impl="legacy")
        b = tk.mxfp4_gemv(x, rows, ex, blocks, scales, bias, out=torch.empty(4, N), impl="bits")
        assert bool(((a.double() - b.double()).abs() <= 4e-6 * mag).all()), (a, b)
        assert kmx.MXFP4_GEMV_IMPL == "bits"


def case_forward_packed():
    """MXFP4MoE._forward_packed (the CUDA path, here interpreted) against its dequantize-each-expert CPU path."""
    import giants
    from giants.inference.mxfp4 import MXFP4MoE

    cfg = giants.get_config("tiny-gpt-oss")
    moe_layer = MXFP4MoE(cfg)
    moe_layer.randomize(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in (moe_layer.b_gate_up, moe_layer.b_down):
            if p is not None:
                p.normal_(0, 0.1)
        x = torch.randn(1, 3, cfg.d_model)
        want, logits = moe_layer(x)  # CPU: the dequantized path
        _, weights, idx = moe_layer.route(x.view(-1, cfg.d_model))
        got = moe_layer._forward_packed(x.view(-1, cfg.d_model), weights, idx).view_as(want)
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)


def case_glu():
    """glu=...: the gated activation in the epilogue (half the tile gate rows, half the up rows of the same outputs)
    equals the plain GEMV over [gate; up] then the GLU kernel, exactly in fp32 (same per-row sums, same _act), and
    within a bf16 ulp in bf16; F not a multiple of the half tile, K not of the K step, bias, every activation, several
    tiles (F = 9: a partial last tile at half tiles of 4 and 2 rows, and half the interpreted programs of F = 20)."""
    g = torch.Generator().manual_seed(5)
    E, F, K = 3, 9, 96
    blocks, scales = packed(E, 2 * F, K, lo=118, hi=128, g=g)
    rows, ex = torch.tensor([1, 0, 1]), torch.tensor([2, 0, 1])
    b = torch.randn(E, 2 * F, generator=g)
    for xdt, bias in ((torch.float32, None), (torch.float32, b), (torch.bfloat16, b)):
        x = torch.randn(2, K, generator=g).to(xdt)
        for act, c in (("silu_glu", dict(block_n=8, block_k=64)),
                       ("gelu_tanh_glu", dict(block_n=4, block_k=128, prefetch=True)),
                       ("clamped_swiglu", dict(block_n=2, block_k=64))):
            gu = tk.mxfp4_gemv(x, rows, ex, blocks, scales, bias, **c)
            want = tk.glu(gu, act, 1.702, 7.0)
            got = tk.mxfp4_gemv(x, rows, ex, blocks, scales, bias, glu=act, alpha=1.702, limit=7.0, **c)
            assert got.shape == (3, F) and got.dtype == xdt
            if xdt == torch.float32:
                assert torch.equal(got, want), (act, c, (got - want).abs().max())
            else:
                torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
    for bad, msg in ((dict(glu="relu"), "glu must be"), (dict(glu="silu_glu", block_n=1), "block_n >= 2"),
                     (dict(glu="silu_glu", impl="legacy"), "impl='bits' only"),
                     (dict(glu="silu_glu", out=torch.empty(3, 2 * F)), "out must be a contiguous (3, 9)")):
        try:
            tk.mxfp4_gemv(x, rows, ex, blocks, scales, None, **bad)
        except ValueError as e:
            assert msg in str(e), (bad, e)
        else:
            raise AssertionError(bad)


def case_runner():
    """CudaModelRunner's decode forward (eager, interpreted) on a packed tiny-gpt-oss: the small-batch MXFP4 path
    (GLU GEMV, down GEMV on the static pair tables, combine in the next norm kernel) gives the generic runner's
    greedy tokens (fp32, batch 1 and 2). d_model and ffn_dim 32 (one K tile either way, as 64 was; half the
    interpreted programs a pair)."""
    import giants
    from giants.inference.cuda_runner import CudaModelRunner
    from giants.inference.engine import Engine
    from giants.inference.mxfp4 import pack_experts
    from giants.inference.params import SamplingParams

    cfg = giants.get_config("tiny-gpt-oss").replace(vocab_size=320, d_model=32, ffn_dim=32)
    model = pack_experts(giants.build(cfg, seed=0).eval())
    for i, layer in enumerate(model.layers):
        layer.mlp.randomize(torch.Generator().manual_seed(i))
    outs = []
    for fuse in (None, True):
        def make(e, fuse=fuse):
            r = CudaModelRunner(e.model, e.kv, max_num_seqs=4, max_model_len=64, use_graphs=False)
            r.fuse_packed = fuse
            return r

        eng = Engine(model, None, max_model_len=64, num_blocks=32, max_num_seqs=4, device=torch.device("cpu"),
                     make_runner=make if fuse is not None else None, cpu_onednn=False)
        done = {}
        for batch in ([[1, 2, 3]], [[4, 5, 6, 7, 8], [9, 10]]):
            for i, p in enumerate(batch):
                eng.add_request(f"{len(done)}-{i}", p, SamplingParams(temperature=0, max_tokens=4))
            while eng.has_unfinished_requests():
                done.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
        if fuse is not None:
            assert eng.runner.fast and {f[1][0] for f in eng.runner.fused} == {"mxfp4"}
        outs.append(done)
    assert outs[0] == outs[1] and len(outs[0]) == 3, outs


def from_lanes(lanes):
    """F16Lanes -> (M, K) float32, read back through kmx._LANE_SRC."""
    M, K = lanes.words.shape[0], lanes.k
    f = lanes.words.view(torch.float16).view(M, 4, K // 8, 2).float()
    out = torch.empty(M, K // 8, 8)
    for q, (a, b) in enumerate(kmx._LANE_SRC):
        out[:, :, a], out[:, :, b] = f[:, q, :, 0], f[:, q, :, 1]
    return out.view(M, K)


def case_lanes():
    """x in f16 lanes (what the hfma decode multiplies by): mxfp4_lanes puts every value in its lane (clamped to
    +-65504, NaN kept); the GEMV reading lanes (here with the pure-Triton decode) equals the GEMV of x rounded to fp16,
    bit for bit; the GLU GEMV's lanes_out holds its plain output rounded to fp16, and the down GEMV reading those
    lanes gives that output's down projection; the lanes refuse what they cannot do."""
    g = torch.Generator().manual_seed(9)
    E, F, K = 3, 32, 96
    x = torch.randn(2, K, generator=g) * 3
    x[0, 5], x[1, 17], x[1, 40] = 1e6, -7e4, float("nan")
    for xdt in (torch.float32, torch.bfloat16):
        lanes = kmx.mxfp4_lanes(x.to(xdt))
        assert lanes.k == K and lanes.dtype == xdt and lanes.words.shape == (2, K // 2)
        want = x.to(xdt).float().clamp(-65504, 65504).half().float()
        want[1, 40] = float("nan")
        torch.testing.assert_close(from_lanes(lanes), want, rtol=0, atol=0, equal_nan=True)
    blocks, scales = packed(E, 2 * F, K, lo=118, hi=128, g=g)
    d_blocks, d_scales = packed(E, K, F, lo=118, hi=128, g=g)
    rows, ex = torch.tensor([1, 0, 1]), torch.tensor([2, 0, 1])
    bias = torch.randn(E, 2 * F, generator=g)
    x = torch.randn(2, K, generator=g)
    for xdt in (torch.float32, torch.bfloat16):
        xx = x.to(xdt)
        lanes = kmx.mxfp4_lanes(xx)
        x16 = xx.half().to(xdt) if xdt == torch.bfloat16 else xx.half().float()
        # (the interpreter is slow: one tile for fp32, the two lanes-prefetching ones for bf16)
        cfgs = ([dict(block_n=8, block_k=64)] if xdt == torch.float32 else
                [dict(block_n=4, block_k=32, prefetch=2), dict(block_n=8, block_k=64, prefetch=3)])
        for c in cfgs:
            got = tk.mxfp4_gemv(lanes, rows, ex, blocks, scales, bias, **c)
            want = tk.mxfp4_gemv(x16.float(), rows, ex, blocks, scales, bias, out=torch.empty(3, 2 * F, dtype=xdt), **c)
            assert got.dtype == xdt and torch.equal(got, want), (xdt, c)
            a = tk.mxfp4_gemv(lanes, rows, ex, blocks, scales, bias, glu="clamped_swiglu", lanes_out=True, **c)
            plain = tk.mxfp4_gemv(lanes, rows, ex, blocks, scales, bias, glu="clamped_swiglu", **c)
            assert isinstance(a, kmx.F16Lanes) and a.k == F and a.dtype == xdt
            # an ulp of x's dtype: the interpreter's casts may truncate where the GPU rounds to nearest
            ulp = 2 ** -7 if xdt == torch.bfloat16 else 2 ** -10
            torch.testing.assert_close(from_lanes(a), plain.float().half().float(), rtol=ulp, atol=2 ** -23)
            pair = torch.arange(3)
            y = tk.mxfp4_gemv(a, pair, ex, d_blocks, d_scales, None, **c)
            y_want = tk.mxfp4_gemv(from_lanes(a), pair, ex, d_blocks, d_scales, None, out=torch.empty(3, K, dtype=xdt),
                                   **c)
            assert y.dtype == xdt and torch.equal(y, y_want), (xdt, c)
    for bad, msg in ((dict(lanes_out=True), "lanes_out needs glu"),
                     (dict(glu="silu_glu", lanes_out=True, out=torch.empty(3, F)), "lanes_out needs glu"),
                     (dict(impl="legacy"), "apply to impl='bits' only")):
        try:
            tk.mxfp4_gemv(lanes, rows, ex, blocks, scales, None, **bad)
        except ValueError as e:
            assert msg in str(e), (bad, e)
        else:
            raise AssertionError(bad)
    try:
        kmx.mxfp4_lanes(torch.randn(2, 12))
    except ValueError as e:
        assert "multiple of 8" in str(e)
    else:
        raise AssertionError("K % 8 accepted")


def case_bad_arguments():
    blocks, scales = packed(2, 8, 64)
    x, r = torch.randn(1, 64), torch.zeros(1, dtype=torch.long)
    for kw, msg in ((dict(impl="fast"), "impl must be"), (dict(decode="lut"), "decode must be"),
                    (dict(block_k=48), "power of two"), (dict(impl="legacy", block_n=8), "impl='bits' only")):
        try:
            tk.mxfp4_gemv(x, r, r, blocks, scales, None, **kw)
        except ValueError as e:
            assert msg in str(e), (kw, e)
        else:
            raise AssertionError(kw)
    try:
        tk.mxfp4_gemv(torch.randn(1, 96), r, r, blocks, scales, None)
    except ValueError as e:
        assert "K a multiple of 32" in str(e)
    else:
        raise AssertionError("K mismatch accepted")


# one process runs several cases (each import of torch + triton + giants costs seconds); each case from the same
# seed as in a process of its own, and reported on its own line
import json, time, traceback
for name in sys.argv[1:]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        globals()["case_" + name]()
        tb = None
    except BaseException:
        tb = traceback.format_exc()
    print("@@" + json.dumps(dict(case=name, ok=tb is None, tb=tb, s=round(time.perf_counter() - t0, 1))), flush=True)
'''


_CASES = ("shapes", "extreme_scales", "bits_equals_legacy", "forward_packed", "glu", "runner", "lanes", "bad_arguments")
# two interpreter processes at once (the interpreter is single-threaded), the cases split to take about as long
_GROUPS = (("lanes", "runner", "bad_arguments"), ("shapes", "glu", "forward_packed", "extreme_scales",
                                                  "bits_equals_legacy"))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    """Every case under the interpreter: case -> {ok, tb, s}, plus "_log" -> each process's output tails."""
    pytest.importorskip("triton")
    assert sorted(c for g in _GROUPS for c in g) == sorted(_CASES)
    env = dict(os.environ, TRITON_INTERPRET="1")
    runs = run_concurrently([[sys.executable, "-c", _SCRIPT, *g] for g in _GROUPS], env, timeout=600)
    out: dict[str, dict] = {"_log": {}}
    for group, (rc, stdout, stderr) in zip(_GROUPS, runs):
        for line in stdout.splitlines():
            if line.startswith("@@"):
                r = json.loads(line[2:])
                out[r["case"]] = r
        for case in group:
            out["_log"][case] = f"exit code {rc}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return out


@pytest.mark.parametrize("case", _CASES)
def test_mxfp4_gemv_under_the_interpreter(case, interpreted):
    r = interpreted.get(case)
    assert r is not None and r["ok"], (r or {}).get("tb") or interpreted["_log"][case]


# GIANTS_MXFP4_GEMV(_GLU) are read when giants.inference.kernels.mxfp4 is imported: one process imports it afresh
# for each setting (what a process of its own per setting did), and reports what it printed or the traceback
_ENV_SCRIPT = r'''
import importlib, json, os, sys, traceback
import giants.inference.kernels  # noqa: F401 (the package, without either variable set)

for env in json.loads(sys.argv[1]):
    for var in ("GIANTS_MXFP4_GEMV", "GIANTS_MXFP4_GEMV_GLU"):
        os.environ.pop(var, None)
    os.environ.update(env)
    sys.modules.pop("giants.inference.kernels.mxfp4", None)
    try:
        k = importlib.import_module("giants.inference.kernels.mxfp4")
        r = dict(default=str(k.MXFP4_GEMV_DEFAULT), tiles=" ".join(map(str, (
            k.MXFP4_GEMV_DEFAULT["block_n"], k.MXFP4_GEMV_DEFAULT["block_k"], k.MXFP4_GEMV_GLU_DEFAULT["block_n"],
            k.MXFP4_GEMV_GLU_DEFAULT["block_k"]))), err=None)
    except Exception:
        r = dict(default=None, tiles=None, err=traceback.format_exc())
    print("@@" + json.dumps(r), flush=True)
'''
_ENV_VALUES = [('{"block_n": 8, "decode": "ptx_f16"}', None), ('{"blockn": 8}', "unknown keys ['blockn']"),
               ("block_n=8", "not JSON"), ("[8]", "a JSON object")]
_GLU_ENVS = [dict(GIANTS_MXFP4_GEMV='{"block_k": 256}', GIANTS_MXFP4_GEMV_GLU='{"block_n": 16}'),
             dict(GIANTS_MXFP4_GEMV='{"block_k": 256}', GIANTS_MXFP4_GEMV_GLU='{"rows": 16}')]


@pytest.fixture(scope="module")
def env_imports() -> list[dict]:
    envs = [dict(GIANTS_MXFP4_GEMV=v) for v, _ in _ENV_VALUES] + _GLU_ENVS
    env = dict(os.environ, TRITON_INTERPRET="1")
    for var in ("GIANTS_MXFP4_GEMV", "GIANTS_MXFP4_GEMV_GLU"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-c", _ENV_SCRIPT, json.dumps(envs)], env=env, capture_output=True, text=True,
                       timeout=300)
    out = [json.loads(line[2:]) for line in r.stdout.splitlines() if line.startswith("@@")]
    assert r.returncode == 0 and len(out) == len(envs), r.stdout + r.stderr
    return out


@pytest.mark.parametrize("value, says", _ENV_VALUES)
def test_mxfp4_gemv_env_override(value, says, env_imports):
    """GIANTS_MXFP4_GEMV sets the default tile; a bad value fails at import naming the variable."""
    r = env_imports[[v for v, _ in _ENV_VALUES].index(value)]
    if says is None:
        assert r["err"] is None, r["err"]
        out = r["default"]
        assert "'block_n': 8" in out and "'decode': 'ptx_f16'" in out and "'block_k': 512" in out
    else:
        assert r["default"] is None and "GIANTS_MXFP4_GEMV" in r["err"] and says in r["err"], r


def test_mxfp4_gemv_glu_env_override(env_imports):
    """GIANTS_MXFP4_GEMV sets both defaults, GIANTS_MXFP4_GEMV_GLU then the GLU GEMV's alone; a bad one names itself."""
    r = env_imports[len(_ENV_VALUES)]
    assert r["err"] is None and r["tiles"].split() == ["8", "256", "16", "256"], r
    r = env_imports[len(_ENV_VALUES) + 1]
    assert r["tiles"] is None and "GIANTS_MXFP4_GEMV_GLU: unknown keys ['rows']" in r["err"], r
