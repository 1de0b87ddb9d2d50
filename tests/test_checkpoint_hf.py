"""HF directories both ways for every family's tiny twin, sharding, giants-only configs, tokenizer files."""

from __future__ import annotations

import json

import pytest
import torch

import giants
from giants import build, get_config
from giants.checkpoint import CheckpointError, load, save
from giants.checkpoint.loading import read_dir_config

from conftest import ALL_TINY, HF_TINY
from hf_utils import hf_model_from_config


def _random_model(name: str, seed: int = 0):
    """Our model with every parameter random (norms, sinks and biases included), so no mis-mapped tensor
    can hide behind an identity or zero initialisation."""
    cfg = get_config(name)
    model = build(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            base = 1.0 if ("norm" in n and cfg.norm_kind != "rmsnorm_plus_one") else 0.0
            p.copy_(base + (0.1 if p.dim() < 2 else 0.05) * torch.randn(p.shape, generator=g))
    return model


def _ids(cfg, T=40):
    windows = [w for w in cfg.windows if w]
    assert not windows or T > max(windows)
    return torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", HF_TINY)
def test_save_then_transformers_loads_equal_logits(name, tmp_path):
    import transformers

    model = _random_model(name)
    save(model, tmp_path / "ckpt", max_shard_size="1MB")  # forces several shards + index
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert "generation_config.json" in files and "giants_config.json" in files
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    ids = _ids(model.config)
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


@pytest.mark.parametrize("name", HF_TINY)
def test_transformers_saves_then_giants_loads_equal_logits(name, tmp_path):
    cfg = get_config(name)
    hf = hf_model_from_config(cfg)
    hf.save_pretrained(tmp_path, max_shard_size="1MB")
    ours = load(tmp_path)
    assert ours.config == cfg.replace(moe_z_loss_coef=ours.config.moe_z_loss_coef)
    assert not ours.training
    ids = _ids(cfg)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ALL_TINY)
def test_giants_round_trip_is_exact(name, tmp_path):
    model = _random_model(name)
    save(model, tmp_path / "c")
    again = giants.load(tmp_path / "c")
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_described_twin_saves_in_giants_format_and_refuses_hf(tmp_path):
    model = _random_model("tiny-gpt-oss-described")
    save(model, tmp_path / "d")
    assert not (tmp_path / "d" / "config.json").exists()
    assert read_dir_config(tmp_path / "d")[1] == "giants"
    with pytest.raises(ValueError, match="position='t5_bias'"):
        save(model, tmp_path / "e", format="hf")
    assert not (tmp_path / "e").exists()


def test_dtype_and_shard_size(tmp_path):
    model = _random_model("tiny-llama")
    save(model, tmp_path / "bf", dtype="bfloat16", max_shard_size="5GB")
    assert (tmp_path / "bf" / "model.safetensors").exists()
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load(tmp_path / "bf")
    assert loaded.embed.weight.dtype == torch.bfloat16  # dtype=None keeps the checkpoint's
    up = load(tmp_path / "bf", dtype=torch.float32)
    assert torch.equal(up.embed.weight, model.embed.weight.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="max_shard_size"):
        save(model, tmp_path / "x", max_shard_size="lots")


def test_overwrite_previous_checkpoint_but_not_other_dirs(tmp_path):
    a, b = _random_model("tiny-llama", 0), _random_model("tiny-llama", 1)
    save(a, tmp_path / "c", max_shard_size="1MB")
    save(b, tmp_path / "c")  # replaces, and the old shards and index must be gone
    assert not (tmp_path / "c" / "model.safetensors.index.json").exists()
    assert torch.equal(load(tmp_path / "c").embed.weight, b.embed.weight)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not hold a checkpoint"):
        save(a, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_save_with_tokenizer_writes_hf_tokenizer_files(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from giants.tokenizer import Tokenizer

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
    backend = Backend(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>"])
    tok = Tokenizer(backend, special={"bos_token": "<s>", "eos_token": "</s>"},
                    chat_template="{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}")
    save(_random_model("tiny-llama"), tmp_path / "c", tokenizer=tok)
    names = {p.name for p in (tmp_path / "c").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    gen = json.loads((tmp_path / "c" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 1 and gen["bos_token_id"] == 1  # tokenizer eos, config bos
    again = giants.load_tokenizer(tmp_path / "c")
    assert again.encode("ab a") == [4, 2] and again.eos_token_id == 1
    assert again.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi</s>"


def test_bad_dtype_and_format_arguments(tmp_path):
    model = _random_model("tiny-llama")
    with pytest.raises(ValueError, match="unknown dtype"):
        save(model, tmp_path / "a", dtype="float8")
    with pytest.raises(ValueError, match="format"):
        save(model, tmp_path / "a", format="onnx")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        load(tmp_path / "empty")


def test_saved_checkpoint_has_the_umask_permissions(tmp_path):
    """The directory is built under a temporary name; its mode (and the files', which safetensors writes
    0600) must be what the umask gives new files, so other users and services can read the checkpoint."""
    import os

    old = os.umask(0o022)
    try:
        save(_random_model("tiny-llama"), tmp_path / "c", max_shard_size="1MB")
    finally:
        os.umask(old)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "c").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-oss"])
def test_load_straight_to_cuda_in_bf16(name, tmp_path):
    model = _random_model(name)
    save(model, tmp_path / "c", quantize="mxfp4" if name == "tiny-gpt-oss" else None)
    cpu = load(tmp_path / "c", dtype="bfloat16")
    gpu = load(tmp_path / "c", dtype="bfloat16", device="cuda")
    for (k, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert b.device.type == "cuda" and b.dtype == a.dtype and torch.equal(a, b.cpu()), k
    ids = _ids(model.config)
    with torch.no_grad():
        want, got = cpu.float()(ids), gpu.float()(ids.cuda()).cpu()
    assert (want - got).abs().max().item() <= 1e-3
