"""Calibrated FP8 (giants.inference.gptq): GPTQ's rounding onto E4M3 against round to nearest, the calibration
data, the input Hessians, whole models and `giants convert --quantization ... --calibrate`."""

from __future__ import annotations

import json

import pytest
import torch

import giants
from giants.checkpoint import load
from giants.cli import main
from giants.inference.fp8 import FP8Linear, dequantize, quantize
from giants.inference.gptq import calibration_windows, gptq_fp8, input_hessians, quantize_model_gptq


def _inputs(n: int = 512, k: int = 96, seed: int = 0) -> torch.Tensor:
    """Correlated inputs (as a layer's activations are): rank-16 structure plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("block", [None, (16, 32)])
def test_gptq_beats_round_to_nearest_on_its_inputs(block):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1)) / 10
    x = _inputs()
    q, s = gptq_fp8(w, x.t() @ x, block)
    rq, rs = quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert torch.equal(s, rs)  # the scales are round to nearest's: only the chosen E4M3 values differ
    err = (x @ (dequantize(q, s, block) - w).t()).norm()
    err_rtn = (x @ (dequantize(rq, rs, block) - w).t()).norm()
    assert err < 0.7 * err_rtn, (float(err), float(err_rtn))
    assert (q.float() != rq.float()).any()


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """H = I: no error is worth moving to another column, so GPTQ picks exactly the nearest values."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    q, s = gptq_fp8(w, torch.eye(64), None, damp=0.0)
    assert torch.equal(q.float(), quantize(w, None)[0].float())


def test_gptq_edge_cases():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    x = _inputs(256, 32)
    x[:, 5] = 0  # an input that never fires: its Hessian row and column are zero
    q, s = gptq_fp8(w * 50, x.t() @ x, None)  # large weights: the moved errors must saturate, not become NaN
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="Hessian"):
        gptq_fp8(w, torch.eye(31))


def test_calibration_windows(tmp_path):
    tok = giants.load_tokenizer("smollm2-135m")
    f = tmp_path / "calib.txt"
    f.write_text("To be, or not to be, that is the question. " * 40)
    win = calibration_windows(f, tok, samples=3, length=16)
    assert win.shape == (3, 16) and win.dtype == torch.int64
    assert win[0].tolist() == tok.encode(f.read_text())[:16]
    from giants.train.corpus import corpus_path

    ds = calibration_windows(corpus_path("shakespeare"), None, samples=4, length=32)  # its train split
    assert ds.shape == (4, 32) and int(ds.max()) < 49152
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(f, tok, samples=2, length=100_000)
    with pytest.raises(FileNotFoundError, match="no such file"):
        calibration_windows(tmp_path / "missing.txt", tok)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        calibration_windows(bad, tok)


def test_input_hessians_are_the_inputs_products():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    tokens = torch.randint(0, 49152, (3, 24), generator=torch.Generator().manual_seed(0))
    seen = {}
    h0 = model.layers[0].attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", []).append(i[0]))
    h1 = model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.setdefault("d", []).append(i[0]))
    H = input_hessians(model, tokens, batch=2)
    h0.remove()
    h1.remove()
    assert len(H) == 7 * model.config.n_layers + 1  # and the head's input, the final norm's output
    hidden = model(tokens, return_hidden=True).reshape(-1, model.config.d_model).double()
    assert torch.allclose(H["head"].double(), hidden.t() @ hidden, rtol=1e-5, atol=1e-6)
    for key, name in (("q", "layers.0.attn.q_proj"), ("d", "layers.0.mlp.down_proj")):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[key]]).double()
        assert torch.allclose(H[name].double(), x.t() @ x, rtol=1e-5, atol=1e-6)
    # q, k and v read the same input, gate and up too: the same matrix
    assert torch.equal(H["layers.1.attn.q_proj"], H["layers.1.attn.v_proj"])
    assert torch.equal(H["layers.1.mlp.gate_proj"], H["layers.1.mlp.up_proj"])
    with pytest.raises(ValueError, match="vocabulary"):
        input_hessians(model, torch.full((1, 4), 10**6))


@pytest.mark.parametrize("name, q", [("tiny-llama", "fp8-block"), ("tiny-mixtral", "fp8+head")])
def test_quantize_model_gptq(name, q):
    model = giants.build(giants.get_config(name), seed=0).eval()
    tokens = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = model(tokens[:1]).detach()
    rep = quantize_model_gptq(model, tokens, q)
    lins = [getattr(getattr(layer, o), n) for layer in model.layers for o, ns in
            (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for n in ns if hasattr(getattr(layer, o), n)]
    assert lins and all(isinstance(m, FP8Linear) for m in lins)
    assert rep["calibrated_linears"] == len(lins) and rep["tokens"] == 128
    assert rep["output_error_rel"]["gptq"] < rep["output_error_rel"]["round_to_nearest"]
    assert rep["round_to_nearest"] == (["MoE experts"] if name == "tiny-mixtral" else [])
    assert rep["calibrated_head"] == q.endswith("+head") and isinstance(model.lm_head, FP8Linear) == q.endswith("+head")
    out = model(tokens[:1]).detach()
    assert torch.isfinite(out).all() and (out - ref).norm() < 0.1 * ref.norm()


def test_convert_writes_a_calibrated_fp8_checkpoint(tmp_path, capsys):
    from test_checkpoint_bad_input import _small_gguf

    src = _small_gguf(tmp_path / "small.gguf")  # tiny llama + a 256-token byte-level tokenizer
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 30)
    dst = tmp_path / "fp8"
    assert main(["convert", str(src), str(dst), "--quantization", "fp8-block", "--calibrate", str(text),
                 "--calibration-samples", "6", "--calibration-length", "48"]) == 0
    out = capsys.readouterr().out
    assert "by GPTQ" in out and "288 calibration tokens" in out and "of them FP8" in out
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    ours, ref = load(dst, quantization="auto"), load(src)
    assert any(isinstance(m, FP8Linear) for m in ours.modules())
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        a, b = ours(ids), ref(ids)
    assert (a - b).norm() < 0.05 * b.norm()
    # rounded to nearest without --calibrate; --calibrate alone or a bad option fail before any load
    assert main(["convert", str(src), str(tmp_path / "rtn"), "--quantization", "fp8"]) == 0
    assert "round to nearest" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "x"), "--calibrate", str(text)]) == 2
    assert "--quantization" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "y"), "--quantization", "fp9"]) == 2


def test_transformers_reads_a_calibrated_checkpoint(tmp_path):
    """A GPTQ-rounded model is an ordinary FP8 checkpoint: transformers loads it to giants' logits."""
    import transformers

    from giants.checkpoint import save
    from test_fp8 import ALIGNED, _twin

    model = _twin("tiny-llama", **ALIGNED)
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    quantize_model_gptq(model, tokens, "fp8-block")
    save(model, tmp_path / "c")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=2e-5)


def test_a_failed_quantization_leaves_the_model_as_it_was():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    tokens = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(3))
    H = input_hessians(model, tokens)
    last = f"layers.{model.config.n_layers - 1}.mlp.down_proj"
    H[last] = torch.eye(3)  # the last layer's fails, after every other layer was rounded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Hessian"):
        quantize_model_gptq(model, None, "fp8", hessians=H)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no Hessian for layers.0.attn.q_proj"):
        quantize_model_gptq(model, None, "fp8", hessians={})
