"""gpt-oss checkpoints in the MXFP4 layout OpenAI ships load with their experts packed (MXFP4MoE): no float copy of
the experts at any moment (peak host memory measured against the bf16 size), the same logits as the dequantized
model, through giants.load, LLM(path) and GGUF files with MXFP4 tensors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import giants
from giants.checkpoint import hf_map, load, mxfp4, save
from giants.inference import LLM, SamplingParams
from giants.inference.mxfp4 import MXFP4MoE, dequantize_mxfp4


def _on_grid_gpt_oss():
    """tiny-gpt-oss with expert weights on the MXFP4 grid, so storing them is lossless."""
    cfg = giants.get_config("tiny-gpt-oss").replace(vocab_size=320)
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


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    path = tmp_path_factory.mktemp("mx") / "gpt-oss"
    model = _on_grid_gpt_oss()
    save(model, path, quantize="mxfp4")
    return path, model


def _packed_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, MXFP4MoE)
               for b in m.buffers())


def test_packed_load_equals_dequantized(shipped):
    path, model = shipped
    cfg = model.config
    packed = load(path, quantization="mxfp4")
    assert all(isinstance(layer.mlp, MXFP4MoE) for layer in packed.layers)
    assert not any(p.dtype == torch.uint8 for p in packed.parameters())
    dense = load(path)  # the default: dequantized
    for layer, ref in zip(packed.layers, dense.layers):
        m = layer.mlp
        assert torch.equal(dequantize_mxfp4(m.gate_up_blocks, m.gate_up_scales, torch.float32),
                           torch.cat([ref.mlp.w_gate, ref.mlp.w_up], dim=1))
        assert torch.equal(dequantize_mxfp4(m.down_blocks, m.down_scales, torch.float32), ref.mlp.w_down)
        assert torch.equal(m.b_gate_up, torch.cat([ref.mlp.b_gate, ref.mlp.b_up], dim=1))
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), dense(ids), rtol=0, atol=2e-5)
        torch.testing.assert_close(packed(ids), model(ids), rtol=0, atol=2e-5)
    E, D, F = cfg.n_experts, cfg.d_model, cfg.ffn_dim
    bf16 = cfg.n_layers * E * 3 * D * F * 2
    assert _packed_bytes(packed) == cfg.n_layers * E * 3 * D * F * 17 // 32  # 4.25 bits a weight
    assert _packed_bytes(packed) / bf16 == pytest.approx(17 / 64)


def test_llm_path_keeps_experts_packed_and_generates_the_dense_tokens(shipped):
    path, model = shipped
    sp = SamplingParams(temperature=0, max_tokens=8)
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    kw = dict(device="cpu", num_blocks=64, max_model_len=64)
    ref = [o.outputs[0].token_ids for o in LLM(load(path), **kw).generate(prompts, sp)]
    for q in (None, "mxfp4"):
        llm = LLM(str(path), quantization=q, **kw)
        assert all(isinstance(layer.mlp, MXFP4MoE) for layer in llm.model.layers), q
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == ref
    # FP8 asked for: the attention goes FP8, the experts stay MXFP4 (4.25 bits, fewer than FP8's 8)
    from giants.inference.fp8 import FP8Linear

    llm = LLM(str(path), quantization="fp8", **kw)
    assert isinstance(llm.model.layers[0].attn.q_proj, FP8Linear)
    assert isinstance(llm.model.layers[0].mlp, MXFP4MoE)


def test_mxfp4_quantization_of_a_float_checkpoint(tmp_path):
    model = _on_grid_gpt_oss()
    save(model, tmp_path / "bf", dtype=torch.float32)  # dense experts on disk
    packed = load(tmp_path / "bf", quantization="mxfp4")
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), model(ids), rtol=0, atol=2e-5)  # on the grid: lossless
    with pytest.raises(ValueError, match="mixture-of-experts"):
        save(giants.build(giants.get_config("tiny-llama").replace(vocab_size=320), seed=0), tmp_path / "d")
        load(tmp_path / "d", quantization="mxfp4")


def test_gguf_mxfp4_tensors_load_packed(tmp_path):
    from gguf import GGMLQuantizationType as Q

    from test_gguf import write_gguf

    model = _on_grid_gpt_oss()
    cfg = model.config
    mx = {f"blk.{i}.ffn_{g}_exps.weight": Q.MXFP4 for i in range(cfg.n_layers) for g in ("gate", "up", "down")}
    path = write_gguf(model, tmp_path / "o.gguf", "gpt-oss", overrides=mx)
    packed = load(path, quantization="auto")
    assert all(isinstance(layer.mlp, MXFP4MoE) for layer in packed.layers)
    dense = load(path)
    for layer, ref in zip(packed.layers, dense.layers):
        m = layer.mlp
        assert torch.equal(dequantize_mxfp4(m.gate_up_blocks, m.gate_up_scales, torch.float32),
                           torch.cat([ref.mlp.w_gate, ref.mlp.w_up], dim=1))
        assert torch.equal(dequantize_mxfp4(m.down_blocks, m.down_scales, torch.float32), ref.mlp.w_down)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), dense(ids), rtol=0, atol=2e-5)
    llm = LLM(str(path), device="cpu", num_blocks=32, max_model_len=64)
    assert isinstance(llm.model.layers[0].mlp, MXFP4MoE)


# ---- peak host memory -------------------------------------------------------------------------------
def _write_big(path, cfg) -> int:
    """A gpt-oss checkpoint in the shipped layout with random packed experts (nothing dense is ever built);
    returns the bf16 size of its experts."""
    from safetensors.torch import save_file

    meta = giants.build(cfg, device="meta")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in hf_map.giants_to_hf(dict(meta.state_dict()), cfg):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, K, N = t.shape
            tensors[name + "_blocks"] = torch.randint(0, 256, (E, N, K // 32, 16), generator=g, dtype=torch.uint8)
            tensors[name + "_scales"] = torch.randint(118, 122, (E, N, K // 32), generator=g, dtype=torch.uint8)
        else:
            tensors[name] = (torch.ones(t.shape) if "norm" in name else 0.02 * torch.randn(t.shape, generator=g)
                             ).to(torch.bfloat16)
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(hf))
    return cfg.n_layers * cfg.n_experts * 3 * cfg.d_model * cfg.ffn_dim * 2


_MEASURE = textwrap.dedent("""
    import json, re, sys
    import torch, giants

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    torch.ones(4) @ torch.ones(4)  # torch's lazy init before the baseline
    from giants.inference.mxfp4 import MXFP4MoE
    import giants.checkpoint.loading, giants.checkpoint.quantized  # noqa: F401
    # one-time imports before the baseline: the meta-device export of the name checks pulls in sympy & co (~150 MB)
    giants.checkpoint.loading._expected_hf(giants.checkpoint.loading.load_config(sys.argv[1]))
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    q = sys.argv[2] if sys.argv[2] != "none" else None
    m = giants.load(sys.argv[1], dtype=torch.bfloat16, quantization=q)
    packed = sum(b.numel() for x in m.modules() if isinstance(x, MXFP4MoE) for b in x.buffers())
    print(json.dumps({"peak": status("VmHWM") - base, "resident": status("VmRSS") - base, "packed": packed}))
""")


def _measure(path, q: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), q], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_packed_load_peak_host_memory_is_a_fraction_of_bf16(tmp_path):
    cfg = giants.get_config("tiny-gpt-oss").replace(d_model=512, ffn_dim=512, n_experts=32, vocab_size=512,
                                                    head_dim=64)
    bf16 = _write_big(tmp_path / "big", cfg)  # 2 layers x 32 experts x 3 x 512 x 512: 101 MB in bf16
    packed = _measure(tmp_path / "big", "auto")
    assert packed["packed"] == bf16 * 17 // 64  # 27 MB resident for the experts
    # the whole load, rest of the model and allocator slack included, peaks well under the bf16 experts alone
    assert packed["peak"] < 0.45 * bf16, packed
    dense = _measure(tmp_path / "big", "none")  # the dequantized load holds the experts in bf16 (at least)
    assert dense["resident"] > 0.95 * bf16 and dense["peak"] > 2 * packed["peak"], (dense, packed)
    print(f"\nbf16 experts {bf16 / 2**20:.0f} MiB; packed load: peak +{packed['peak'] / 2**20:.0f} MiB, resident "
          f"+{packed['resident'] / 2**20:.0f} MiB; dequantized load: peak +{dense['peak'] / 2**20:.0f} MiB")
