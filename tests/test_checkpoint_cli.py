"""`giants inspect` and `giants convert` on tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import giants
from giants.checkpoint import load, save
from giants.cli import main


def _model(name: str):
    model = giants.build(giants.get_config(name), seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _inspect_json(capsys, src) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(src), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_hf_dir_sharded_and_mxfp4(tmp_path, capsys):
    save(_model("tiny-gpt-oss"), tmp_path / "g", quantize="mxfp4", max_shard_size="1MB")
    info = _inspect_json(capsys, tmp_path / "g")
    assert info["format"] == "hf" and info["model_type"] == "gpt_oss"
    assert info["quantization"]["quant_method"] == "mxfp4"
    assert len(info["files"]) > 1 and info["config"]["n_experts"] == 8
    by = {t["name"]: t for t in info["tensors"]}
    blocks = by["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert blocks["quant"] == "MXFP4" and blocks["dtype"] == "U8" and blocks["shape"] == [8, 128, 2, 16]
    assert by["model.embed_tokens.weight"]["shape"] == [49152, 64]
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])
    # the rich table too
    assert main(["inspect", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "MXFP4" in out and "gate_up_proj_blocks" in out and "n_experts" in out


def test_inspect_gguf_lists_quant_types(tmp_path, capsys):
    from gguf import GGMLQuantizationType as Q

    from test_gguf import random_model, write_gguf

    cfg = giants.get_config("tiny-llama").replace(rope_scaling="none", rope_factor=1.0)
    write_gguf(random_model(cfg), tmp_path / "m.gguf", "llama", Q.Q8_0, overrides={"blk.0.ffn_up.weight": Q.Q4_1})
    info = _inspect_json(capsys, tmp_path / "m.gguf")
    assert info["format"] == "gguf" and info["architecture"] == "llama"
    assert info["quant_types"]["Q4_1"] == 1 and info["quant_types"]["Q8_0"] >= 10
    by = {t["name"]: t for t in info["tensors"]}
    assert by["blk.0.ffn_up.weight"]["quant"] == "Q4_1" and by["blk.0.ffn_up.weight"]["shape"] == [192, 64]
    assert info["config"]["d_model"] == 64 and info["metadata"]["llama.block_count"] == 2


def test_convert_hf_dir_to_bf16_and_described_to_giants(tmp_path, capsys):
    save(_model("tiny-mixtral"), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    got = load(tmp_path / "bf")
    assert got.embed.weight.dtype == torch.bfloat16 and got.config.n_experts == 8
    d = _model("tiny-gpt-oss-described")
    save(d, tmp_path / "d")
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "d2")]) == 2  # HF cannot express t5_bias
    assert "position='t5_bias'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "d3"), "--giants"]) == 0
    assert torch.equal(load(tmp_path / "d3").rel_bias.weight, d.rel_bias.weight)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("giants inspect: error:") and err.count("\n") == 1
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    assert main(["convert", str(tmp_path / "junk.gguf"), str(tmp_path / "o")]) == 2
    assert "junk.gguf: not a GGUF file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect"])


def test_convert_gguf_with_tokenizer(tmp_path, capsys):
    import transformers

    from test_checkpoint_bad_input import _small_gguf

    src = _small_gguf(tmp_path / "small.gguf")  # tiny llama + a 256-token byte-level tokenizer
    assert main(["convert", str(src), str(tmp_path / "hf")]) == 0
    assert "tokenizer" in capsys.readouterr().out
    ours = load(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("hello, world") == giants.load_tokenizer(src).encode("hello, world")
