"""GPU checks of the MXFP4 expert GEMV at gpt-oss-120b shapes (gate_up N=5760, down N=2880, K=2880, 4 pairs): every
decode of the word-wise kernel (the pure-Triton one and both inline-PTX ones) and a spread of tiles against
dequantize_mxfp4 + a float64 matmul, and against the legacy byte-wise kernel. tests/test_mxfp4_gemv.py runs the
pure-Triton kernel under the interpreter on a CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import cuda


def _packed(E, N, K, g):
    blocks = torch.randint(0, 256, (E, N, K // 2), device="cuda", generator=g, dtype=torch.int32).to(torch.uint8)
    blocks.view(E, -1)[:, :256] = torch.arange(256, device="cuda", dtype=torch.uint8)  # every byte value
    scales = torch.randint(112, 128, (E, N, K // 32), device="cuda", generator=g, dtype=torch.int32).to(torch.uint8)
    scales[0, :8] = 1  # extreme exponents on a few rows: 2**-126 (results ~1e-37) and 2**73
    scales[1, :8] = 200
    return blocks, scales


def _reference(x, rows, ex, blocks, scales, bias):
    from giants.inference.mxfp4 import dequantize_mxfp4

    ref, mag = [], []
    for r, e in zip(rows.tolist(), ex.tolist()):
        w = dequantize_mxfp4(blocks[e], torch.full_like(scales[e], 127), torch.float64)
        w = w * torch.exp2(scales[e].double() - 127).repeat_interleave(32, -1)
        xs = x[r].double()
        b = bias[e].double() if bias is not None else 0.0
        ref.append(w @ xs + b)
        mag.append(w.abs() @ xs.abs() + (b.abs() if bias is not None else 0.0))
    return torch.stack(ref), torch.stack(mag)


@cuda
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N", [5760, 2880])
def test_mxfp4_gemv_decodes_and_tiles_at_gpt_oss_120b_shapes(N, bias):
    from giants.inference.kernels import mxfp4 as kmx

    E, K = 8, 2880
    g = torch.Generator(device="cuda").manual_seed(N + bias)
    blocks, scales = _packed(E, N, K, g)
    b = torch.randn(E, N, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(3, K, device="cuda", generator=g)
    rows = torch.tensor([0, 2, 1, 0], device="cuda")
    ex = torch.tensor([0, 1, E - 1, 3], device="cuda")
    for xdt in (torch.bfloat16, torch.float32):
        xx = x.to(xdt)
        ref, mag = _reference(xx, rows, ex, blocks, scales, b)
        tol = 4e-6 * mag + 2.0 ** -120  # fp32 sums; below ~1e-36 fp32 subnormals round (documented in kernels/mxfp4.py)
        legacy = kmx.mxfp4_gemv(xx, rows, ex, blocks, scales, b, out=torch.empty(4, N, device="cuda"),
                                impl="legacy")
        assert bool(((legacy.double() - ref).abs() <= tol).all())
        pf = next(c for c in kmx.MXFP4_GEMV_CONFIGS if c["prefetch"])
        wide = next(c for c in kmx.MXFP4_GEMV_CONFIGS if c["block_k"] >= 1024)
        for decode in kmx.MXFP4_DECODES:
            for c in (kmx.MXFP4_GEMV_CONFIGS[0], pf, wide):
                y = kmx.mxfp4_gemv(xx, rows, ex, blocks, scales, b, out=torch.empty(4, N, device="cuda"),
                                   decode=decode, **c)
                err = (y.double() - ref).abs()
                assert bool((err <= tol).all()), (xdt, decode, c, float((err / tol).max()))
        y = kmx.mxfp4_gemv(xx, rows, ex, blocks, scales, b)  # default: bits, output in x's dtype
        assert y.dtype == xdt
        assert bool(((y.double() - ref).abs() <= tol + 2.0 ** -8 * ref.abs()).all())
