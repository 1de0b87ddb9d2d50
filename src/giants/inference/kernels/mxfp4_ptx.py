"""The inline-PTX text of the MXFP4 GEMV's decodes (kernels/mxfp4.py), built from lane tables as plain strings: the
fp16-bit decode (DECODE 1), the E4M3 one (2), the byte-permute one (3) and the f16x2-multiplying one (4, hfma).
Outputs $0..$7 are the word's 8 values (hfma: $0 the word's dot with x), the word is $8 (hfma: $1, x lanes $2..$5)."""

from __future__ import annotations

# (magnitude shift, sign shift, outputs): the lanes of _fp4x8's pure-Triton decode, in PTX (a negative shift
# is a right shift; sign shift 0: the sign bits are in place)
_F16_LANES = ((9, 12, (0, 4)), (5, 8, (1, 5)), (1, 4, (2, 6)), (-3, 0, (3, 7)))


def _shift(dst: str, by: int) -> str:
    return f"{'shl' if by > 0 else 'shr'}.b32 {dst}, $8, {abs(by)};"


def _ptx_f16() -> str:
    lines = ["{", ".reg .b32 a, b;", ".reg .b16 l, h;"]
    for mag, sign, (lo, hi) in _F16_LANES:
        lines += [_shift("a", mag)] + ([_shift("b", sign)] if sign else [])
        lines += ["and.b32 a, a, 0x0E000E00;", f"and.b32 b, {'b' if sign else '$8'}, 0x80008000;",
                  "or.b32 a, a, b;", "mov.b32 {l, h}, a;", f"cvt.f32.f16 ${lo}, l;", f"cvt.f32.f16 ${hi}, h;"]
    return "\n" + "\n".join(lines + ["}"]) + "\n"


# (e4m3x2 register, fp32 outputs of its low and high byte): DECODE 2's lanes (the E4M3 bytes of the low nibbles,
# elements 0, 2, 4, 6, are lo's bytes; of the high nibbles hi's)
_E4M3_LANES = (("a0", (0, 2)), ("a1", (4, 6)), ("a2", (1, 3)), ("a3", (5, 7)))


def _e4m3_bytes(word: str) -> list[str]:
    """PTX: the word's nibbles as E4M3 bytes in 16-bit registers a0..a3 (the lanes of _E4M3_LANES)."""
    return [f"shl.b32 lo, {word}, 2;", "and.b32 lo, lo, 0x1C1C1C1C;", f"shl.b32 t, {word}, 4;",
            "and.b32 t, t, 0x80808080;", "or.b32 lo, lo, t;", f"shr.b32 hi, {word}, 2;", "and.b32 hi, hi, 0x1C1C1C1C;",
            f"and.b32 t, {word}, 0x80808080;", "or.b32 hi, hi, t;", "mov.b32 {a0, a1}, lo;", "mov.b32 {a2, a3}, hi;"]


def _ptx_e4m3() -> str:
    lines = ["{", ".reg .b32 lo, hi, t, f;", ".reg .b16 a0, a1, a2, a3, l, h;"] + _e4m3_bytes("$8")
    for reg, (lo, hi) in _E4M3_LANES:
        lines += [f"cvt.rn.f16x2.e4m3x2 f, {reg};", "mov.b32 {l, h}, f;", f"cvt.f32.f16 ${lo}, l;",
                  f"cvt.f32.f16 ${hi}, h;"]
    return "\n" + "\n".join(lines + ["}"]) + "\n"




def _ptx_hfma() -> str:
    """DECODE 4: DECODE 2's E4M3 bytes, converted to f16x2 and multiplied by x as f16x2 pairs in the same lanes
    ($2..$5: lane q holds the x of _E4M3_LANES[q]'s elements), the 8 products summed in two f16 lanes by one mul
    and three fma, the two lanes widened and added: $0 = fp32 (dot of the word with x) * 2**-6."""
    lines = ["{", ".reg .b32 lo, hi, t, f, acc;", ".reg .b16 a0, a1, a2, a3, l, h;", ".reg .f32 fl, fh;"]
    lines += _e4m3_bytes("$1")
    for q, (reg, _) in enumerate(_E4M3_LANES):
        op = f"mul.rn.f16x2 acc, f, ${2 + q};" if q == 0 else f"fma.rn.f16x2 acc, f, ${2 + q}, acc;"
        lines += [f"cvt.rn.f16x2.e4m3x2 f, {reg};", op]
    lines += ["mov.b32 {l, h}, acc;", "cvt.f32.f16 fl, l;", "cvt.f32.f16 fh, h;", "add.f32 $0, fl, fh;", "}"]
    return "\n" + "\n".join(lines) + "\n"


# x in the lanes DECODE 4 multiplies by: the f16 pair of lane q is x[8w + _LANE_SRC[q][0]], x[8w + _LANE_SRC[q][1]]
_LANE_SRC = tuple(elems for _, elems in _E4M3_LANES)


# DECODE 3: no float conversion instruction. A byte-permute (PRMT) looks each 3-bit magnitude up in an 8-byte
# table whose byte, shifted to fp32 bits 22..29, is the exponent and top mantissa bit of E2M1 * 2**-2 (all normal
# fp32: 0.125 .. 1.5; code 0 -> byte 0 -> 0.0): byte k of LUT_LO | LUT_HI << 32 is the entry of code k.
_PRMT_LUT = (0x00, 0xF8, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF)


def _ptx_prmt() -> str:
    lo = sum(b << (8 * i) for i, b in enumerate(_PRMT_LUT[:4]))
    hi = sum(b << (8 * i) for i, b in enumerate(_PRMT_LUT[4:]))
    lines = ["{", ".reg .b32 m, sa, sb, ra, rb, p, s, tl, th;", f"mov.b32 tl, {lo:#010x};", f"mov.b32 th, {hi:#010x};",
             "and.b32 m, $8, 0x77777777;",  # the magnitudes; a selector nibble's bit 3 must be 0
             "prmt.b32 sa, m, m, 0x3120;",  # bytes m.b0, m.b2, m.b1, m.b3: nibbles c0 c1 c4 c5 | c2 c3 c6 c7
             "shr.b32 sb, sa, 16;",
             "prmt.b32 ra, tl, th, sa;",  # table bytes of c0, c1, c4, c5
             "prmt.b32 rb, tl, th, sb;"]  # of c2, c3, c6, c7
    # (register, shift placing a byte pair at bits 6..13 and 22..29, sign shift, outputs): each pair is two bf16
    # lanes, elements i and i + 4, whose signs (word bits 4i + 3, 4i + 19) one shift moves to bits 15 and 31
    for reg, shift, sign, (a, b) in (("ra", 6, 12, (0, 4)), ("ra", -2, 8, (1, 5)), ("rb", 6, 4, (2, 6)),
                                     ("rb", -2, 0, (3, 7))):
        lines += [f"{'shl' if shift > 0 else 'shr'}.b32 p, {reg}, {abs(shift)};", "and.b32 p, p, 0x3FC03FC0;"]
        lines += ([f"shl.b32 s, $8, {sign};"] if sign else []) + [
            f"and.b32 s, {'s' if sign else '$8'}, 0x80008000;", "or.b32 p, p, s;",
            f"shl.b32 ${a}, p, 16;", f"and.b32 ${b}, p, 0xFFFF0000;"]
    return "\n" + "\n".join(lines + ["}"]) + "\n"
