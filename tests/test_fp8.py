"""FP8 (E4M3) weights on the CPU: the two scale layouts against transformers' own quantizers (bit for bit), the
modules and the runners' fused weights, checkpoints both ways with transformers, the Triton kernels under the
interpreter, and quality on the real SmolLM2-135M weights (top-1 agreement, KL, Shakespeare perplexity)."""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import giants
from giants.checkpoint import CheckpointError, hf_map, load, save
from giants.inference import LLM, SamplingParams
from giants.inference.fp8 import (
    FP8Linear,
    FP8MoE,
    FP8Weight,
    dequantize,
    fp8_bytes,
    parse_fp8,
    quantize,
    quantize_model,
)
from subprocess_utils import Started

ALIGNED = dict(d_model=256, ffn_dim=512, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=512)  # 128-multiples


def _twin(name: str = "tiny-llama", **changes):
    return giants.build(giants.get_config(name).replace(**{"vocab_size": 320, **changes}), seed=0).eval()


# ---- formats ---------------------------------------------------------------------------------------
def test_quantizers_match_transformers_bit_for_bit():
    from transformers import FbgemmFp8Config, FineGrainedFP8Config
    from transformers.integrations import fbgemm_fp8
    from transformers.integrations.compressed_tensors import quantize_fp8_per_row
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    w = torch.randn(256, 384) * torch.logspace(-3, 0, 384)  # columns of very different size
    out = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config()))._quantize_one("p.weight", w)
    q, s = quantize(w, (128, 128))
    assert torch.equal(q.view(torch.uint8), out["p.weight"].view(torch.uint8))
    assert torch.equal(s, out["p.weight_scale_inv"])
    # fbgemm's per-row quantizer is a CUDA op; transformers' pure-torch twin of it computes the same thing
    saved = getattr(fbgemm_fp8, "quantize_fp8_per_row", None)
    fbgemm_fp8.quantize_fp8_per_row = quantize_fp8_per_row
    try:
        holder = torch.nn.Module()
        holder.p = fbgemm_fp8.FbgemmFp8Linear(384, 256, False)
        out = fbgemm_fp8.FbgemmFp8Quantize(types.SimpleNamespace(quantization_config=FbgemmFp8Config())).convert(
            {"p.weight": [w]}, model=holder)
    finally:
        if saved is not None:
            fbgemm_fp8.quantize_fp8_per_row = saved
    q, s = quantize(w, None)
    assert out["p.weight_scale"].shape == s.shape == (256, 1)
    assert torch.equal(q.view(torch.uint8), out["p.weight"].data.view(torch.uint8))
    assert torch.equal(s, out["p.weight_scale"].data)


@pytest.mark.parametrize("block", [None, (128, 128), (64, 32)])
def test_dequantize_is_q_times_its_block_scale(block):
    w = torch.randn(300, 200) * 3
    q, s = quantize(w, block)
    bn, bk = block or (1, 200)
    assert s.shape == (-(-300 // bn), -(-200 // bk))  # partial edge blocks
    ref = torch.empty(300, 200)
    for n in range(300):
        for kb in range(s.shape[1]):
            ref[n, kb * bk:(kb + 1) * bk] = q[n, kb * bk:(kb + 1) * bk].float() * s[n // bn, kb]
    assert torch.equal(dequantize(q, s, block), ref)
    assert (ref - w).norm() / w.norm() < 0.03  # E4M3: ~2.6% relative error per weight
    q2, s2 = quantize(ref, block)  # values on the grid come back (up to the float rounding of 448 / amax)
    torch.testing.assert_close(dequantize(q2, s2, block), ref, rtol=1e-6, atol=0)


def test_fp8_weight_is_an_f_linear_operand_and_keeps_its_dtypes():
    lin = torch.nn.Linear(96, 40)
    m = FP8Linear.from_float(lin.weight.detach(), lin.bias.detach(), (32, 32))
    x = torch.randn(3, 5, 96)
    ref = x @ m.weight.dequantize().t() + lin.bias
    torch.testing.assert_close(F.linear(x, m.weight, m.bias), ref)
    torch.testing.assert_close(m(x), ref)
    with pytest.raises(TypeError, match="not supported on an FP8 weight"):
        torch.matmul(x, m.weight)
    m = m.to(torch.bfloat16)  # the bias follows the model's dtype; the FP8 weight and its scales do not
    assert m.qweight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16
    # fused rows: block scales concatenate when the parts end on a block boundary, else per-row (1, bk) scales
    a, b = (FP8Linear.from_float(torch.randn(n, 96), None, (32, 32)) for n in (64, 40))
    assert FP8Weight.cat([a.weight, b.weight]).block == (32, 32)
    c = FP8Weight.cat([b.weight, a.weight])
    assert c.block == (1, 32)
    assert torch.equal(c.dequantize(), torch.cat([b.weight.dequantize(), a.weight.dequantize()]))


def test_options():
    assert parse_fp8("fp8").block is None and not parse_fp8("fp8").head
    assert parse_fp8("fp8-block+head").block == (128, 128) and parse_fp8("fp8-block+head").head
    with pytest.raises(ValueError, match="fp8-block"):
        parse_fp8("fp8+tail")
    with pytest.raises(ValueError, match="quantization: one of"):
        LLM(_twin(), quantization="fp4", device="cpu", num_blocks=16)


# ---- models and runners ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss"])
@pytest.mark.parametrize("q", ["fp8", "fp8-block+head"])
def test_quantized_model_through_the_engine(name, q):
    """Every linear and expert FP8 (the head too with +head); the engine's fused FP8 path (one Q|K|V and one gate|up
    FP8Weight per layer) decodes the tokens the model's own forward picks, and stays close to the float model."""
    ref = _twin(name)
    model = quantize_model(_twin(name), q)
    assert all(type(layer.attn.q_proj) is FP8Linear for layer in model.layers)
    assert all(isinstance(layer.mlp, FP8MoE) if ref.config.is_moe else type(layer.mlp.down_proj) is FP8Linear
               for layer in model.layers)
    assert isinstance(model.lm_head, FP8Linear) == q.endswith("+head")
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, want = model(ids), ref(ids)
    assert (out - want).norm() / want.norm() < 0.15  # random tiny twins; real quality: test_smollm2_quality
    seq, greedy = [3, 1, 4, 1, 5], []
    with torch.no_grad():
        for _ in range(6):
            greedy.append(int(model(torch.tensor([seq + greedy]))[0, -1].argmax()))
    llm = LLM(model, device="cpu", num_blocks=32, max_model_len=64)
    assert isinstance(llm.engine.runner.fused[0][0][0], FP8Weight)  # fused Q|K|V
    got = llm.generate([seq, [7, 7]], SamplingParams(temperature=0, max_tokens=6))
    assert got[0].outputs[0].token_ids == greedy


@pytest.mark.parametrize("name,q", [("tiny-mixtral", "fp8-block"), ("tiny-gpt-oss", "fp8"),
                                    ("tiny-gemma2", "fp8+head")])
def test_fp8_presets_build_without_a_float_copy(name, q):
    """A preset's FP8 weights are drawn matrix by matrix, yet equal the quantized float preset of the same seed
    (biases, sinks, every norm kind, a quantized head)."""
    from giants.inference.llm import random_model

    llm = LLM(name, quantization=q, device="cpu", num_blocks=32, max_model_len=64)
    want = quantize_model(random_model(name, torch.device("cpu"), torch.float32, 0), q)
    got = llm.model.state_dict()
    assert set(got) == set(want.state_dict())
    for k, v in want.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                           got[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else got[k]), k
    if name != "tiny-mixtral":
        return
    assert isinstance(llm.model.layers[0].mlp, FP8MoE)
    assert fp8_bytes(llm.model) > 0 and not any(type(m) is torch.nn.Linear and n.endswith("proj")
                                                for n, m in llm.model.named_modules())
    assert llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="int8"):
        LLM("tiny-llama", quantization="fp8", weights="int8", device="cpu", num_blocks=16)


# ---- checkpoints -----------------------------------------------------------------------------------
def _names(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss"])
@pytest.mark.parametrize("q", ["fp8", "fp8-block+head"])
def test_fp8_checkpoint_round_trip(tmp_path, name, q):
    model = quantize_model(_twin(name), q)
    save(model, tmp_path / "c")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == ("fp8" if "block" in q else "fbgemm_fp8")
    back, dense = load(tmp_path / "c", quantization="auto"), load(tmp_path / "c")
    assert any(isinstance(m, FP8Linear) for m in back.modules())
    assert not any(isinstance(m, (FP8Linear, FP8MoE)) for m in dense.modules())
    ids = torch.randint(0, 320, (2, 10))
    if model.config.tie_embeddings and q.endswith("+head"):
        # a tied head is the embedding on disk (transformers re-ties it): FP8 again when loaded with "+head"
        assert "lm_head.weight" not in _names(tmp_path / "c")
        with torch.no_grad():
            assert torch.equal(load(tmp_path / "c", quantization=q)(ids), model(ids))
        model = quantize_model(_twin(name), q.removesuffix("+head"))
    with torch.no_grad():
        want = model(ids)
        assert torch.equal(back(ids), want)
        torch.testing.assert_close(dense(ids), want, rtol=0, atol=1e-5)
    llm = LLM(str(tmp_path / "c"), device="cpu", num_blocks=32, max_model_len=64)  # as stored
    assert any(isinstance(m, FP8Linear) for m in llm.model.modules())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_transformers_loads_giants_fp8_checkpoints(tmp_path, name):
    """Block-scaled checkpoints: transformers without a GPU dequantizes them on load (its CPU path needs the
    weight dims to be multiples of the block, hence the 128-aligned twin), to giants' FP8 logits."""
    import transformers

    model = quantize_model(_twin(name, **ALIGNED), "fp8-block+head")
    save(model, tmp_path / "c")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=2e-5)


def _write_transformers_fp8(model, path, method: str):
    """The checkpoint transformers' quantizer ops write for `model` (their Fp8Quantize / FbgemmFp8Quantize over the
    HF state dict, their config's to_json_string), lm_head kept as it is."""
    from safetensors.torch import save_file
    from transformers import FbgemmFp8Config, FineGrainedFP8Config
    from transformers.integrations import fbgemm_fp8
    from transformers.integrations.compressed_tensors import quantize_fp8_per_row
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    cfg = model.config
    qc = FineGrainedFP8Config() if method == "fp8" else FbgemmFp8Config()
    stub = types.SimpleNamespace(quantization_config=qc)
    saved = getattr(fbgemm_fp8, "quantize_fp8_per_row", None)
    fbgemm_fp8.quantize_fp8_per_row = quantize_fp8_per_row  # fbgemm's is a CUDA op; this is its pure-torch twin
    tensors = {}
    for name, t in hf_map.giants_to_hf(dict(model.state_dict()), cfg):
        t = t.detach().contiguous()
        if name.endswith("_proj.weight") or ".experts." in name:
            if method == "fp8":
                tensors.update(Fp8Quantize(stub)._quantize_one(name, t))
            else:
                holder = torch.nn.Module()
                holder.p = fbgemm_fp8.FbgemmFp8Linear(t.shape[1], t.shape[0], False)
                out = fbgemm_fp8.FbgemmFp8Quantize(stub).convert({"p.weight": [t]}, model=holder)
                tensors[name], tensors[name + "_scale"] = out["p.weight"].data, out["p.weight_scale"].data
        else:
            tensors[name] = t
    if saved is not None:
        fbgemm_fp8.quantize_fp8_per_row = saved
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["quantization_config"] = json.loads(qc.to_json_string())
    (path / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("method", ["fp8", "fbgemm_fp8"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_giants_loads_checkpoints_in_transformers_fp8_formats(tmp_path, method, name):
    """As transformers' quantizers write them; giants keeps the stored FP8 values and scales (no float copy) and
    gives the logits of the dequantized weights (transformers' own dequantizing load for the block format)."""
    ref = _twin(name, **ALIGNED)
    _write_transformers_fp8(ref, tmp_path / "t", method)
    ours = load(tmp_path / "t", quantization="auto")
    lin = ours.layers[0].attn.q_proj
    assert type(lin) is FP8Linear and lin.per_channel == (method == "fbgemm_fp8")
    mine = quantize_model(_twin(name, **ALIGNED), "fp8" if method == "fbgemm_fp8" else "fp8-block")
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        got = ours(ids)
        assert torch.equal(got, mine(ids))  # the same FP8 values as giants' own quantizer makes
        torch.testing.assert_close(load(tmp_path / "t")(ids), got, rtol=0, atol=1e-5)  # dequantized load
        if method == "fp8":
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t", dtype=torch.float32).eval()
            torch.testing.assert_close(hf(ids).logits, got, rtol=0, atol=2e-5)


def test_bad_fp8_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save(quantize_model(_twin(**ALIGNED), "fp8-block"), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    for mutate, match in ((lambda d: d.pop(key), "without its scale"),
                          (lambda d: d.__setitem__(key, d[key][:1]), "scale F32"),
                          (lambda d: d.__setitem__("model.layers.0.self_attn.q_proj.input_scale", torch.ones(())),
                           "static activation scale")):
        bad = dict(sd)
        mutate(bad)
        save_file(bad, str(f))
        with pytest.raises(CheckpointError, match=match):
            load(tmp_path / "c", quantization="auto")
    save_file(sd, str(f))
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["quantization_config"]["activation_scheme"] = "static"
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation_scheme"):
        load(tmp_path / "c")


# ---- Triton kernels, under the interpreter ------------------------------------------------------------
_KERNELS = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from giants.inference.fp8 import FP8Weight, quantize
    from giants.inference.kernels import fp8 as k8

    torch.manual_seed(0)
    worst = 0.0
    for N, K, block in ((48, 200, None), (192, 576, (128, 128)), (40, 256, (1, 128))):
        w = torch.randn(N, K)
        if block == (1, 128):  # a fused weight's per-row scales
            w8 = FP8Weight.cat([FP8Weight(*quantize(w[:24], (128, 128)), (128, 128)),
                                FP8Weight(*quantize(w[24:], (128, 128)), (128, 128))])
            assert w8.block == block
        else:
            w8 = FP8Weight(*quantize(w, block), block)
        deq, b = w8.dequantize(), torch.randn(N)
        for M in (1, 3):
            for dt in (torch.float32, torch.bfloat16):
                x = torch.randn(M, K).to(dt)
                ref = x.float() @ deq.t() + b
                y = k8.fp8_gemv(x, w8, b.to(dt), config=k8.FP8_GEMV_CONFIGS[M % 2]).float()
                worst = max(worst, float((y - ref).norm() / ref.norm()))
        x = torch.randn(37, K)
        y = k8.fp8_gemm(x, w8, b)
        worst = max(worst, float((y - (x @ deq.t() + b)).norm() / (x @ deq.t() + b).norm()))
    from giants.model.mlp import gated_activation
    import giants

    for block in (None, (128, 128)):  # norm (+ residual) and GLU in the GEMV
        for glu in (None, "silu_glu", "clamped_swiglu"):
            N2, K = (192 if glu else 96), 256
            w8 = FP8Weight(*quantize(torch.randn(N2, K), block), block)
            deq, b = w8.dequantize(), torch.randn(N2)
            x, r, nw = torch.randn(3, K), torch.randn(3, K), torch.randn(K)
            y, res = k8.fp8_norm_gemv(x, r, nw, 1e-5, True, w8, b, glu=glu, config=k8.FP8_GEMV_CONFIGS[2])
            s = x + r
            ref = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * (nw + 1)) @ deq.t() + b
            if glu:
                cfg = giants.get_config("tiny-gpt-oss" if glu == "clamped_swiglu" else "tiny-llama")
                ref = gated_activation(ref[:, :N2 // 2], ref[:, N2 // 2:], cfg)
            assert torch.equal(res, s)
            worst = max(worst, float((y - ref).norm() / ref.norm()))
    E, N, K = 3, 40, 256
    for block in (None, (128, 128)):
        q, s = quantize(torch.randn(E, N, K), block)
        w8, b, x = FP8Weight(q, s, block), torch.randn(E, N), torch.randn(2, K)
        rows, ex = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0, 1, 2])
        y = k8.fp8_expert_gemv(x, rows, ex, w8, b)
        deq = w8.dequantize()
        ref = torch.stack([deq[e] @ x[r] + b[e] for r, e in zip(rows.tolist(), ex.tolist())])
        worst = max(worst, float((y - ref).norm() / ref.norm()))
    from giants.inference import kernels as tk

    for block in (None, (64, 64)):  # the batch-1 chain's GEMVs on FP8 weights
        N, K = 128, 256
        wo = FP8Weight(*quantize(torch.randn(N, K) / 16, block), block)
        wgu = FP8Weight(*quantize(torch.randn(128, N) / 16, block), block)
        x, r, nw = torch.randn(1, K), torch.randn(1, N), torch.rand(N) + 0.5
        s, hx, rstd = tk.gemv(x, wo, None, residual=(r, nw, 1e-5, False), block_n=8, block_k=64)
        ref = x @ wo.dequantize().t() + r
        assert torch.allclose(rstd.rstd(), torch.rsqrt(s.pow(2).mean() + 1e-5).reshape(1), rtol=1e-5)
        worst = max(worst, float((s - ref).norm() / ref.norm()))
        y = tk.gemv(hx, wgu, None, scale=rstd, glu="silu_glu", block_n=4, block_k=64)
        ref = tk.glu(tk.rmsnorm(s, nw, 1e-5, False) @ wgu.dequantize().t(), "silu_glu")
        worst = max(worst, float((y - ref).norm() / ref.norm()))
        H, Hkv, D = 4, 2, 16
        wqkv = FP8Weight(*quantize(torch.randn((H + 2 * Hkv) * D, N) / 8, block), block)
        ang = torch.rand(1, D // 2) * 6
        out = []
        for w in (wqkv, wqkv.dequantize()):  # FP8 against the float kernel on the dequantized weight
            q, kc, vc = torch.empty(1, H, D), torch.zeros(4, 4, Hkv, D), torch.zeros(4, 4, Hkv, D)
            tk.qkv_rope_gemv(hx, w, None, rstd, ang.cos(), ang.sin(), q, kc, vc, torch.tensor([5]), H, Hkv,
                             block_n=4, block_k=64)
            out.append(torch.cat([q.flatten(), kc.flatten(), vc.flatten()]))
        assert out[0].abs().sum() > 0
        worst = max(worst, float((out[0] - out[1]).norm() / out[1].norm()))
    print(worst)
""")


@pytest.fixture(scope="module")
def interpreted():
    """The interpreter scripts, started together (the interpreter runs on one core): the kernels, the runner's batch-2
    fused models and its batch-1 chain, each a fresh process, since the interpreter is chosen when the kernels are
    first imported. Each test waits for its own."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    started = {"kernels": Started([sys.executable, "-c", _KERNELS], env, timeout=900),
               **{part: Started([sys.executable, "-c", _RUNNER, part], env, timeout=900)
                  for part in ("fused_models", "chain")}}
    yield started
    for s in started.values():  # none left running (a test selected alone needs only its own)
        s.close()


def test_triton_kernels_under_the_interpreter(interpreted):
    """The GEMV (row-wise, 128x128 blocks with partial edges, fused per-row scales; fp32 and bf16 activations), with
    the norm and GLU fused in, the expert-indexed GEMV, the weight-only GEMM, and the batch-1 chain's GEMVs (residual,
    next norm, rstd; GLU; QKV with rotary and KV write) on FP8 weights against dequantize-then-matmul.
    tests/test_cuda_fp8.py runs them on a GPU."""
    rc, stdout, stderr = interpreted["kernels"].result()
    assert rc == 0, stderr[-3000:]
    assert float(stdout.strip().splitlines()[-1]) < 1e-2  # bf16 activations round to 3 digits


_RUNNER = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, giants
    from giants.inference.cuda_runner import CudaModelRunner
    from giants.inference.engine import Engine
    from giants.inference.fp8 import quantize_model
    from giants.inference.params import SamplingParams

    def cuda_runner(e):
        r = CudaModelRunner(e.model, e.kv, max_num_seqs=4, max_model_len=64, use_graphs=False)
        r.fuse_fp8_norm = True  # on by default on CUDA only: the norm + GLU FP8 GEMV
        return r

    def fused_models():  # the norm / linear / GLU steps and the FP8 MoE, batch 2
        for name, q in (("tiny-llama", "fp8-block+head"), ("tiny-gpt-oss", "fp8"), ("tiny-gemma2", "fp8")):
            cfg = giants.get_config(name).replace(vocab_size=320)
            outs = []
            for fused in (False, True):
                model = quantize_model(giants.build(cfg, seed=0).eval(), q)
                make = cuda_runner if fused else None
                eng = Engine(model, None, max_model_len=64, num_blocks=32, max_num_seqs=4, device=torch.device("cpu"),
                             make_runner=make, cpu_onednn=False)
                for i, p in enumerate([[1, 2, 3], [4, 5, 6, 7, 8]]):
                    eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=5))
                done = {}
                while eng.has_unfinished_requests():
                    done.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
                if fused:
                    assert eng.runner.fast and {f[1][0] for f in eng.runner.fused} <= {"dense", "fp8moe"}
                outs.append(done)
            assert outs[0] == outs[1], (name, outs)

    def chain():
        # batch 1 as the chain of FP8 GEMVs (chain forced: on the GPU the runner times it against the plain path)
        for q in ("fp8-block+head",):  # the kernels' per-channel layout: the kernel checks above
            cfg = giants.get_config("tiny-llama").replace(vocab_size=320)
            outs = []
            for chain in (None, True):  # the generic runner, the chain
                def chained(e, chain=chain):
                    r = cuda_runner(e)
                    r.chain = chain
                    return r
                model = quantize_model(giants.build(cfg, seed=0).eval(), q)
                eng = Engine(model, None, max_model_len=64, num_blocks=32, max_num_seqs=4, device=torch.device("cpu"),
                             make_runner=chained if chain is not None else None, cpu_onednn=False)
                done = {}
                for i, p in enumerate([[1, 2, 3], [4, 5, 6, 7, 8]]):  # one at a time: batch-1 steps
                    eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=5))
                    while eng.has_unfinished_requests():
                        done.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
                if chain:
                    assert all(eng.runner.chain_layers) and any(k[0] == "chain-qkv" for k in eng.runner.gemv_choice)
                outs.append(done)
            assert outs[0] == outs[1], (q, outs)

    for part in sys.argv[1:]:  # one or both parts (a process each runs them at the same time)
        globals()[part]()
    print("ok")
""")


def test_fused_cuda_decode_of_fp8_models_under_the_interpreter(interpreted):
    """CudaModelRunner's fused decode forward (FP8Weights in its norm / linear / GLU steps, the expert-indexed FP8
    GEMV for MoE, and at batch 1 the chain of FP8 GEMVs) run eagerly on the CPU under the Triton interpreter: the
    generic runner's tokens."""
    for part in ("fused_models", "chain"):
        rc, stdout, stderr = interpreted[part].result()
        assert rc == 0 and stdout.strip().endswith("ok"), (part, stderr[-3000:])


# ---- quality on the real SmolLM2-135M ------------------------------------------------------------------
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "Water boils at a temperature of", "The three primary colors are", "To be, or not to be, that is"]


@pytest.fixture(scope="module")
def smollm2_eval():
    """(tokenizer, Shakespeare windows, fp32 perplexity and logits): 8 windows of 256 tokens spread over the
    validation split, then the prompts."""
    from giants.train.corpus import corpus_path
    from giants.train.data import TokenStream, load_meta

    path = corpus_path("shakespeare")
    meta = load_meta(path)
    ts = TokenStream(path, "val", meta)
    n, W, L = meta["splits"]["val"]["tokens"], 8, 256
    windows = torch.stack([torch.from_numpy(ts.get(int(i * (n - L - 1) / (W - 1)), L + 1).astype("int64"))
                           for i in range(W)])
    tok = giants.load_tokenizer("smollm2-135m")
    return (tok, windows, *_evaluate(giants.load("smollm2-135m"), tok, windows))


def _evaluate(model, tok, windows):
    nll, logits = 0.0, []
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            x = windows[i:i + 4]
            lg = model(x[:, :-1]).float()
            nll += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            logits.append(lg.reshape(-1, lg.shape[-1]))
        logits += [model(torch.tensor([tok.encode(p)]))[0].float() for p in PROMPTS]
    return math.exp(nll / windows[:, 1:].numel()), torch.cat(logits)


# measured here (docs/inference.md, "FP8"): perplexity +1.70% / +2.00% / +3.28%, top-1 0.882 / 0.905 / 0.836, KL
# 0.031 / 0.023 / 0.050 for fp8 / fp8-block / fp8+head. The goal was 1%: E4M3 keeps 3 mantissa bits, 2.6% rms error
# per weight whatever the scale (test_smollm2_fp8_is_torchs_e4m3_cast: exactly what torch's own cast gives), and this
# 135M model feels it. The KL bounds sit ~1.3x above the measured values: BLAS differences move them by ~1e-4, while
# a truncating cast (twice the rms error: ~4x the KL), an FP8 head under "fp8" (0.050 > 0.04) or a wrong scale layout
# (orders of magnitude) fail them.
@pytest.mark.parametrize("q, ppl_bound, top1_bound, kl_bound", [
    ("fp8", 0.03, 0.85, 0.04), ("fp8-block", 0.035, 0.85, 0.032), ("fp8+head", 0.05, 0.80, 0.065)])
def test_smollm2_quality(smollm2_eval, q, ppl_bound, top1_bound, kl_bound):
    tok, windows, ppl0, lg0 = smollm2_eval
    model = giants.load("smollm2-135m", quantization=q)  # the GGUF, quantized as it is read
    assert fp8_bytes(model) > 0
    ppl, lg = _evaluate(model, tok, windows)
    top1 = (lg.argmax(-1) == lg0.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(lg, -1), F.log_softmax(lg0, -1), log_target=True, reduction="batchmean").item()
    print(f"\n{q}: perplexity {ppl:.3f} vs fp32 {ppl0:.3f} ({100 * (ppl / ppl0 - 1):+.2f}%), top-1 agreement "
          f"{top1:.4f} over {lg.shape[0]} positions, KL(fp32 || fp8) {kl:.4f}")
    assert abs(ppl / ppl0 - 1) < ppl_bound and top1 > top1_bound and kl < kl_bound


@pytest.fixture(scope="module")
def smollm2_hessians():
    """The float SmolLM2-135M's block-linear input Hessians over 16 windows of 256 tokens of the Shakespeare train
    split (the validation split, where the perplexity is measured, is not seen)."""
    from giants.inference.gptq import calibration_windows, input_hessians
    from giants.train.corpus import corpus_path

    return input_hessians(giants.load("smollm2-135m"), calibration_windows(corpus_path("shakespeare"), None, 16, 256))


# GPTQ's rounding (giants.inference.gptq; `giants convert --quantization q --calibrate DATA`): the same E4M3 grid
# and scales as above, other values. Measured here (8 windows + prompts): fp8 +1.22%, top-1 0.925, KL 0.0114;
# fp8-block +0.26%, 0.937, 0.0117. On 64 windows (benchmarks/investigations/fp8_quality.py, docs/inference.md)
# the perplexity is +0.38% / +0.20% (+- 0.18 / 0.16): within the 1% goal. Over these 2,091 positions a
# perplexity moves +-0.4% by chance, so the bounds are on KL and top-1 (~1.3x the measured KL: round to
# nearest's 0.031 / 0.023 fails them), with a 2% sanity bound on perplexity.
@pytest.mark.parametrize("q, top1_bound, kl_bound", [("fp8", 0.91, 0.015), ("fp8-block", 0.91, 0.015)])
def test_smollm2_quality_gptq(smollm2_eval, smollm2_hessians, q, top1_bound, kl_bound):
    from giants.inference.gptq import quantize_model_gptq

    tok, windows, ppl0, lg0 = smollm2_eval
    model = giants.load("smollm2-135m")
    rep = quantize_model_gptq(model, None, q, hessians=smollm2_hessians)
    assert rep["output_error_rel"]["gptq"] < 0.7 * rep["output_error_rel"]["round_to_nearest"]
    ppl, lg = _evaluate(model, tok, windows)
    top1 = (lg.argmax(-1) == lg0.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(lg, -1), F.log_softmax(lg0, -1), log_target=True, reduction="batchmean").item()
    print(f"\n{q} (GPTQ): perplexity {ppl:.3f} vs fp32 {ppl0:.3f} ({100 * (ppl / ppl0 - 1):+.2f}%), top-1 agreement "
          f"{top1:.4f} over {lg.shape[0]} positions, KL(fp32 || fp8) {kl:.4f}, output error "
          f"{rep['output_error_rel']['gptq']:.4f} vs {rep['output_error_rel']['round_to_nearest']:.4f}")
    assert abs(ppl / ppl0 - 1) < 0.02 and top1 > top1_bound and kl < kl_bound


def _e4m3_reference(w: torch.Tensor, block: int | None) -> torch.Tensor:
    """torch's own float8_e4m3fn cast (round to nearest even) with float32 amax / 448 scales, without giants' code:
    per output row, or per block x block tile as transformers' Fp8Quantize writes it (q = w * (448 / amax))."""
    if block is None:
        s = w.abs().amax(1, keepdim=True) / 448.0
        return (w / s).to(torch.float8_e4m3fn).float() * s
    out = torch.empty_like(w)
    for r in range(0, w.shape[0], block):
        for c in range(0, w.shape[1], block):
            t = w[r:r + block, c:c + block]
            inv = 448.0 / t.abs().amax()
            out[r:r + block, c:c + block] = (t * inv).to(torch.float8_e4m3fn).float() * (1.0 / inv)
    return out


def test_smollm2_fp8_is_torchs_e4m3_cast():
    """Every block linear of the real SmolLM2-135M, quantized on load, dequantizes to exactly what torch's own E4M3
    cast gives with float32 amax scales (so the perplexity cost is E4M3's, not giants'); embeddings, norms and the
    head stay float32 under "fp8"; the cast rounds to nearest (not toward zero)."""
    x = torch.tensor([[448.0, 1.0625, 1.07, -1.07, 0.0]])  # amax 448: scale 1, the cast itself
    assert FP8Weight(*quantize(x, None), None).dequantize()[0].tolist() == [448.0, 1.0, 1.125, -1.125, 0.0]
    ref = giants.load("smollm2-135m")
    for opt, block in (("fp8", None), ("fp8-block", 128)):
        model = giants.load("smollm2-135m", quantization=opt)
        n = 0
        for lr, lq in zip(ref.layers, model.layers):
            for owner, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 ("mlp", ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    w = getattr(getattr(lr, owner), name).weight.detach()
                    mq = getattr(getattr(lq, owner), name)
                    assert isinstance(mq, FP8Linear), name
                    got, want = mq.weight.dequantize(), _e4m3_reference(w, block)
                    # per channel: the same float32 ops, bit for bit; blocks: the scale's reciprocal rounds once
                    assert torch.equal(got, want) if block is None else \
                        (got - want).abs().max() <= 2e-7 * want.abs().max(), name
                    n += 1
        assert n == 7 * len(ref.layers)
        assert model.embed.weight.dtype == torch.float32 and not isinstance(model.lm_head, FP8Linear)
        assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if "norm" in name)
