"""MXFP4 expert GEMV for MoE decode: packed FP4 (E2M1) experts with E8M0 block scales, decoded in registers
(a 32-bit word of 8 nibbles at a time; the byte-wise kernel kept as impl="legacy")."""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from giants.inference.kernels.common import ACTS, _act, _grid_dep, _pdl
from giants.inference.kernels.mxfp4_ptx import (  # noqa: F401 - the lane tables, for tests and readers
    _E4M3_LANES,
    _F16_LANES,
    _LANE_SRC,
    _PRMT_LUT,
    _ptx_e4m3,
    _ptx_f16,
    _ptx_hfma,
    _ptx_prmt,
)


# ---- MXFP4 expert GEMV ------------------------------------------------------------------------
@triton.jit
def _e2m1(n):
    """FP4 E2M1 nibble (int32) -> float32 by building the bits: sign bit 3, exponent bits 2..1, mantissa
    bit 0; exponent 0 is the subnormal 0 / 0.5."""
    e = (n >> 1) & 3
    m = n & 1
    bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22)) | ((n & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_gemv_kernel(X, X_ROW, EXPERT, BLOCKS, SCALES, BIAS, Y, N_OUT, K, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Y[p, n] = sum_k X[X_ROW[p], k] * W[EXPERT[p], n, k] (+ BIAS[EXPERT[p], n]); W packed MXFP4: the
    nibbles are decoded in registers, products summed per 32-value block, then scaled once per block."""
    _grid_dep(PDL)
    p = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N_OUT
    e = tl.load(EXPERT + p).to(tl.int64)
    xr = tl.load(X_ROW + p).to(tl.int64)
    NB: tl.constexpr = BLOCK_K // 32
    j = tl.arange(0, BLOCK_K // 2)
    sb = tl.arange(0, NB)
    wrow = e * N_OUT + rows.to(tl.int64)
    acc = tl.zeros((BLOCK_N, NB), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + 2 * j  # even element of each byte
        km = kk < K
        byte = tl.load(BLOCKS + wrow[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=rm[:, None] & km[None, :],
                       other=0).to(tl.int32)
        xe = tl.load(X + xr * K + kk, mask=km, other=0.0).to(tl.float32)
        xo = tl.load(X + xr * K + kk + 1, mask=km, other=0.0).to(tl.float32)
        prod = _e2m1(byte & 15) * xe[None, :] + _e2m1(byte >> 4) * xo[None, :]  # (BLOCK_N, BLOCK_K/2)
        part = tl.sum(tl.reshape(prod, (BLOCK_N, NB, 16)), axis=2)  # one sum per 32-value block
        sm = (k0 // 32 + sb) < K // 32
        sc = tl.load(SCALES + wrow[:, None] * (K // 32) + (k0 // 32 + sb)[None, :], mask=rm[:, None] & sm[None, :],
                     other=0).to(tl.int32)
        acc += part * (sc << 23).to(tl.float32, bitcast=True)  # E8M0: 2 ** (sc - 127)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + e * N_OUT + rows, mask=rm, other=0.0).to(tl.float32)
    tl.store(Y + p * N_OUT + rows, y.to(Y.dtype.element_ty), mask=rm)


@triton.jit
def _fp16_halves(v):
    """uint32 -> (low 16 bits, high 16 bits) read as fp16, widened to float32."""
    lo = v.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


_PTX_F16 = tl.constexpr(_ptx_f16())
_PTX_E4M3 = tl.constexpr(_ptx_e4m3())
_PTX_HFMA = tl.constexpr(_ptx_hfma())
_PTX_PRMT = tl.constexpr(_ptx_prmt())


@triton.jit
def _fp4x8(w, DECODE: tl.constexpr):
    """One int32 word of packed E2M1 (byte b: element 2b in the low nibble, 2b+1 in the high one) -> its 8
    values, as float32, times 2**-14 (DECODE 0, 1), 2**-6 (DECODE 2) or 2**-2 (DECODE 3).

    DECODE 0 (pure Triton, runs under the interpreter) and 1 (the same in inline PTX): nibble n is moved to
    the fp16 bits ((n & 7) << 9) | ((n & 8) << 12): its exponent bits land in the fp16 exponent's low bits and
    its mantissa bit in the top mantissa bit, so the fp16 reads E2M1(n) * 2**-14 exactly (E2M1 exponent 0:
    the fp16 subnormal m * 2**-15). Bytes 0 and 2 (and 1 and 3) need the same shifts, so each 32-bit op builds
    two fp16 lanes: 15 integer ops and 8 fp16 -> fp32 conversions a word.
    DECODE 2 (inline PTX, sm_89+): the nibbles become FP8 E4M3 bytes, magnitude << 2 and sign at bit 7,
    which read E2M1(n) * 2**-6; low nibbles (u << 2, u << 4), high nibbles (u >> 2, u): ~7 integer ops a
    word, then 4 hardware e4m3x2 -> f16x2 conversions and 8 fp16 -> fp32.
    DECODE 3 (inline PTX): no conversion instruction at all (in case the conversions bound the others): two
    byte-permutes look the magnitudes up in an 8-byte table (_PRMT_LUT), whose bytes become the exponent and top
    mantissa bits of normal fp32 values E2M1(n) * 2**-2, two lanes of bf16 bits per 32-bit op, the signs shifted
    in, and bf16 -> fp32 is a shift or a mask: 26 integer ops a word."""
    if DECODE > 0:  # $8 the word, $0..$7 its values
        asm: tl.constexpr = _PTX_F16 if DECODE == 1 else (_PTX_E4M3 if DECODE == 2 else _PTX_PRMT)
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w],
                                                                   dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        u = w.to(tl.uint32, bitcast=True)  # logical shifts
        v0, v4 = _fp16_halves(((u << 9) & 0x0E000E00) | ((u << 12) & 0x80008000))  # low nibbles of bytes 0, 2
        v1, v5 = _fp16_halves(((u << 5) & 0x0E000E00) | ((u << 8) & 0x80008000))  # high nibbles of bytes 0, 2
        v2, v6 = _fp16_halves(((u << 1) & 0x0E000E00) | ((u << 4) & 0x80008000))  # low nibbles of bytes 1, 3
        v3, v7 = _fp16_halves(((u >> 3) & 0x0E000E00) | (u & 0x80008000))  # high nibbles of bytes 1, 3
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _x_pair(XW, off, m):
    """x words XW[off] (two bf16 each) -> (low, high) as float32 (a bf16 is the top half of its float32)."""
    v = tl.load(XW + off, mask=m, other=0).to(tl.uint32, bitcast=True)
    return (v << 16).to(tl.float32, bitcast=True), (v & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _f16_pair(v):
    """int32 of two fp16 -> (low, high) as float32."""
    return _fp16_halves(v.to(tl.uint32, bitcast=True))


@triton.jit
def _lanes_load(X, xr, kw, km, KB):
    """x as f16 lanes (mxfp4_lanes) at word index kw (NB, 4): lane q of word kw at q * K/8 + kw (16 bytes a thread's
    block a lane)."""
    xb = X + xr * (KB * 16) + kw
    return (tl.load(xb, mask=km, other=0), tl.load(xb + KB * 4, mask=km, other=0),
            tl.load(xb + KB * 8, mask=km, other=0), tl.load(xb + KB * 12, mask=km, other=0))


@triton.jit
def _lanes_dot(w, l0, l1, l2, l3, DECODE: tl.constexpr):
    """(BLOCK_N, NB) block dots of words w with x lanes l0..l3 (NB, 4): DECODE 4 in f16x2 (_ptx_hfma), else the
    lanes widened to fp32 and multiplied as the other decodes do."""
    if DECODE == 4:
        d = tl.inline_asm_elementwise(_PTX_HFMA, "=r,r,r,r,r,r",
                                      [w, tl.broadcast_to(l0[None, :, :], w.shape),
                                       tl.broadcast_to(l1[None, :, :], w.shape),
                                       tl.broadcast_to(l2[None, :, :], w.shape),
                                       tl.broadcast_to(l3[None, :, :], w.shape)],
                                      dtype=tl.float32, is_pure=True, pack=1)
        return tl.sum(d, axis=2)
    x0, x2 = _f16_pair(l0)  # the lanes of _LANE_SRC: (0, 2), (4, 6), (1, 3), (5, 7)
    x4, x6 = _f16_pair(l1)
    x1, x3 = _f16_pair(l2)
    x5, x7 = _f16_pair(l3)
    return _word_dots(w, x0, x1, x2, x3, x4, x5, x6, x7, DECODE)


@triton.jit
def _word_dots(w, x0, x1, x2, x3, x4, x5, x6, x7, DECODE: tl.constexpr):
    """(BLOCK_N, NB): each block's 4 words decoded (_fp4x8) and multiplied by x0..x7 (NB, 4) in fp32, summed."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _fp4x8(w, DECODE)
    d = v0 * x0[None, :, :]
    d = tl.fma(v1, x1[None, :, :], d)
    d = tl.fma(v2, x2[None, :, :], d)
    d = tl.fma(v3, x3[None, :, :], d)
    d = tl.fma(v4, x4[None, :, :], d)
    d = tl.fma(v5, x5[None, :, :], d)
    d = tl.fma(v6, x6[None, :, :], d)
    d = tl.fma(v7, x7[None, :, :], d)
    return tl.sum(d, axis=2)  # the 4 words of a block


@triton.jit
def _mxfp4_block_sums(w, X, xr, kw, km, KB, X_WORDS: tl.constexpr, DECODE: tl.constexpr, X_LANES: tl.constexpr):
    """w (BLOCK_N, NB, 4) int32 words at word index kw (NB, 4) of each row, km (NB, 1) the blocks inside K ->
    (BLOCK_N, NB) the dot of each 32-value block with x (unscaled, times the decode's 2**-14 / 2**-6)."""
    if X_LANES:
        l0, l1, l2, l3 = _lanes_load(X, xr, kw, km, KB)
        return _lanes_dot(w, l0, l1, l2, l3, DECODE)
    if X_WORDS:  # x word 4 * kw + q holds elements 8 * kw + 2q and 8 * kw + 2q + 1
        xw = xr * (KB * 16) + 4 * kw
        x0, x1 = _x_pair(X, xw, km)
        x2, x3 = _x_pair(X, xw + 1, km)
        x4, x5 = _x_pair(X, xw + 2, km)
        x6, x7 = _x_pair(X, xw + 3, km)
    else:
        xk = xr * (KB * 32) + 8 * kw
        x0 = tl.load(X + xk, mask=km, other=0.0).to(tl.float32)
        x1 = tl.load(X + xk + 1, mask=km, other=0.0).to(tl.float32)
        x2 = tl.load(X + xk + 2, mask=km, other=0.0).to(tl.float32)
        x3 = tl.load(X + xk + 3, mask=km, other=0.0).to(tl.float32)
        x4 = tl.load(X + xk + 4, mask=km, other=0.0).to(tl.float32)
        x5 = tl.load(X + xk + 5, mask=km, other=0.0).to(tl.float32)
        x6 = tl.load(X + xk + 6, mask=km, other=0.0).to(tl.float32)
        x7 = tl.load(X + xk + 7, mask=km, other=0.0).to(tl.float32)
    return _word_dots(w, x0, x1, x2, x3, x4, x5, x6, x7, DECODE)


@triton.jit
def _mxfp4_gemv_bits_kernel(X, X_ROW, EXPERT, BLOCKS, SCALES, BIAS, Y, N_OUT, K, alpha, limit, HAS_BIAS: tl.constexpr,
                            X_WORDS: tl.constexpr, DECODE: tl.constexpr, PREFETCH: tl.constexpr, GLU: tl.constexpr,
                            X_LANES: tl.constexpr, LANES_OUT: tl.constexpr, ROUND: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Y[p, n] = sum_k X[X_ROW[p], k] * W[EXPERT[p], n, k] (+ BIAS[EXPERT[p], n]), the contract of
    _mxfp4_gemv_kernel, but BLOCKS is the packed weight read as int32 words (K/8 a row, 8 nibbles each), decoded
    by _fp4x8. The tile is (BLOCK_N rows, BLOCK_K/32 scale blocks, 4 words; a block's 4 words are one 16-byte
    load): the 8 products of a word and the 4 words of a block are summed, the block's sum scaled once by
    2**(s - 127) (the exponent bits s << 23), and the row's total multiplied once by 2**14 (2**6, 2**2 for DECODE 2, 3)
    to undo the decode's offset. So every E8M0 exponent 1..254 applies exactly (0, i.e. 2**-127, flushes to 0
    as in the legacy kernel; 255 is NaN in the format), and the fp32 sums, 2**-14 of the true ones, cannot
    overflow before the result does; the price is that a block whose scaled sum is under 2**-112 goes through
    fp32 subnormals (absolute error below 2**-135 a block, irrelevant next to any real activation). Folding
    2**14 into the scale instead ((s + 14) << 23) would be wrong for s > 240. K must be a multiple of 32; the
    last tile is masked by whole blocks. X_WORDS: X is a contiguous bf16 (M, K) read as int32 pairs, else X is
    read element-wise (any float dtype). PREFETCH: the next tile's words and scales are loaded before this tile
    is decoded (two tiles in flight a thread); with lanes, 2 also loads the next tile's x lanes ahead, 3 as well
    the words and scales two tiles ahead (without lanes, 2 and 3 act as 1).
    GLU >= 0 (an ACTS code): each expert's W holds [gate; up] (2 N_OUT rows) and Y[p, n] = act(gate_n, up_n),
    each rounded to Y's dtype first as an unfused GEMV would store it. The tile's first BLOCK_N/2 rows are gate
    rows n.., the other half the up rows of the same n: one stream of BLOCK_N rows, as without GLU, split
    after the sums; the down projection then needs no activation kernel.
    X_LANES: X is x in the f16 lanes of mxfp4_lanes (int32 (M, K/2)); DECODE 4 (hfma) needs it and multiplies in
    f16x2 (_ptx_hfma), the other decodes widen the lanes to fp32. LANES_OUT (with GLU): Y is the f16 lanes of the
    result for the next hfma GEMV, each value rounded first as Y's dtype would store it (ROUND 1: bf16, 2: fp16)."""
    _grid_dep(PDL)
    p = tl.program_id(0)
    r = tl.arange(0, BLOCK_N)
    e = tl.load(EXPERT + p).to(tl.int64)
    xr = tl.load(X_ROW + p).to(tl.int64)
    if GLU >= 0:
        HALF: tl.constexpr = BLOCK_N // 2
        n = tl.program_id(1) * HALF + r % HALF
        wrow = e * (2 * N_OUT) + (r // HALF) * N_OUT + n.to(tl.int64)  # gate rows, then up rows
    else:
        n = tl.program_id(1) * BLOCK_N + r
        wrow = e * N_OUT + n.to(tl.int64)
    rm = n < N_OUT
    NB: tl.constexpr = BLOCK_K // 32
    KB = K // 32
    KW = KB * 4  # words a row, a multiple of 4: every row starts 16-byte aligned
    sb = tl.arange(0, NB)
    kw0 = sb[:, None] * 4 + tl.arange(0, 4)[None, :]  # (NB, 4) word index within the tile
    wbase = BLOCKS + wrow[:, None, None] * KW + kw0[None, :, :]
    sbase = SCALES + wrow[:, None] * KB + sb[None, :]
    acc = tl.zeros((BLOCK_N, NB), tl.float32)
    if X_LANES and PREFETCH >= 2:  # x lanes one tile ahead too; PREFETCH 3: words and scales two tiles ahead
        bm = sb < KB
        w = tl.load(wbase, mask=rm[:, None, None] & bm[None, :, None], other=0)
        sc = tl.load(sbase, mask=rm[:, None] & bm[None, :], other=0)
        l0, l1, l2, l3 = _lanes_load(X, xr, kw0, bm[:, None], KB)
        if PREFETCH == 3:
            bm1 = (NB + sb) < KB
            w1 = tl.load(wbase + NB * 4, mask=rm[:, None, None] & bm1[None, :, None], other=0)
            sc1 = tl.load(sbase + NB, mask=rm[:, None] & bm1[None, :], other=0)
        for b0 in range(0, KB, NB):
            if PREFETCH == 3:
                bm2 = (b0 + 2 * NB + sb) < KB
                w2 = tl.load(wbase + (b0 + 2 * NB) * 4, mask=rm[:, None, None] & bm2[None, :, None], other=0)
                sc2 = tl.load(sbase + b0 + 2 * NB, mask=rm[:, None] & bm2[None, :], other=0)
            else:
                bm1 = (b0 + NB + sb) < KB
                w1 = tl.load(wbase + (b0 + NB) * 4, mask=rm[:, None, None] & bm1[None, :, None], other=0)
                sc1 = tl.load(sbase + b0 + NB, mask=rm[:, None] & bm1[None, :], other=0)
            n0, n1, n2, n3 = _lanes_load(X, xr, (b0 + NB) * 4 + kw0, ((b0 + NB + sb) < KB)[:, None], KB)
            part = _lanes_dot(w, l0, l1, l2, l3, DECODE)
            acc += part * (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # E8M0: 2 ** (sc - 127)
            w = w1
            sc = sc1
            if PREFETCH == 3:
                w1 = w2
                sc1 = sc2
            l0, l1, l2, l3 = n0, n1, n2, n3
    elif PREFETCH:
        bm = sb < KB
        w = tl.load(wbase, mask=rm[:, None, None] & bm[None, :, None], other=0)
        sc = tl.load(sbase, mask=rm[:, None] & bm[None, :], other=0)
        for b0 in range(0, KB, NB):
            bm_next = (b0 + NB + sb) < KB
            w_next = tl.load(wbase + (b0 + NB) * 4, mask=rm[:, None, None] & bm_next[None, :, None], other=0)
            sc_next = tl.load(sbase + b0 + NB, mask=rm[:, None] & bm_next[None, :], other=0)
            part = _mxfp4_block_sums(w, X, xr, b0 * 4 + kw0, ((b0 + sb) < KB)[:, None], KB, X_WORDS, DECODE,
                                     X_LANES)
            acc += part * (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # E8M0: 2 ** (sc - 127)
            w = w_next
            sc = sc_next
    else:
        for b0 in range(0, KB, NB):
            bm = (b0 + sb) < KB  # (NB,) scale blocks inside K; a block's words share its mask
            w = tl.load(wbase + b0 * 4, mask=rm[:, None, None] & bm[None, :, None], other=0)
            sc = tl.load(sbase + b0, mask=rm[:, None] & bm[None, :], other=0)
            part = _mxfp4_block_sums(w, X, xr, b0 * 4 + kw0, bm[:, None], KB, X_WORDS, DECODE, X_LANES)
            acc += part * (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # E8M0: 2 ** (sc - 127)
    y = tl.sum(acc, axis=1)
    if DECODE == 3:
        y = y * 4.0  # undo the decode's 2**-2
    elif DECODE == 2 or DECODE == 4:
        y = y * 64.0  # undo the decode's 2**-6
    else:
        y = y * 16384.0  # undo the decode's 2**-14
    if HAS_BIAS:
        y += tl.load(BIAS + wrow, mask=rm, other=0.0).to(tl.float32)  # bias (E, rows) indexed like W's rows
    if GLU >= 0:
        if not LANES_OUT:
            y = y.to(Y.dtype.element_ty).to(tl.float32)
        elif ROUND == 1:  # Y holds fp16 lanes; round as x's dtype would store the sums
            y = y.to(tl.bfloat16).to(tl.float32)
        elif ROUND == 2:
            y = y.to(tl.float16).to(tl.float32)
        y2 = tl.reshape(y, (2, HALF))
        half = tl.arange(0, 2)[:, None]
        g = tl.sum(tl.where(half == 0, y2, 0.0), axis=0)
        u = tl.sum(tl.where(half == 1, y2, 0.0), axis=0)
        on = tl.program_id(1) * HALF + tl.arange(0, HALF)
        a = _act(g, u, alpha, limit, GLU)
        if LANES_OUT:  # output n = 8 kw + e goes to lane 2 (e % 2) + e // 4, half (e // 2) % 2 (see _LANE_SRC)
            if ROUND == 1:
                a = a.to(tl.bfloat16).to(tl.float32)
            elif ROUND == 2:
                a = a.to(tl.float16).to(tl.float32)
            a = tl.clamp(a, -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL)
            e8 = on % 8
            at = p * N_OUT + (2 * (e8 % 2) + e8 // 4) * (N_OUT // 4) + (on // 8) * 2 + (e8 // 2) % 2
            tl.store(Y + at, a.to(tl.float16), mask=on < N_OUT)
        else:
            tl.store(Y + p * N_OUT + on, a.to(Y.dtype.element_ty), mask=on < N_OUT)
    else:
        tl.store(Y + p * N_OUT + n, y.to(Y.dtype.element_ty), mask=rm)


# Choices for the "bits" kernel (benchmarks/bench_mxfp4_gemv.py sweeps them on a GPU): block_n rows a program,
# block_k K elements a loop step (a power of two >= 32), warps, num_stages (Triton's pipeliner leaves these
# loads alone: they feed no dot), prefetch (load the next tile before decoding this one), and the decode:
# "triton" (pure Triton integer ops, also runs under TRITON_INTERPRET), "ptx_f16" (the same fp16-bit decode
# in inline PTX, which avoids a repacking PRMT a nibble pair that Triton's i32 -> i16 truncation emits) or
# "ptx_e4m3" (nibbles -> FP8 E4M3 bytes, hardware e4m3x2 -> f16x2 conversion; about half the integer ops), "hfma"
# (ptx_e4m3's f16x2 values multiplied by x in f16x2, x first put in f16 lanes by mxfp4_lanes: no fp32 conversion of
# weights or x a word, products and 4-term sums in fp16, fp32 from the word's sum on).
MXFP4_DECODES = ("triton", "ptx_f16", "ptx_e4m3", "ptx_prmt", "hfma")
MXFP4_GEMV_CONFIGS = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=1, prefetch=pf)
                      for bn, bk, nw, pf in ((16, 512, 4, False), (32, 512, 4, False), (8, 512, 4, False),
                                             (32, 256, 4, False), (64, 256, 4, False), (16, 1024, 4, False),
                                             (32, 1024, 8, False), (64, 512, 8, False), (16, 512, 4, True),
                                             (32, 256, 4, True), (8, 512, 4, True), (32, 512, 8, True),
                                             (4, 512, 4, True), (8, 256, 4, True), (8, 1024, 4, True),
                                             (16, 1024, 8, True), (8, 1024, 8, True), (16, 512, 8, True),
                                             (8, 512, 4, 2), (8, 512, 4, 3), (8, 1024, 4, 2), (16, 1024, 4, 2),
                                             (4, 512, 4, 2), (4, 1024, 4, 2), (8, 256, 4, 3))]
# Measured on an H100 (bench_mxfp4_gemv.py, gpt-oss-120b shapes, 2026-12-06, one run): the gate|up GEMV with the
# GLU epilogue / the down GEMV take 22.9 / 13.7 us with this default (8 rows, prefetch, decode "auto" = ptx_e4m3
# there), 24.1 / 15.3 with the fp16-bit decode, 26.6 / 16.1 with ptx_prmt (no conversion instruction, more integer
# ops), 57.7 / 32.7 legacy; 32-row tiles 29-32 / 20-21 us. The time follows the instruction count a weight word
# (decode, the x loads and unpacking, 8 FMAs), not the conversions: the kernel streams ~1.3-1.5 TB/s.
MXFP4_GEMV_DEFAULT = dict(MXFP4_GEMV_CONFIGS[10], decode="auto")
# The gate|up GEMV with the GLU epilogue (glu=...) has its own default tile (its rows are twice the down GEMV's)
MXFP4_GEMV_GLU_DEFAULT = dict(MXFP4_GEMV_DEFAULT)


def _env_tile(var: str, into: dict) -> None:
    """A measured pick without editing this file (benchmarks run the sweep, then the model with the best), e.g.
    GIANTS_MXFP4_GEMV='{"block_n": 32, "block_k": 512, "num_warps": 4, "decode": "ptx_f16"}' (every MXFP4 GEMV;
    GIANTS_MXFP4_GEMV_GLU then sets the GLU GEMV's apart)."""
    if not os.environ.get(var):
        return
    try:
        given = json.loads(os.environ[var])
    except json.JSONDecodeError as e:
        raise ValueError(f"{var}: not JSON ({e}): {os.environ[var]!r}") from None
    if not isinstance(given, dict):
        raise ValueError(f"{var}: a JSON object of tile options, got {given!r}")
    unknown = set(given) - set(MXFP4_GEMV_DEFAULT)
    if unknown:
        raise ValueError(f"{var}: unknown keys {sorted(unknown)} (known: {sorted(MXFP4_GEMV_DEFAULT)})")
    into.update(given)


_env_tile("GIANTS_MXFP4_GEMV", MXFP4_GEMV_DEFAULT)
_env_tile("GIANTS_MXFP4_GEMV", MXFP4_GEMV_GLU_DEFAULT)
_env_tile("GIANTS_MXFP4_GEMV_GLU", MXFP4_GEMV_GLU_DEFAULT)
# The hfma decode's own tiles (same-run sweep, H100, gpt-oss-120b shapes, 2026-12-06 19:12, x lanes made in the timed
# call: glu 21.0 us at 16 rows x 1024 without prefetch against 22.2 at the default 8 x 512 prefetch; down 12.7 us at
# 8 x 1024 prefetch against 13.6); used where the decode resolves to hfma and no tile came from the environment.
MXFP4_HFMA_TILE = dict(block_n=8, block_k=1024, num_warps=4, num_stages=1, prefetch=True)
MXFP4_HFMA_GLU_TILE = dict(block_n=16, block_k=1024, num_warps=4, num_stages=1, prefetch=False)
_ENV_TILE = {False: bool(os.environ.get("GIANTS_MXFP4_GEMV")),
             True: bool(os.environ.get("GIANTS_MXFP4_GEMV") or os.environ.get("GIANTS_MXFP4_GEMV_GLU"))}


def _default_tile(glu: bool, decode: str) -> dict:
    """The tile options a call leaves unset: the role's default, or the hfma tiles for the hfma decode."""
    base = MXFP4_GEMV_GLU_DEFAULT if glu else MXFP4_GEMV_DEFAULT
    if decode == "hfma" and not _ENV_TILE[glu]:
        return {**base, **(MXFP4_HFMA_GLU_TILE if glu else MXFP4_HFMA_TILE)}
    return base
MXFP4_GEMV_IMPL = "bits"  # what mxfp4_gemv runs when impl is not given: "bits" or "legacy"


@functools.cache
def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return torch.cuda.get_device_capability(device)


def _auto_decode(device: torch.device, dtype: torch.dtype, lanes: bool = False) -> str:
    """decode "auto": on sm_89+ "hfma" for 16-bit activations (x in f16 lanes), the hardware e4m3x2 conversion with
    fp32 products for fp32 ones (their accuracy kept); the fp16-bit PTX decode on older GPUs; the pure-Triton one
    elsewhere (the interpreter)."""
    cap = _capability(device)
    if cap is None:
        return "triton"
    if cap < (8, 9):
        return "ptx_f16"
    return "hfma" if lanes or dtype in (torch.bfloat16, torch.float16) else "ptx_e4m3"


class F16Lanes(NamedTuple):
    """Activations in the f16 lanes the hfma decode multiplies by (mxfp4_lanes): words (M, K/2) int32, row m's lane q
    of 8-value word w at q * K/8 + w, two fp16 x[m, 8w + _LANE_SRC[q][0]] and x[m, 8w + _LANE_SRC[q][1]] (clamped
    to +-65504); dtype: the activations' own dtype, that of a GEMV's output."""

    words: torch.Tensor
    k: int
    dtype: torch.dtype


@triton.jit
def _lanes_kernel(X, Y, K, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _grid_dep(PDL)
    m = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # fp16 index in row m's lanes: lane q, word w, half h
    q = i // (K // 4)
    wh = i % (K // 4)
    src = 8 * (wh // 2) + 4 * (q % 2) + q // 2 + 2 * (wh % 2)  # _LANE_SRC[q][h] = 4 (q % 2) + q // 2 + 2h
    v = tl.load(X + m * K + src, mask=i < K, other=0.0).to(tl.float32)
    v = tl.clamp(v, -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(Y + m * K + i, v.to(tl.float16), mask=i < K)


def mxfp4_lanes(x: torch.Tensor) -> F16Lanes:
    """x (M, K), K a multiple of 8 -> its F16Lanes (one small kernel)."""
    if x.dim() != 2 or x.shape[1] % 8:
        raise ValueError(f"mxfp4_lanes: x must be (M, K) with K a multiple of 8, got {tuple(x.shape)}")
    M, K = x.shape
    x = x if x.is_contiguous() else x.contiguous()
    words = torch.empty(M, K // 2, dtype=torch.int32, device=x.device)
    _lanes_kernel[(M, triton.cdiv(K, 1024))](x, words.view(torch.float16), K, BLOCK=1024, **_pdl())
    return F16Lanes(words, K, x.dtype)


def uses_lanes(x: torch.Tensor | F16Lanes, glu: bool = False) -> bool:
    """Whether mxfp4_gemv's default (the GLU GEMV's with glu) for this x multiplies in f16 lanes: then a kernel
    producing x may produce lanes (a GLU GEMV hands on lanes to the down GEMV); lanes given stay lanes."""
    if isinstance(x, F16Lanes):
        return True
    d = (MXFP4_GEMV_GLU_DEFAULT if glu else MXFP4_GEMV_DEFAULT)["decode"]
    return MXFP4_GEMV_IMPL == "bits" and (d == "hfma" or d == "auto" and _auto_decode(x.device, x.dtype) == "hfma")


def mxfp4_gemv(x: torch.Tensor | F16Lanes, x_row: torch.Tensor, expert: torch.Tensor, blocks: torch.Tensor,
               scales: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None, *,
               impl: str | None = None, block_n: int | None = None, block_k: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None, prefetch: bool | None = None,
               decode: str | None = None, glu: str | None = None, alpha: float = 1.702,
               limit: float = 7.0, lanes_out: bool = False) -> torch.Tensor | F16Lanes:
    """Y[p] = W[expert[p]] @ x[x_row[p]] (+ bias[expert[p]]). x: (M, K) or its F16Lanes; x_row, expert: (P,) int;
    blocks (E, N, K/2) uint8; scales (E, N, K/32) uint8 -> (P, N) in x's dtype (or into out).
    glu (a key of ACTS, bits only): W holds [gate; up] (N = 2F rows) and the result is the gated activation
    act(gate, up), (P, F), with the clamped SwiGLU's alpha and limit (gpt-oss); with lanes_out it is returned as
    F16Lanes (each value rounded to x's dtype first) for the next GEMV's hfma decode.
    impl "bits" (default: MXFP4_GEMV_IMPL) decodes the nibbles a 32-bit word at a time (_fp4x8); "legacy" is
    the byte-wise kernel. block_n / block_k / num_warps / num_stages / prefetch / decode override MXFP4_GEMV_DEFAULT
    (MXFP4_GEMV_GLU_DEFAULT with glu, the MXFP4_HFMA_* tiles for the hfma decode; bits only; decode one of
    MXFP4_DECODES, the ptx_* ones and hfma on CUDA only; hfma converts a tensor x to lanes first, and every decode
    reads lanes given as x)."""
    impl = impl or MXFP4_GEMV_IMPL
    if impl not in ("bits", "legacy"):
        raise ValueError(f"mxfp4_gemv: impl must be 'bits' or 'legacy', got {impl!r}")
    lanes = isinstance(x, F16Lanes)
    P = expert.shape[0]
    N, K = blocks.shape[1], (x.k if lanes else x.shape[1])
    if K % 32 or blocks.shape[2] * 2 != K or scales.shape[2] * 32 != K:
        raise ValueError(f"mxfp4_gemv: x has K={K}, blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}: "
                         "need blocks (E, N, K/2), scales (E, N, K/32), K a multiple of 32")
    if glu is not None and (glu not in ACTS or N % 2):
        raise ValueError(f"mxfp4_gemv: glu must be one of {sorted(ACTS)} with an even row count [gate; up], "
                         f"got {glu!r} and N={N}")
    n_out = N // 2 if glu is not None else N
    if lanes_out and (glu is None or n_out % 8 or out is not None):
        raise ValueError("mxfp4_gemv: lanes_out needs glu, an output width that is a multiple of 8 and no out "
                         f"(got glu={glu!r}, width {n_out}, out {'given' if out is not None else 'None'})")
    x_dtype = x.dtype
    if lanes_out:
        out_lanes = F16Lanes(torch.empty(P, n_out // 2, dtype=torch.int32, device=blocks.device), n_out, x_dtype)
        out = out_lanes.words.view(torch.float16)
    elif out is None:
        out = torch.empty(P, n_out, dtype=x_dtype, device=blocks.device)
    elif tuple(out.shape) != (P, n_out) or not out.is_contiguous():
        raise ValueError(f"mxfp4_gemv: out must be a contiguous ({P}, {n_out}) tensor"
                         f"{' (glu: half the rows of W)' if glu is not None else ''}, got {tuple(out.shape)}")
    bias_arg = bias if bias is not None else out
    tile = dict(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages, prefetch=prefetch,
                decode=decode)
    if impl == "legacy":
        given = [k for k, v in tile.items() if v is not None] + (["glu"] if glu is not None else []) + \
            (["lanes"] if lanes or lanes_out else [])
        if given:
            raise ValueError(f"mxfp4_gemv: {', '.join(given)} apply to impl='bits' only")
        BLOCK_N, BLOCK_K = 16, 512
        _mxfp4_gemv_kernel[(P, triton.cdiv(N, BLOCK_N))](x, x_row, expert, blocks, scales, bias_arg, out, N, K,
                                                         HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                                         num_warps=4, **_pdl())
        return out
    role_default = MXFP4_GEMV_GLU_DEFAULT if glu is not None else MXFP4_GEMV_DEFAULT
    dec = decode if decode is not None else role_default["decode"]
    if dec == "auto":
        dec = _auto_decode(blocks.device, x_dtype, lanes)
    if dec not in MXFP4_DECODES:
        raise ValueError(f"mxfp4_gemv: decode must be 'auto' or one of {MXFP4_DECODES}, got {dec!r}")
    default = _default_tile(glu is not None, dec)
    c = {k: (v if v is not None else default[k]) for k, v in tile.items()}
    c["decode"] = dec
    if c["block_k"] < 32 or c["block_k"] & (c["block_k"] - 1):
        raise ValueError(f"mxfp4_gemv: block_k must be a power of two >= 32, got {c['block_k']}")
    if glu is not None and c["block_n"] < 2:
        raise ValueError(f"mxfp4_gemv: glu needs block_n >= 2 (half gate rows, half up rows), got {c['block_n']}")
    if c["decode"] == "hfma" and not lanes:
        x, lanes = mxfp4_lanes(x), True
    words = blocks.view(torch.int32)  # (E, N, K/8): word w = bytes 4w..4w+3 = elements 8w..8w+7
    if lanes:
        x_arg, x_words = x.words, False
    else:
        x = x if x.is_contiguous() else x.contiguous()  # rows K apart
        x_words = x.dtype == torch.bfloat16 and x.data_ptr() % 4 == 0
        x_arg = x.view(torch.int32) if x_words else x
    per_program = c["block_n"] // 2 if glu is not None else c["block_n"]
    _mxfp4_gemv_bits_kernel[(P, triton.cdiv(n_out, per_program))](
        x_arg, x_row, expert, words, scales, bias_arg, out, n_out, K, alpha, limit,
        HAS_BIAS=bias is not None, X_WORDS=x_words, DECODE=MXFP4_DECODES.index(c["decode"]),
        PREFETCH=int(c["prefetch"]), GLU=ACTS[glu] if glu is not None else -1, X_LANES=lanes,
        LANES_OUT=lanes_out, ROUND={torch.bfloat16: 1, torch.float16: 2}.get(x_dtype, 0),
        BLOCK_N=c["block_n"], BLOCK_K=c["block_k"], num_warps=c["num_warps"], num_stages=c["num_stages"], **_pdl())
    return out_lanes if lanes_out else out
