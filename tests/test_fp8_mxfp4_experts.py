"""quantization="fp8...+mxfp4": FP8 linears with the MoE experts packed MXFP4 (4.25 bits), the mix that puts
Mixtral-8x22B (~78 GB) on one 80 GB card. Every source: a built model, a preset, an HF checkpoint, a GGUF file."""

from __future__ import annotations

import pytest
import torch

import giants
from giants.checkpoint import load, save
from giants.inference import LLM, SamplingParams
from giants.inference.fp8 import FP8Linear, FP8MoE, parse_fp8, quantize_model
from giants.inference.mxfp4 import MXFP4MoE, dequantize_mxfp4


def _twin(name: str = "tiny-mixtral"):
    return giants.build(giants.get_config(name).replace(vocab_size=320), seed=0).eval()


def _kinds(model) -> tuple[set[type], set[type], bool]:
    """(expert module kinds, q_proj kinds, whether the head is FP8)."""
    return ({type(layer.mlp) for layer in model.layers}, {type(layer.attn.q_proj) for layer in model.layers},
            isinstance(model.lm_head, FP8Linear))


def test_options():
    o = parse_fp8("fp8-block+head+mxfp4")
    assert o.block == (128, 128) and o.head and o.mxfp4_experts
    assert not parse_fp8("fp8+head").mxfp4_experts
    for bad in ("fp8+mxfp4+mxfp4", "mxfp4+fp8", "fp8+mxfp8"):
        with pytest.raises(ValueError, match="quantization"):
            parse_fp8(bad)
    with pytest.raises(ValueError, match=r"'\+mxfp4' packs mixture-of-experts layers.*n_experts=0"):
        LLM("tiny-llama", quantization="fp8+mxfp4", device="cpu", num_blocks=16)
    with pytest.raises(ValueError, match="n_experts=0"):
        quantize_model(_twin("tiny-llama"), "fp8+mxfp4")


def test_built_model_equals_its_dequantized_parts():
    """quantize_model: every linear FP8, the experts MXFP4 (never FP8); the logits are those of the float model with
    each weight replaced by its dequantized value, and the engine decodes the model's own greedy tokens."""
    ref = _twin()
    model = quantize_model(_twin(), "fp8-block+head+mxfp4")
    assert _kinds(model) == ({MXFP4MoE}, {FP8Linear}, True)
    deq = _twin()
    with torch.no_grad():
        for layer, dl in zip(model.layers, deq.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(dl.attn, name).weight.copy_(getattr(layer.attn, name).weight.dequantize(torch.float32))
            F_ = dl.mlp.w_gate.shape[1]
            for e in range(dl.mlp.w_gate.shape[0]):
                gu = dequantize_mxfp4(layer.mlp.gate_up_blocks[e], layer.mlp.gate_up_scales[e], torch.float32)
                dl.mlp.w_gate[e].copy_(gu[:F_])
                dl.mlp.w_up[e].copy_(gu[F_:])
                dl.mlp.w_down[e].copy_(dequantize_mxfp4(layer.mlp.down_blocks[e], layer.mlp.down_scales[e],
                                                        torch.float32))
        deq.lm_head = torch.nn.Linear(deq.config.d_model, deq.config.vocab_size, bias=False)
        deq.lm_head.weight.copy_(model.lm_head.weight.dequantize(torch.float32))
        ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
        out, want, float_out = model(ids), deq(ids), ref(ids)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-4)
    assert 0 < (out - float_out).norm() / float_out.norm() < 0.2  # quantized, and still the same model
    seq, greedy = [3, 1, 4, 1, 5], []
    with torch.no_grad():
        for _ in range(6):
            greedy.append(int(model(torch.tensor([seq + greedy]))[0, -1].argmax()))
    llm = LLM(model, device="cpu", num_blocks=32, max_model_len=64)
    got = llm.generate([seq, [7, 7]], SamplingParams(temperature=0, max_tokens=6))
    assert got[0].outputs[0].token_ids == greedy


def test_preset_builds_packed_and_decodes():
    """A preset is drawn straight into FP8 linears and packed experts (no float experts at any moment) and
    decodes; the same string through LLM(Transformer) gives the same module kinds."""
    llm = LLM("tiny-mixtral", quantization="fp8+mxfp4", device="cpu", num_blocks=32, max_model_len=64)
    assert _kinds(llm.model) == ({MXFP4MoE}, {FP8Linear}, False)
    assert all(layer.mlp.gate_up_blocks.any() for layer in llm.model.layers)  # drawn, not left zero
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
    assert len(out) == 4
    llm2 = LLM(_twin(), quantization="fp8+mxfp4", device="cpu", num_blocks=32, max_model_len=64)
    assert _kinds(llm2.model) == ({MXFP4MoE}, {FP8Linear}, False)
    # experts with biases (gpt-oss): every tensor set, the biases zero as init_weights starts them (uninitialised
    # memory once made the CUDA graph and generic decodes disagree)
    oss = LLM("tiny-gpt-oss", quantization="fp8-block+head+mxfp4", device="cpu", num_blocks=32, max_model_len=64)
    assert _kinds(oss.model) == ({MXFP4MoE}, {FP8Linear}, True)
    for layer in oss.model.layers:
        assert not layer.mlp.b_gate_up.any() and not layer.mlp.b_down.any()
    assert all(torch.isfinite(t.float()).all() for t in oss.model.state_dict().values() if t.is_floating_point())


def test_checkpoints_load_into_the_mix(tmp_path):
    """An HF float checkpoint and an FP8 one (FP8 experts) load with '+mxfp4' into FP8 linears and MXFP4 experts:
    the float one to exactly what quantize_model makes in memory; a GGUF file likewise."""
    float_model = _twin()
    save(float_model, tmp_path / "f")
    got = load(tmp_path / "f", quantization="fp8+mxfp4")
    want = quantize_model(_twin(), "fp8+mxfp4")
    assert _kinds(got) == ({MXFP4MoE}, {FP8Linear}, False)
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(got(ids), want(ids), rtol=0, atol=1e-5)
    save(quantize_model(_twin(), "fp8-block"), tmp_path / "q")  # FP8 experts on disk
    assert isinstance(load(tmp_path / "q", quantization="auto").layers[0].mlp, FP8MoE)
    mixed = load(tmp_path / "q", quantization="fp8-block+mxfp4")
    assert _kinds(mixed) == ({MXFP4MoE}, {FP8Linear}, False)
    with torch.no_grad():
        rel = (mixed(ids) - want(ids)).norm() / want(ids).norm()
    assert rel < 0.2
    with pytest.raises(ValueError, match="n_experts=0"):
        save(_twin("tiny-llama"), tmp_path / "d")
        load(tmp_path / "d", quantization="fp8+mxfp4")


def test_gguf_loads_into_the_mix(tmp_path):
    from test_gguf import write_gguf

    cfg = giants.get_config("tiny-mixtral").replace(vocab_size=320, layer_windows=())  # llama.cpp's llama arch
    path = write_gguf(giants.build(cfg, seed=0).eval(), tmp_path / "m.gguf", "llama")
    got = load(path, quantization="fp8+mxfp4")
    assert _kinds(got) == ({MXFP4MoE}, {FP8Linear}, False)
    want = quantize_model(load(path), "fp8+mxfp4")
    ids = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(got(ids), want(ids), rtol=0, atol=1e-5)


def test_convert_refuses_the_mix(tmp_path, capsys):
    from giants.cli import main

    save(_twin(), tmp_path / "f")
    assert main(["convert", str(tmp_path / "f"), str(tmp_path / "o"), "--quantization", "fp8+mxfp4"]) != 0
    assert "load-time option" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_analysis_sizes_the_mix_and_plans_its_serve_command():
    """`giants fit --dtype fp8+mxfp4`: the experts at 4.25 bits, the attention at one byte plus a bf16 scale per row,
    the rest bf16: Mixtral-8x22B's 77.6 GB fit one 80 GB H100 at a short context, where mxfp4 alone (82.5 GB) does
    not; the plan is the `giants serve --quantization fp8+mxfp4` line, on one GPU."""
    import argparse

    from giants.analysis import cli as acli
    from giants.analysis.hardware import get_gpu
    from giants.analysis.memory import _block_matrices, weight_bytes, weight_bytes_breakdown
    from giants.analysis.perf import fit

    cfg = giants.get_config("mixtral-8x22b")
    attn = sum(o * i * n for k, o, i, n in _block_matrices(cfg) if k == "attn")
    attn_rows = sum(o * n for k, o, i, n in _block_matrices(cfg) if k == "attn")
    assert weight_bytes(cfg, "fp8+mxfp4") == weight_bytes(cfg, "mxfp4") - 2 * attn + attn + 2 * attn_rows
    b = weight_bytes_breakdown(cfg, "fp8+mxfp4")
    assert b.quantized_params == weight_bytes_breakdown(cfg, "fp8").quantized_params  # every block matrix
    h100 = get_gpu("h100-80gb")
    assert fit(cfg, h100, 1024, 1, "fp8+mxfp4").gpus == 1 and fit(cfg, h100, 1024, 1, "mxfp4").gpus > 1
    args = argparse.Namespace(dtype="fp8+mxfp4", model="mixtral-8x22b", context=1024, batch=1, kv_dtype=None,
                              num_gpus=None, max_gpus=8)
    plan = acli._serve_plan(args, cfg, h100)
    assert plan.command == "giants serve mixtral-8x22b --quantization fp8+mxfp4 --max-model-len 1024"
    args.model, dense = "llama-3.1-8b", giants.get_config("llama-3.1-8b")
    acli._serve_plan(args, dense, h100)
    assert args.serve_dtype == "bf16" and any("has none" in n for n in acli._serve_notes(args, plan))
