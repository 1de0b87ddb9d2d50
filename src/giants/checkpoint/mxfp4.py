"""MXFP4 (OCP microscaling FP4) as gpt-oss checkpoints store their expert weights.

On disk, for a bf16 weight W of HF shape (E, K, N) (gate_up_proj: K = d_model, N = 2F; down_proj:
K = F, N = d_model), the quantised tensors are laid out along the *transposed* matrix W^T (E, N, K):
  `*_blocks` uint8 (E, N, K/32, 16): 32 e2m1 values per block, two per byte, low nibble first;
  `*_scales` uint8 (E, N, K/32): one shared e8m0 exponent per block, biased by 127.
value = e2m1[nibble] * 2**(scale - 127). This is the layout of openai/gpt-oss-* and of transformers'
integrations/mxfp4.py (`convert_moe_packed_tensors`), which we mirror exactly.
"""

from __future__ import annotations

import torch

BLOCK = 32
# e2m1 code -> value: sign bit 3, exponent bits 2..1, mantissa bit 0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0


class ScaleError(ValueError):
    """A scale byte 0xFF: E8M0's NaN (OCP MX v1.0), which 2**(255 - 127) would decode to inf."""


def check_scales(scales: torch.Tensor) -> None:
    """Refuse a NaN scale (0xFF), naming the first such block by its index into `scales`; one vectorised
    comparison over the scales (1/16 of the blocks' bytes)."""
    bad = scales == 0xFF
    if bool(bad.any()):
        flat = bad.reshape(-1)
        first = int(flat.to(torch.uint8).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(scales.shape)))
        raise ScaleError(f"scale 0xFF (E8M0 NaN) at block {idx} ({int(flat.sum())} such blocks of {flat.numel()})")


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks (..., N, K/32, 16) uint8 + scales (..., N, K/32) uint8 -> W (..., K, N)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
                         f"(expected blocks = scales shape + ({BLOCK // 2},))")
    check_scales(scales)
    lut = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)  # (..., N, K/32, 32): element 2j = low nibble of byte j
    exp = scales.to(torch.int32) - 127
    vals = torch.ldexp(vals, exp.unsqueeze(-1).to(torch.float32))
    w_t = vals.flatten(-2)  # (..., N, K)
    return w_t.transpose(-1, -2).to(dtype).contiguous()


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., K, N) -> (blocks (..., N, K/32, 16), scales (..., N, K/32)), K a multiple of 32.

    Shared exponent per block: the smallest e with max|x| <= 6 * 2**e, i.e. e = ceil(log2(max/6)), so no
    value saturates; each value then rounds to the nearest e2m1 grid point (ties to even code). Values
    already on an MXFP4 grid with that exponent come back bit-exact."""
    if w.shape[-2] % BLOCK:
        raise ValueError(f"MXFP4: reduction dim {w.shape[-2]} is not a multiple of {BLOCK}")
    x = w.detach().to(torch.float32).transpose(-1, -2)  # (..., N, K)
    x = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)  # (..., N, K/32, 32)
    amax = x.abs().amax(dim=-1)
    # frexp gives amax/6 = m * 2**e with m in [0.5, 1): ceil(log2) is e, or e - 1 when m == 0.5 exactly.
    m, e = torch.frexp(amax / E2M1_MAX)
    e = torch.where(m == 0.5, e - 1, e)
    e = torch.where(amax > 0, e, torch.full_like(e, -127)).clamp(-127, 127)
    scaled = x / torch.ldexp(torch.ones_like(amax), e.to(torch.float32)).unsqueeze(-1)
    grid = torch.tensor(E2M1[:8], dtype=torch.float32, device=x.device)  # magnitudes, codes 0..7
    # nearest magnitude; ties broken towards the even code (round-half-to-even on the e2m1 grid)
    dist = (scaled.abs().unsqueeze(-1) - grid).abs()
    best = dist.min(dim=-1, keepdim=True).values
    cand = (dist == best)
    even = cand & (torch.arange(8, device=x.device) % 2 == 0)
    code = torch.where(even.any(-1), even.float().argmax(-1), cand.float().argmax(-1))
    code = code + 8 * (scaled < 0).long() * (code > 0).long()  # keep +0 for zeros
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)  # (..., N, K/32, 16)
    scales = (e + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
