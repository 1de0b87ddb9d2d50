"""Packed MXFP4 experts and the int8 weight-only CPU mode."""

from __future__ import annotations

import copy

import torch

import giants
from giants.inference import LLM, SamplingParams
from giants.inference.engine import Engine
from giants.inference.mxfp4 import FP4_VALUES, MXFP4MoE, dequantize_mxfp4, pack_experts, quantize_mxfp4
from giants.inference.quant import Int8Linear
from test_engine import make_prompts, reference_greedy, run_engine  # noqa: I001


def test_mxfp4_dequantize_follows_the_format():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 32), generator=g, dtype=torch.int32).to(torch.uint8)  # 64 values a row
    scales = torch.randint(120, 134, (3, 5, 2), generator=g, dtype=torch.int32).to(torch.uint8)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    for e, r, k in [(0, 0, 0), (1, 3, 17), (2, 4, 63), (0, 2, 32)]:
        byte = int(blocks[e, r, k // 2])
        nib = byte & 15 if k % 2 == 0 else byte >> 4  # low nibble holds the even element
        want = FP4_VALUES[nib] * 2.0 ** (int(scales[e, r, k // 32]) - 127)
        assert float(got[e, r, k]) == want
    # quantize(dequantize(q)) == q: the format is a fixed point of the round trip
    b2, s2 = quantize_mxfp4(got)
    assert torch.equal(dequantize_mxfp4(b2, s2, torch.float32), got)


def test_mxfp4_moe_equals_dense_moe_on_dequantized_weights():
    cfg = giants.get_config("tiny-gpt-oss")
    model = giants.build(cfg, seed=0)
    moe = model.layers[0].mlp
    q = MXFP4MoE.from_moe(moe)
    F = cfg.ffn_dim
    with torch.no_grad():
        gu = dequantize_mxfp4(q.gate_up_blocks, q.gate_up_scales, torch.float32)
        moe.w_gate.copy_(gu[:, :F])
        moe.w_up.copy_(gu[:, F:])
        moe.w_down.copy_(dequantize_mxfp4(q.down_blocks, q.down_scales, torch.float32))
        x = torch.randn(2, 7, cfg.d_model)
        torch.testing.assert_close(q(x)[0], moe(x)[0], rtol=1e-5, atol=1e-5)


def test_engine_with_packed_experts_matches_one_at_a_time_greedy():
    model = pack_experts(copy.deepcopy(giants.build(giants.get_config("tiny-gpt-oss"), seed=0).eval()))
    prompts = make_prompts()[:8]
    ref = [reference_greedy(model, p, 6) for p in prompts]
    engine = Engine(model, block_size=4, num_blocks=64, max_num_batched_tokens=32)
    assert run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)) == ref


def test_int8_linear_and_llm_int8_mode():
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin.weight, lin.bias)
    x = torch.randn(5, 64)
    ref = lin(x)
    assert ((q(x) - ref).norm() / ref.norm()) < 1e-2
    llm = LLM(giants.build(giants.get_config("tiny-llama"), seed=0).eval(), weights="int8", num_blocks=64)
    assert isinstance(llm.model.layers[0].attn.q_proj, Int8Linear)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 6
