"""Issue 26 (hardening), items 9-15: sizes a checkpoint cannot back are refused before anything proportional to
them is built; the context length never sizes the KV cache alone; FIFOs, overlapping GGUF data, NaN MXFP4
scales and foreign output directories are refused by name. Plus hypothesis over every size field of
config.json, giants_config.json and GGUF metadata: an error (or, for the context length, a load) within a
second of CPU time and bounded memory."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import giants
from giants.checkpoint import CheckpointError, load, mxfp4, save

SMALL = giants.get_config("tiny-llama").replace(vocab_size=256, n_layers=1, rope_scaling="none", rope_factor=1.0)
GPT_OSS = giants.get_config("tiny-gpt-oss").replace(vocab_size=256)


# ---- bounds: CPU time, peak memory, and a cap on the address space so a regression fails, not swaps ------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


@contextlib.contextmanager
def _capped(extra_mb: int = 2048) -> Iterator[None]:
    """At most `extra_mb` more address space while inside: an allocation proportional to a corrupt size
    raises MemoryError at once instead of taking the machine down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int((_status_mb("VmSize") + extra_mb) * 2**20)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _peak_tracker() -> Callable[[], float]:
    """Peak RSS growth (MB) since this call (the high-water mark reset through /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_mb("VmRSS")
        return lambda: _status_mb("VmHWM") - base
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def _bounded(fn: Callable[[], Any], cpu_s: float = 5.0, mb: float = 200.0) -> BaseException | None:
    """Run fn under the address-space cap; it must take < cpu_s of CPU time and grow the peak RSS by < mb.
    A refusal takes well under a second of CPU; the runaway builds this guards against took 17 s to forever, so
    the bound leaves room for a loaded CI box (1.09 s was seen at load 10) without letting a regression through.
    Returns the CheckpointError it raised (None when it returned); any other exception propagates."""
    growth = _peak_tracker()
    t0 = time.process_time()
    err: BaseException | None = None
    with _capped():
        try:
            fn()
        except CheckpointError as e:
            err = e
    cpu = time.process_time() - t0
    assert cpu < cpu_s, f"{cpu:.2f} s of CPU time"
    assert growth() < mb, f"peak RSS grew {growth():.0f} MB"
    return err


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hard") / "small"
    save(giants.build(SMALL, seed=0), path)
    return path


@pytest.fixture(scope="module")
def giants_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hard") / "giants"
    save(giants.build(SMALL, seed=0), path, format="giants")
    return path


@pytest.fixture(scope="module")
def oss_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hard") / "oss"
    save(giants.build(GPT_OSS, seed=0), path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# GGUF sizes, every one written as uint64 so a test can patch any value in place
GGUF_SIZES = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "vocab_size", "attention.key_length", "attention.value_length",
              "rope.dimension_count", "expert_count", "attention.sliding_window")


def _write_gguf_u64(src: Path, dst: Path, extra: dict[str, int] | None = None) -> Path:
    """`src` rewritten with every integer size in uint64 (plus `extra` keys), tensors copied unchanged."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    sizes = {f"{arch}.{k}" for k in GGUF_SIZES}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = f.contents()
        if k in sizes:
            w.add_uint64(k, int(v))
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_uint32(k, v)
    for k, v in (extra or {}).items():
        w.add_uint64(f"{arch}.{k}", v)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    from test_gguf import write_gguf

    d = tmp_path_factory.mktemp("hardg")
    write_gguf(giants.build(SMALL.replace(tie_embeddings=True), seed=0), d / "plain.gguf", "llama")
    return _write_gguf_u64(d / "plain.gguf", d / "u64.gguf", {"expert_count": 0, "attention.sliding_window": 0})


def _value_offset(data: bytes, key: str) -> int:
    """Offset of the value of metadata `key` (exact key: its length prefix is matched too)."""
    k = key.encode()
    return data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k) + 4


def _patch_u64(data: bytes, key: str, value: int) -> bytes:
    i = _value_offset(data, key)
    return data[:i] + struct.pack("<Q", value) + data[i + 8:]


# ---- 9: GGUF block_count = 1e9 ------------------------------------------------------------------------
def test_gguf_huge_block_count_refused_before_building_anything(gguf_file, tmp_path):
    bad = tmp_path / "b.gguf"
    bad.write_bytes(_patch_u64(gguf_file.read_bytes(), "llama.block_count", 10**9))
    err = _bounded(lambda: load(bad))
    assert err is not None and "block_count=1000000000" in str(err) and "b.gguf" in str(err)
    from giants.checkpoint.inspection import inspect

    info = inspect(bad)  # inspect still lists the header and reports the config error
    assert "block_count=1000000000" in info["config_error"]


def test_gguf_expert_count_must_match_the_expert_tensors(tmp_path):
    from test_gguf import random_model, write_gguf

    cfg = giants.get_config("tiny-mixtral").replace(layer_windows=(), vocab_size=256)
    src = write_gguf(random_model(cfg), tmp_path / "m.gguf", "llama")
    u64 = _write_gguf_u64(src, tmp_path / "u.gguf")
    for n in (9, 4096, 10**9):
        bad = tmp_path / f"e{n}.gguf"
        bad.write_bytes(_patch_u64(u64.read_bytes(), "llama.expert_count", n))
        err = _bounded(lambda b=bad: load(b))
        assert err is not None and f"expert_count={n}" in str(err)


# ---- 10: giants_config.json n_layers = 1e9 ------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["hf_dir", "giants_dir"])
def test_giants_config_huge_layer_count_refused_before_to_hf(fixture, request, tmp_path):
    p = _copy(request.getfixturevalue(fixture), tmp_path / "c")
    g = json.loads((p / "giants_config.json").read_text())
    g["config"]["n_layers"] = 10**9
    (p / "giants_config.json").write_text(json.dumps(g))
    from giants.checkpoint.inspection import inspect
    from giants.checkpoint.loading import load_config

    for fn in (lambda: load(p), lambda: load_config(p), lambda: inspect(p)):
        err = _bounded(fn)
        assert err is not None and "1000000000 layers" in str(err) and "giants_config.json" in str(err)


def test_hf_config_with_more_layers_than_the_file_holds(hf_dir, tmp_path):
    p = _copy(hf_dir, tmp_path / "l")
    (p / "giants_config.json").unlink()
    cfg = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    err = _bounded(lambda: load(p))
    assert err is not None and "config says 5 layers" in str(err) and "layers 0..0" in str(err)


def test_long_layer_types_read_in_linear_time(oss_dir, tmp_path):
    """layer_types is folded into the shortest repeating window pattern; a long list that only breaks its
    pattern at the end took quadratic time before the layer count was compared with the file."""
    p = _copy(oss_dir, tmp_path / "t")
    (p / "giants_config.json").unlink()
    cfg = json.loads((p / "config.json").read_text())
    n = 200_000
    types = ["sliding_attention"] * (n - 1) + ["full_attention"]
    (p / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": n, "layer_types": types}))
    err = _bounded(lambda: load(p))
    assert err is not None and f"config says {n} layers" in str(err)


def test_hf_config_experts_the_file_cannot_back(oss_dir, tmp_path):
    p = _copy(oss_dir, tmp_path / "e")
    (p / "giants_config.json").unlink()
    cfg = json.loads((p / "config.json").read_text())
    for n in (4096, 10**9):
        (p / "config.json").write_text(json.dumps({**cfg, "num_local_experts": n}))
        err = _bounded(lambda: load(p))
        assert err is not None and f"{n} experts" in str(err)


# ---- 11: the context length never sizes the KV cache alone ------------------------------------------------
def test_engine_default_length_fits_memory_not_the_file():
    from giants.inference.engine import Engine
    from giants.inference.params import SamplingParams

    model = giants.build(SMALL.replace(max_context=4 * 10**9), seed=0).eval()
    growth = _peak_tracker()
    with _capped():
        eng = Engine(model, max_num_seqs=4)
    assert growth() < 1200 and eng.max_model_len < 4 * 10**9
    assert sum(g.k[0].numel() for g in eng.kv.groups) * 4 * 2 * SMALL.n_layers <= 1.1 * 2**30
    eng.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    while eng.has_unfinished_requests():
        eng.step()
    # asked for explicitly, a length within max_context is still honoured
    assert Engine(giants.build(SMALL, seed=0), max_model_len=512, num_blocks=64).max_model_len == 512


def test_llm_on_a_gguf_claiming_4e9_context(tmp_path):
    from giants.inference.llm import LLM
    from test_checkpoint_bad_input import _small_gguf

    src = _small_gguf(tmp_path / "ok.gguf")
    data = bytearray(src.read_bytes())
    i = _value_offset(bytes(data), "llama.context_length")
    data[i:i + 4] = struct.pack("<I", 4 * 10**9)
    (tmp_path / "ctx.gguf").write_bytes(bytes(data))
    growth = _peak_tracker()
    with _capped(), pytest.warns(UserWarning, match="tokenizer.ggml.pre"):  # the test vocabulary has no pre
        llm = LLM(str(tmp_path / "ctx.gguf"), device="cpu", max_num_seqs=4)
    assert llm.model.config.max_context == 4 * 10**9 and llm.engine.max_model_len < 4 * 10**9
    assert growth() < 1200


# ---- 12: FIFOs and other non-regular files ------------------------------------------------------------------
def _no_hang(fn: Callable[[], Any], fifos: list[Path], seconds: float = 20.0) -> BaseException | None:
    """Run fn in a thread; if it blocks (opened a FIFO) unblock it by opening the FIFOs for writing, and fail."""
    out: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for f in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail(f"blocked for {seconds} s on a FIFO")
    return out[0]


def test_fifo_safetensors_refused_by_load_inspect_convert(hf_dir, tmp_path):
    from giants.checkpoint.inspection import inspect
    from giants.cli import main

    p = _copy(hf_dir, tmp_path / "f")
    (p / "model.safetensors").unlink()
    os.mkfifo(p / "model.safetensors")
    fifo = [p / "model.safetensors"]
    for fn in (lambda: load(p), lambda: inspect(p), lambda: load(p / "model.safetensors")):
        err = _no_hang(fn, fifo)
        assert isinstance(err, CheckpointError) and "model.safetensors: not a regular file (a FIFO)" in str(err)
    assert _no_hang(lambda: main(["convert", str(p), str(tmp_path / "out")]), fifo) is None
    assert not (tmp_path / "out").exists()


def test_fifo_config_gguf_and_shard_refused(hf_dir, gguf_file, tmp_path):
    from giants.checkpoint.inspection import inspect

    p = _copy(hf_dir, tmp_path / "c")
    (p / "config.json").unlink()
    os.mkfifo(p / "config.json")
    err = _no_hang(lambda: load(p), [p / "config.json"])
    assert isinstance(err, CheckpointError) and "config.json: not a regular file (a FIFO)" in str(err)

    os.mkfifo(tmp_path / "m.gguf")
    for fn in (lambda: load(tmp_path / "m.gguf"), lambda: inspect(tmp_path / "m.gguf")):
        err = _no_hang(fn, [tmp_path / "m.gguf"])
        assert isinstance(err, CheckpointError) and "m.gguf: not a regular file (a FIFO)" in str(err)

    s = tmp_path / "s"
    save(giants.build(SMALL, seed=0), s, max_shard_size="20KB")
    shard = sorted(s.glob("model-*.safetensors"))[-1]
    shard.unlink()
    os.mkfifo(shard)
    err = _no_hang(lambda: load(s), [shard])
    assert isinstance(err, CheckpointError) and f"{shard.name}: not a regular file (a FIFO)" in str(err)


# ---- 13: overlapping GGUF tensor data ---------------------------------------------------------------------
def _tensor_offset_pos(data: bytes, name: str) -> int:
    """Position of the data-offset field of tensor `name` in the tensor-info table."""
    k = name.encode()
    i = data.rindex(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    ndim = struct.unpack_from("<I", data, i)[0]
    return i + 4 + 8 * ndim + 4


def test_gguf_overlapping_tensor_data_refused(gguf_file, tmp_path):
    data = bytearray(gguf_file.read_bytes())
    a, b = "blk.0.attn_q.weight", "blk.0.attn_output.weight"  # both (64, 64) F32
    off_a = struct.unpack_from("<Q", data, _tensor_offset_pos(bytes(data), a))[0]
    struct.pack_into("<Q", data, _tensor_offset_pos(bytes(data), b), off_a + 64)  # b starts inside a
    (tmp_path / "o.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"o\.gguf: tensor '{a}': data .* overlaps tensor '{b}'"):
        load(tmp_path / "o.gguf")
    struct.pack_into("<Q", data, _tensor_offset_pos(bytes(data), b), off_a)  # the very same bytes
    (tmp_path / "o.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="overlaps"):
        load(tmp_path / "o.gguf")


# ---- 14: MXFP4 scale 0xFF (E8M0 NaN) ----------------------------------------------------------------------
def test_mxfp4_nan_scale_refused_with_block_index():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.full((3, 8, 2), 127, dtype=torch.uint8)
    scales[1, 5, 1] = 0xFF
    with pytest.raises(ValueError, match=r"scale 0xFF \(E8M0 NaN\) at block \(1, 5, 1\)"):
        mxfp4.dequantize(blocks, scales)
    scales[1, 5, 1] = 0xFE  # the largest finite scale is a scale, not an error
    mxfp4.dequantize(blocks, scales)


def test_mxfp4_checkpoint_with_nan_scale(tmp_path):
    from safetensors.torch import load_file, save_file

    save(giants.build(giants.get_config("tiny-gpt-oss").replace(vocab_size=256), seed=0), tmp_path / "q",
         quantize="mxfp4")
    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.mlp.experts.down_proj_scales"
    sd[key][2, 7, 0] = 0xFF
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}': scale 0xFF \(E8M0 NaN\) at "
                                              r"block \(2, 7, 0\)"):
        load(tmp_path / "q")


def test_gguf_mxfp4_nan_scale(tmp_path):
    import gguf
    from gguf import GGMLQuantizationType as Q

    from giants.checkpoint.gguf_io import dequantize_tensor

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    raw = gguf.quants.quantize(np.ones((4, 64), dtype=np.float32), Q.MXFP4)  # 4 rows x 2 blocks of 17 bytes
    raw[2, 17] = 0xFF  # row 2, second block: its scale byte
    w.add_tensor("t", raw, raw_dtype=Q.MXFP4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = gguf.GGUFReader(tmp_path / "x.gguf").tensors[0]
    with pytest.raises(CheckpointError, match=r"x\.gguf: tensor 't': scale 0xFF \(E8M0 NaN\) in block 5"):
        dequantize_tensor(t, tmp_path / "x.gguf")


def test_nan_scale_refused_by_the_tensor_parallel_readers(tmp_path):
    """One rank's share of an MXFP4 checkpoint (HF packed experts, GGUF MXFP4) is checked the same way."""
    import gguf
    from safetensors.torch import load_file, save_file

    from giants.checkpoint.loading import read_dir_config
    from giants.checkpoint.sharded import load_gguf_shard
    from giants.inference.tp_model import ShardSpec, build_shard, skeleton
    from test_gguf import write_gguf

    cfg = giants.get_config("tiny-gpt-oss").replace(vocab_size=256)
    model = giants.build(cfg, seed=0)
    save(model, tmp_path / "q", quantize="mxfp4")
    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.0.mlp.experts.gate_up_proj_scales"
    sd[key][0, 0, 0] = 0xFF
    save_file(sd, f)
    c, naming = read_dir_config(tmp_path / "q")
    with pytest.raises(CheckpointError, match=rf"tensor '{key}': scale 0xFF \(E8M0 NaN\) at block \(0, 0, 0\)"):
        build_shard(ShardSpec("dir", str(tmp_path / "q"), c, 2, None, naming=naming), 0, torch.device("cpu"))

    mx = {f"blk.{i}.ffn_{g}_exps.weight": gguf.GGMLQuantizationType.MXFP4 for i in range(cfg.n_layers)
          for g in ("gate", "up", "down")}
    path = write_gguf(model, tmp_path / "o.gguf", "gpt-oss", overrides=mx)
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down_exps.weight")
    data = bytearray(path.read_bytes())
    data[int(t.data_offset)] = 0xFF  # the first block's scale byte (data_offset is absolute)
    path.write_bytes(bytes(data))
    m = skeleton(cfg, 2, torch.device("cpu"), torch.float32)
    with pytest.raises(CheckpointError, match=r"o\.gguf: tensor 'blk\.0\.ffn_down_exps\.weight': scale 0xFF"):
        load_gguf_shard(path, dict(m.named_parameters()), 0, 2)


# ---- 15: save / convert replace only what giants wrote ------------------------------------------------------
def test_save_refuses_a_foreign_directory_holding_config_json(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"mine.*not written by giants"):
        save(giants.build(SMALL, seed=0), d)
    assert (d / "notes.txt").read_text() == "precious" and (d / "config.json").read_text() == "{}"


def test_save_replaces_its_own_checkpoint_but_not_files_added_to_it(tmp_path):
    d = tmp_path / "ck"
    save(giants.build(SMALL, seed=0), d)
    marker = json.loads((d / ".giants-checkpoint").read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in d.iterdir() if p.name != ".giants-checkpoint")
    save(giants.build(SMALL, seed=1), d, max_shard_size="20KB")  # ours: replaced (now sharded)
    assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    (d / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"README\.md"):
        save(giants.build(SMALL, seed=0), d)
    assert (d / "README.md").read_text() == "mine"
    (d / "README.md").unlink()
    (d / ".giants-checkpoint").write_text("not json")
    with pytest.raises(FileExistsError, match="not written by giants"):
        save(giants.build(SMALL, seed=0), d)
    e = tmp_path / "empty"
    e.mkdir()
    save(giants.build(SMALL, seed=0), e)  # an empty directory is fine
    assert (e / ".giants-checkpoint").is_file()


def test_convert_into_a_foreign_folder_fails_before_loading(hf_dir, tmp_path, capsys, monkeypatch):
    from giants.checkpoint import loading
    from giants.cli import main

    d = tmp_path / "docs"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "thesis.tex").write_text("x")

    def no_load(*a, **k):
        raise AssertionError("the source was loaded before the destination was checked")

    monkeypatch.setattr(loading, "load", no_load)
    assert main(["convert", str(hf_dir), str(d)]) == 2
    err = capsys.readouterr().err
    assert "docs" in err and "not written by giants" in err and (d / "thesis.tex").is_file()


# ---- hypothesis: every size field huge ------------------------------------------------------------------
HUGE = st.sampled_from([2**31, 2**32 - 1, 4 * 10**9, 10**9, 2**40, 2**62, 2**63 - 1, 2**64 - 1]) \
    | st.integers(2**20, 2**64 - 1)
# CI replays a fixed set; `make fuzz` (FUZZ_SECONDS > 0) draws fresh, more numerous inputs.
_FUZZ = float(os.environ.get("FUZZ_SECONDS", "0") or 0) > 0
_SETTINGS = settings(max_examples=1000 if _FUZZ else 50, deadline=None, derandomize=not _FUZZ, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# context lengths are not backed by any tensor: a huge one loads (and never sizes anything by itself)
_CONTEXT = {"max_position_embeddings", "max_context", "context_length", "rope_original_max_context",
            "original_max_position_embeddings", "rel_max_distance", "rel_buckets", "attention.value_length",
            "rope.dimension_count"}


def _check_huge(fields: dict[str, int], fn: Callable[[], Any]) -> None:
    err = _bounded(fn)
    if err is None:
        assert set(fields) <= _CONTEXT, f"{fields} loaded"


@pytest.mark.parametrize("which", ["hf_dir", "oss_dir"])
def test_hypothesis_huge_hf_config_fields(which, request, tmp_path):
    p = _copy(request.getfixturevalue(which), tmp_path / "h")
    (p / "giants_config.json").unlink()
    base = json.loads((p / "config.json").read_text())
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"]
    if which == "oss_dir":
        keys += ["num_local_experts", "num_experts_per_tok"]

    @_SETTINGS
    @given(st.dictionaries(st.sampled_from(keys), HUGE, min_size=1, max_size=3))
    def run(fields):
        (p / "config.json").write_text(json.dumps({**base, **fields}))
        _check_huge(fields, lambda: load(p))

    run()


@pytest.mark.parametrize("which", ["hf_dir", "giants_dir"])
def test_hypothesis_huge_giants_config_fields(which, request, tmp_path):
    p = _copy(request.getfixturevalue(which), tmp_path / "g")
    base = json.loads((p / "giants_config.json").read_text())
    keys = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_context",
            "n_experts", "experts_per_token", "rel_buckets", "rel_max_distance", "rope_original_max_context"]

    @_SETTINGS
    @given(st.dictionaries(st.sampled_from(keys + ["layer_windows"]), HUGE, min_size=1, max_size=3))
    def run(fields):
        g = json.loads(json.dumps(base))
        g["config"].update({k: ([v] if k == "layer_windows" else v) for k, v in fields.items()})
        (p / "giants_config.json").write_text(json.dumps(g))
        _check_huge(fields, lambda: load(p))

    run()


def test_hypothesis_huge_gguf_metadata(gguf_file, tmp_path):
    data = gguf_file.read_bytes()
    target = tmp_path / "h.gguf"

    @_SETTINGS
    @given(st.dictionaries(st.sampled_from(GGUF_SIZES), HUGE, min_size=1, max_size=3))
    def run(fields):
        b = data
        for k, v in fields.items():
            b = _patch_u64(b, f"llama.{k}", v)
        target.write_bytes(b)
        _check_huge(fields, lambda: load(target))

    run()
