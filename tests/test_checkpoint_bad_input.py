"""Bad and hostile checkpoints: one error class naming file and tensor, nothing unpickled, no half-loaded
model, and fuzzed headers/bytes of safetensors and GGUF that never crash, hang or allocate without bound."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import giants
from giants.checkpoint import CheckpointError, load, save
from giants.checkpoint import safetensors_io as sio
from giants.tokenizer import load_tokenizer

SMALL = giants.get_config("tiny-llama").replace(vocab_size=256, n_layers=1, rope_scaling="none", rope_factor=1.0)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "small"
    save(giants.build(SMALL, seed=0), path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    sd = fn(load_file(path / "model.safetensors"))
    save_file(sd, path / "model.safetensors")


def test_error_class():
    assert issubclass(CheckpointError, ValueError)
    e = CheckpointError("bad", file="a/b.safetensors", tensor="x.weight")
    assert str(e) == "a/b.safetensors: tensor 'x.weight': bad" and e.file == "a/b.safetensors"


def test_truncated_file_names_file_and_tensor(small_ckpt, tmp_path):
    p = _copy(small_ckpt, tmp_path / "t")
    f = p / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*': bad shape .* truncated"):
        load(p)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        load(p)


def test_wrong_shape(small_ckpt, tmp_path):
    p = _copy(small_ckpt, tmp_path / "s")
    _rewrite(p, lambda sd: {**sd, "model.layers.0.mlp.up_proj.weight": torch.zeros(100, 64)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight': "
                                              r"shape \(100, 64\) but the config implies \(192, 64\)"):
        load(p)


def test_missing_and_extra_tensor(small_ckpt, tmp_path):
    p = _copy(small_ckpt, tmp_path / "m")
    _rewrite(p, lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight': missing"):
        load(p)
    p = _copy(small_ckpt, tmp_path / "x")
    _rewrite(p, lambda sd: {**sd, "model.layers.0.surprise": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.surprise': unexpected"):
        load(p)


def test_dtype_mismatch(small_ckpt, tmp_path):
    p = _copy(small_ckpt, tmp_path / "d")
    _rewrite(p, lambda sd: {**sd, "model.norm.weight": sd["model.norm.weight"].to(torch.int32)})
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': dtype I32 where a floating-point"):
        load(p)


def test_config_disagreeing_with_tensors(small_ckpt, tmp_path):
    p = _copy(small_ckpt, tmp_path / "c")
    (p / "giants_config.json").unlink()
    cfg = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128}))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.embed_tokens\.weight': shape \(256, 64\) but the "
                                              r"config implies \(256, 128\)"):
        load(p)
    (p / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\..*': missing"):
        load(p)
    (p / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    with pytest.raises(CheckpointError, match="config says 1000000000 layers"):
        load(p)  # refused before anything is built


def test_giants_config_disagreeing_with_config_json(small_ckpt, tmp_path):
    p = _copy(small_ckpt, tmp_path / "g")
    cfg = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 0.1}))
    with pytest.raises(CheckpointError, match=r"config\.json and giants_config\.json disagree on norm_eps"):
        load(p)


def test_sharded_index_problems(tmp_path):
    save(giants.build(SMALL, seed=0), tmp_path / "s", max_shard_size="20KB")
    idx = tmp_path / "s" / "model.safetensors.index.json"
    good = json.loads(idx.read_text())
    assert len(set(good["weight_map"].values())) > 1
    bad = {**good, "weight_map": {**good["weight_map"], "model.norm.weight": "../../etc/passwd"}}
    idx.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load(tmp_path / "s")
    shard = sorted(set(good["weight_map"].values()))[-1]
    idx.write_text(json.dumps(good))
    (tmp_path / "s" / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard} named by the index is missing"):
        load(tmp_path / "s")


def test_no_half_loaded_model(small_ckpt, tmp_path, monkeypatch):
    """A read that fails part-way (disk error, file changed under us) raises; no model comes back."""
    calls = []
    real = sio.SafetensorsSet._read

    def flaky(self, e, out):
        calls.append(e.name)
        if len(calls) == 4:
            raise CheckpointError("read failed: I/O error", file=e.file, tensor=e.name)
        return real(self, e, out)

    monkeypatch.setattr(sio.SafetensorsSet, "_read", flaky)
    result = None
    with pytest.raises(CheckpointError, match="I/O error"):
        result = load(small_ckpt)
    assert result is None and len(calls) == 4


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    """A directory holding only pytorch_model.bin (a pickle) is refused without opening it."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    (d / "config.json").write_text(json.dumps(SMALL.to_hf()))

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(d)
    assert not marker.exists()


# ---- fuzzing ---------------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def _peak_tracker():
    """Returns a function giving the peak RSS growth (MB) since this call: the kernel's high-water mark is
    reset through /proc/self/clear_refs, so memory used by earlier tests in this process does not hide a
    spike here. Falls back to ru_maxrss where that file cannot be written."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_mb("VmRSS")
        return lambda: _status_mb("VmHWM") - base
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


@st.composite
def mutations(draw, size: int, header: int):
    """A seed for uniform random damage: byte edits in the header (where parsers break) and anywhere,
    digit swaps that keep a JSON header parseable but change shapes and offsets, an absurd 8-byte field,
    and a cut. Hypothesis drives and records the seeds; numpy spreads the edits evenly."""
    return draw(st.integers(0, 2**32 - 1)), size, header


def _mutate(data: bytes, m) -> bytes:
    seed, size, header = m
    rng = np.random.default_rng(seed)
    b = bytearray(data)
    for _ in range(rng.integers(0, 6)):  # printable half the time, so JSON headers still decode as UTF-8
        b[rng.integers(4, header)] = rng.integers(32, 127) if rng.random() < 0.5 else rng.integers(0, 256)
    for _ in range(rng.integers(0, 3)):
        b[rng.integers(0, size)] = rng.integers(0, 256)
    digits = [i for i in range(4, header) if 48 <= b[i] <= 57]
    for _ in range(rng.integers(0, 4) if digits else 0):
        b[digits[rng.integers(0, len(digits))]] = 48 + rng.integers(0, 10)
    if rng.random() < 0.3:
        pos = int(rng.integers(0, min(header, size - 8)))
        b[pos:pos + 8] = struct.pack("<Q", int(rng.choice([2**63 - 1, 2**32 + 7, 10**12, 0xFFFFFFFF, 1 << 40])))
    if rng.random() < 0.25:
        b = b[: rng.integers(0, size)]
    return bytes(b)


def _check_bounded(fn) -> None:
    t0 = time.monotonic()
    try:
        fn()
    except CheckpointError:
        pass
    assert time.monotonic() - t0 < 10, "took too long: a loop ran away"


_ST_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_fuzz_safetensors(small_ckpt, tmp_path):
    data = (small_ckpt / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    d = _copy(small_ckpt, tmp_path / "fz")
    growth = _peak_tracker()

    @_ST_SETTINGS
    @given(mutations(len(data), header))
    def run(m):
        (d / "model.safetensors").write_bytes(_mutate(data, m))
        _check_bounded(lambda: load(d))

    run()
    assert growth() < 300, "fuzzed files made the loader allocate without bound"


def _small_gguf(path: Path) -> Path:
    import gguf

    from test_gguf import write_gguf

    model = giants.build(SMALL.replace(tie_embeddings=True), seed=0)
    write_gguf(model, path, "llama")
    # add a byte-level tokenizer so string arrays are fuzzed too: GGUFWriter cannot append, so rebuild
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = f.contents()
        if isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    from giants.tokenizer import _byte_alphabet

    toks = [_byte_alphabet()[i] for i in range(256)]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", toks)
    w.add_array("tokenizer.ggml.merges", [f"{toks[i]} {toks[i + 1]}" for i in range(0, 0)])
    w.add_array("tokenizer.ggml.token_type", [1] * 256)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(path) + ".tmp", path)
    return path


def test_fuzz_gguf(tmp_path):
    src = _small_gguf(tmp_path / "ok.gguf")
    assert load(src).config.vocab_size == 256 and load_tokenizer(src).vocab_size == 256
    data = src.read_bytes()
    import gguf

    header = gguf.GGUFReader(src).data_offset
    target = tmp_path / "fz.gguf"
    growth = _peak_tracker()

    @_ST_SETTINGS
    @given(mutations(len(data), header))
    def run(m):
        target.write_bytes(_mutate(data, m))
        _check_bounded(lambda: load(target))
        _check_bounded(lambda: load_tokenizer(target))

    run()
    assert growth() < 300, "fuzzed files made the loader allocate without bound"


def test_gguf_huge_array_count_rejected_fast(tmp_path):
    src = _small_gguf(tmp_path / "ok.gguf")
    data = bytearray(src.read_bytes())
    key = b"tokenizer.ggml.token_type"
    i = data.index(key) + len(key) + 4 + 4  # key, value type (array), element type
    data[i:i + 8] = struct.pack("<Q", 2**62)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=r"bad\.gguf: truncated or corrupt GGUF header"):
        load(tmp_path / "bad.gguf")
    assert time.monotonic() - t0 < 5


def test_gguf_truncated_names_tensor(tmp_path):
    src = _small_gguf(tmp_path / "ok.gguf")
    data = src.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: tensor '.*': data at offset .* truncated"):
        load(tmp_path / "cut.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(CheckpointError, match="bad magic"):
        load(tmp_path / "magic.gguf")
