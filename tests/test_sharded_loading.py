"""One tensor-parallel rank's share of a checkpoint (giants.checkpoint.sharded): each rank's tensors equal its
slices of the whole model, for every family, HF and giants naming, MXFP4-packed experts and GGUF (quantized by
whole blocks); the bytes read (counted at the reader's one positioned-read call) are exactly the rank's share;
and a worker's peak RSS while loading a ~116 MB checkpoint grows by about half of it at tp=2."""

from __future__ import annotations

import pytest
import torch

from giants import build, get_config
from giants.checkpoint import CheckpointError, load, save
from giants.checkpoint.loading import read_dir_config
from giants.inference.tp_model import ShardSpec, build_shard
from giants.parallel.layout import tp_reduced_bias, tp_shard

ALL_TINY = ("tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss", "tiny-gpt-oss-described")
CPU = torch.device("cpu")


@pytest.fixture
def counted(monkeypatch):
    """Every read of the slice reader (its one positioned-read primitive) counted, and checked to lie inside
    the tensor it was asked for."""
    from giants.checkpoint.sharded import SliceReader

    real = SliceReader._pread

    class Count:
        nbytes = 0

    def pread(self, fd, buf, offset, e):
        assert e.start <= offset and offset + len(buf) <= e.end, (e.name, offset, len(buf))
        Count.nbytes += len(buf)
        real(self, fd, buf, offset, e)

    monkeypatch.setattr(SliceReader, "_pread", pread)
    return Count


def _expected(full: dict[str, torch.Tensor], cfg, name: str, rank: int, tp: int) -> torch.Tensor:
    t = full[name]
    shard = tp_shard(cfg, name, tuple(t.shape), rank, tp)
    t = t if shard is None else t.narrow(shard[0], shard[1], shard[2] - shard[1])
    return torch.zeros_like(t) if rank and tp_reduced_bias(name) else t


def _check_ranks(path, tp, full_model, counted=None, per_byte: int = 4) -> None:
    cfg, naming = read_dir_config(path)
    full = dict(full_model.named_parameters())
    for rank in range(tp):
        before = counted.nbytes if counted is not None else 0
        m, nbytes = build_shard(ShardSpec("dir", str(path), cfg, tp, None, naming=naming), rank, CPU)
        local = dict(m.named_parameters())
        assert set(local) == set(full)
        for name, p in local.items():
            assert torch.equal(p, _expected(full, cfg, name, rank, tp)), (name, rank)
        if counted is not None:
            share = sum(p.numel() for p in local.values()) * per_byte
            assert counted.nbytes - before == nbytes == share, (rank, counted.nbytes - before, nbytes, share)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ALL_TINY)
def test_dir_shards_are_the_slices_and_read_nothing_else(tmp_path, name, tp, counted):
    model = build(get_config(name), seed=1).eval()
    path = save(model, tmp_path / "c")
    _check_ranks(path, tp, load(path), counted)


def test_giants_naming_and_bf16(tmp_path, counted):
    model = build(get_config("tiny-gemma2"), seed=2).eval()
    path = save(model, tmp_path / "g", format="giants", dtype="bfloat16")
    assert read_dir_config(path)[1] == "giants"
    _check_ranks(path, 2, load(path), counted, per_byte=2)


def test_mxfp4_experts_sliced_packed(tmp_path):
    from giants.checkpoint import mxfp4

    model = build(get_config("tiny-gpt-oss"), seed=4).eval()
    with torch.no_grad():  # on the MXFP4 grid, so storing is lossless and slices compare exactly
        for layer in model.layers:
            for n in ("w_gate", "w_up", "w_down"):
                p = getattr(layer.mlp, n)
                p.copy_(mxfp4.dequantize(*mxfp4.quantize(p.transpose(1, 2))).transpose(1, 2))
    path = save(model, tmp_path / "m", quantize="mxfp4")
    full = load(path)
    _check_ranks(path, 2, full)
    cfg, naming = read_dir_config(path)
    with pytest.raises(CheckpointError, match="multiples of 32"):  # ffn_dim 64 / 4 = 16 splits a block
        build_shard(ShardSpec("dir", str(path), cfg, 4, None, naming=naming), 1, CPU)


# ---- GGUF -------------------------------------------------------------------------------------------
def _gguf(tmp_path, name: str, arch: str, qtype=None, overrides=None):
    from test_gguf import Q, write_gguf

    model = build(get_config(name), seed=5).eval()
    return write_gguf(model, tmp_path / f"{name}.gguf", arch, qtype or Q.F32, overrides)


@pytest.mark.parametrize("name,arch,qtype", [("tiny-llama", "llama", "F32"), ("tiny-llama", "llama", "Q8_0"),
                                             ("tiny-gemma2", "gemma2", "Q8_0"), ("tiny-mixtral", "llama", "F32"),
                                             ("tiny-gpt-oss", "gpt-oss", "MXFP4")])
def test_gguf_shards_are_the_slices(tmp_path, name, arch, qtype):
    """Q/K rows of llama files are permuted for rotary: un-permuted per rank's heads; Q8_0 and MXFP4 (experts)
    sliced by whole blocks."""
    from giants.checkpoint import mxfp4
    from giants.checkpoint.gguf_io import GGUFFile
    from giants.checkpoint.sharded import load_gguf_shard
    from giants.inference.tp_model import skeleton
    from test_gguf import Q, write_gguf

    if qtype == "MXFP4":
        cfg = get_config(name)
        model = build(cfg, seed=5).eval()
        with torch.no_grad():  # on the MXFP4 grid: lossless
            for layer in model.layers:
                for n in ("w_gate", "w_up", "w_down"):
                    w = getattr(layer.mlp, n)
                    w.copy_(mxfp4.dequantize(*mxfp4.quantize(w.transpose(1, 2))).transpose(1, 2))
        mx = {f"blk.{i}.ffn_{g}_exps.weight": Q.MXFP4 for i in range(cfg.n_layers) for g in ("gate", "up", "down")}
        path = write_gguf(model, tmp_path / "o.gguf", arch, overrides=mx)
    else:
        path = _gguf(tmp_path, name, arch, getattr(Q, qtype))
    full_model = load(path)
    cfg = GGUFFile(path).config
    full = dict(full_model.named_parameters())
    for rank in range(2):
        m = skeleton(cfg, 2, CPU, torch.float32)
        params = dict(m.named_parameters())
        nbytes = load_gguf_shard(path, params, rank, 2)
        for n, p in params.items():
            assert torch.equal(p, full[n] if tp_shard(cfg, n, tuple(full[n].shape), rank, 2) is None
                               else _expected(full, cfg, n, rank, 2)), (n, rank)
        assert 0 < nbytes < path.stat().st_size * 0.75


def test_gguf_column_split_inside_a_block_is_refused(tmp_path):
    from giants.checkpoint.gguf_io import GGUFFile
    from giants.checkpoint.sharded import load_gguf_shard
    from giants.inference.tp_model import skeleton
    from test_gguf import Q

    path = _gguf(tmp_path, "tiny-llama", "llama", Q.Q8_0)
    cfg = GGUFFile(path).config
    m = skeleton(cfg, 4, CPU, torch.float32)  # o_proj's 64 columns / 4 = 16: half a Q8_0 block
    with pytest.raises(CheckpointError, match="multiples of its 32-value blocks"):
        load_gguf_shard(path, dict(m.named_parameters()), 1, 4)


# ---- through LLM: a checkpoint directory, and peak RSS per rank ---------------------------------------
def test_llm_tp_from_checkpoint_dir_and_peak_rss(tmp_path):
    """d_model 512, 4 layers, vocab 16000, fp32: 116 MB on disk. A worker's peak RSS grows by about half of that
    while it loads its shard (plus at most one tensor's pages), where a whole load grows by all of it."""
    from giants.inference import LLM, SamplingParams

    cfg = get_config("tiny-llama").replace(d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64,
                                           ffn_dim=1536, vocab_size=16000, max_context=256)
    model = build(cfg, seed=6).eval()
    path = save(model, tmp_path / "big")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    largest = max(p.numel() * 4 for p in model.parameters())
    del model
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9] * 12]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(str(path), device="cpu", num_blocks=16).generate(prompts, sp)]
    llm = LLM(str(path), device="cpu", tensor_parallel_size=2, num_blocks=16)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == want
        stats = llm.executor.stats[1]
        grew = (stats["load_peak_rss_kb"] - stats["start_rss_kb"]) * 1024
        assert stats["bytes_read"] == pytest.approx(size / 2, rel=0.01)
        assert grew < size / 2 + largest + 16 * 2**20, (grew, size)
    finally:
        llm.executor.close()
