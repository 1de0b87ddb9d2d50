"""gpt-oss MXFP4: dequantize against the OCP formula and transformers' loader, quantize, write -> read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import giants
from giants.checkpoint import CheckpointError, load, mxfp4, save

E, N, K = 3, 8, 64  # experts, output rows, reduction dim (K/32 = 2 blocks per row)


def _random_packed(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(127 - 8, 127 + 4, (E, N, K // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


def _reference(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """OCP MX v1.0 written out: element k of row n is nibble (k % 2) of byte k // 2 of its 32-block; e2m1 has
    sign bit 3, exponent bits 2-1 (bias 1, 0 = subnormal), mantissa bit 0; scale is 2**(e8m0 - 127).
    Returned as (E, K, N), the layout of the bf16 weight it replaces."""
    b, s = blocks.numpy().astype(np.int64), scales.numpy().astype(np.int64)
    out = np.zeros((E, K, N), dtype=np.float64)
    for e in range(E):
        for n in range(N):
            for k in range(K):
                byte = b[e, n, k // 32, (k % 32) // 2]
                nib = byte & 0xF if k % 2 == 0 else byte >> 4
                sign, exp, man = nib >> 3, (nib >> 1) & 3, nib & 1
                mag = 0.5 * man if exp == 0 else 2.0 ** (exp - 1) * (1 + 0.5 * man)
                out[e, k, n] = (-1) ** sign * mag * 2.0 ** (s[e, n, k // 32] - 127)
    return out


def test_dequantize_equals_reference_formula():
    blocks, scales = _random_packed()
    got = mxfp4.dequantize(blocks, scales, torch.float64)
    assert got.shape == (E, K, N)
    np.testing.assert_array_equal(got.numpy(), _reference(blocks, scales))


def test_dequantize_equals_transformers_gpt_oss_loader():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_packed(1)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(mxfp4.dequantize(blocks, scales), ref)


def test_round_trip_lossless_on_grid():
    blocks, scales = _random_packed(2)
    w = mxfp4.dequantize(blocks, scales)
    b2, s2 = mxfp4.quantize(w)
    assert b2.shape == blocks.shape and s2.shape == scales.shape and b2.dtype == s2.dtype == torch.uint8
    assert torch.equal(mxfp4.dequantize(b2, s2), w)  # values identical (encodings may normalise)
    # blocks whose largest magnitude is 6 * 2**s have exactly one encoding: bytes come back bit-exact
    code = blocks.clone()
    code[..., 0] = (code[..., 0] & 0xF0) | 0x7  # element 0 of every block = +6
    w6 = mxfp4.dequantize(code, scales)
    b3, s3 = mxfp4.quantize(w6)
    assert torch.equal(s3, scales)
    assert torch.equal(mxfp4.dequantize(b3, s3), w6)
    nz = lambda b: torch.where((b & 0x7) == 0, b & 0xF0, b)  # noqa: E731 - -0 and +0 are the same value
    nz2 = lambda b: torch.where((b & 0x70) == 0, b & 0x0F, b)  # noqa: E731
    assert torch.equal(nz2(nz(b3)), nz2(nz(code)))


def test_quantize_rounds_to_nearest_grid_point():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(E, K, N, generator=g) * torch.logspace(-3, 2, N)  # rows of very different magnitude
    blocks, scales = mxfp4.quantize(w)
    q = mxfp4.dequantize(blocks, scales)
    # the shared exponent never lets a value saturate, and each value is a nearest grid point
    scale = torch.ldexp(torch.ones(scales.shape), scales.to(torch.float32) - 127)  # (E, N, K/32)
    scale = scale.repeat_interleave(32, dim=-1).transpose(1, 2)  # (E, K, N)
    assert (w.abs() <= 6 * scale).all()
    grid = torch.tensor(mxfp4.E2M1[:8])
    best = ((w.abs() / scale)[..., None] - grid).abs().min(-1).values * scale
    assert torch.allclose((w - q).abs(), best, rtol=0, atol=1e-6 * float(w.abs().max()))


def test_bad_packed_tensors_rejected():
    blocks, scales = _random_packed()
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(blocks[..., :8], scales)
    with pytest.raises(ValueError, match="uint8"):
        mxfp4.dequantize(blocks.int(), scales)
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(2, 48, 4))


def _on_grid_gpt_oss():
    cfg = giants.get_config("tiny-gpt-oss")
    model = giants.build(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1.0 if "norm" in n else 0.0) + 0.05 * torch.randn(p.shape, generator=g))
        for layer in model.layers:
            for name in ("w_gate", "w_up", "w_down"):
                p = getattr(layer.mlp, name)
                p.copy_(mxfp4.dequantize(*mxfp4.quantize(p.transpose(1, 2))).transpose(1, 2))
    return model


def test_checkpoint_write_read_lossless_and_transformers_loads_it(tmp_path):
    import transformers

    model = _on_grid_gpt_oss()
    cfg = model.config
    save(model, tmp_path / "q", quantize="mxfp4")
    hf_cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert hf_cfg["quantization_config"]["quant_method"] == "mxfp4"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        gu = f.get_slice("model.layers.0.mlp.experts.gate_up_proj_blocks")
        assert gu.get_shape() == [cfg.n_experts, 2 * cfg.ffn_dim, cfg.d_model // 32, 16] and gu.get_dtype() == "U8"
        assert f.get_slice("model.layers.0.mlp.experts.down_proj_scales").get_shape() == [
            cfg.n_experts, cfg.d_model, cfg.ffn_dim // 32]
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    again = load(tmp_path / "q")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # transformers reads the same files to the same logits. Dequantizing is asked for explicitly: otherwise a
    # transformers with the `kernels` package installed fetches MXFP4 kernels from the hub (tests run offline).
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert (again(ids) - hf(ids).logits).abs().max().item() <= 1e-4
        assert (again(ids) - model(ids)).abs().max().item() <= 1e-5


def test_mxfp4_checkpoint_with_wrong_block_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    save(_on_grid_gpt_oss(), tmp_path / "q", quantize="mxfp4")
    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.mlp.experts.down_proj_scales"
    sd[key] = sd[key][..., :1].contiguous()
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.experts\."
                                              r"down_proj_scales': shape"):
        load(tmp_path / "q")
    with pytest.raises(ValueError, match="gpt-oss"):
        save(giants.build(giants.get_config("tiny-llama")), tmp_path / "l", quantize="mxfp4")
