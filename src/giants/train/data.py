"""Token datasets: `prepare` packs text into numpy token shards; `BatchReader` serves (B, T) batches
from them in a deterministic shuffled order and can save and restore its position.

On-disk layout of a prepared dataset DIR:
    DIR/meta.json               what the shards hold (tokenizer, dtype, token counts, checksums)
    DIR/train_000.bin ...       packed uint16/uint32 tokens, documents separated by EOS
    DIR/val_000.bin ...
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "giants-tokens-v1"
TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl")
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MiB of uint16 per shard


class ByteTokenizer:
    """Raw UTF-8 bytes as tokens 0..255 and EOS = 256. Needs no download; for tests and experiments."""

    name = "bytes"
    eos_token_id = 256
    bos_token_id = None
    pad_token_id = 256
    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(source: str | Any) -> Any:
    """A tokenizer from a name ("bytes", "smollm2-135m"), a checkpoint path, or an already-built object."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if str(source) == "bytes":
        return ByteTokenizer()
    import giants

    return giants.load_tokenizer(str(source))


def tokenizer_id(tok: Any, source: str | Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else getattr(tok, "name", type(tok).__name__)


def eos_id(tok: Any) -> int:
    eos = getattr(tok, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: documents cannot be separated")
    return int(eos)


def vocab_size_of(tok: Any) -> int:
    v = getattr(tok, "vocab_size", None)
    if callable(v):
        v = v()
    if not isinstance(v, int) or v <= 0:
        raise ValueError(f"tokenizer vocab_size is {v!r}")
    return v


def encode_many(tok: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text, without special tokens; batched (parallel in Rust) where the tokenizer can."""
    batch = getattr(tok, "encode_batch", None)
    if batch is not None:
        try:
            out = batch(list(texts), add_special_tokens=False)
        except TypeError:
            out = batch(list(texts))
        return [np.asarray(getattr(e, "ids", e), dtype=np.int64) for e in out]
    return [np.asarray(tok.encode(t, add_special_tokens=False), dtype=np.int64) for t in texts]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---- reading raw text --------------------------------------------------------------------------

def read_text(path: Path, data: bytes | None = None) -> str:
    """The UTF-8 text of a file; binary or non-UTF-8 content is refused naming the file."""
    if data is None:
        data = Path(path).read_bytes()
    if b"\x00" in data[:1 << 20]:
        raise ValueError(f"{path}: looks like a binary file (contains NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def collect_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly, plus text files (by suffix) found recursively under named directories."""
    if not inputs:
        raise ValueError("no input files given")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"{p}: directory has no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


def read_documents(files: Sequence[Path]) -> list[tuple[str, str]]:
    """(name, text) per document: a whole file, or one per line of a .jsonl file ({"text": ...})."""
    docs: list[tuple[str, str]] = []
    for f in files:
        text = read_text(f)
        if f.suffix.lower() == ".jsonl":
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{i}: invalid JSON: {e.msg}") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f'{f}:{i}: each line must be an object with a string field "text"')
                docs.append((f"{f}:{i}", obj["text"]))
        else:
            docs.append((str(f), text))
    return docs


# ---- prepare -----------------------------------------------------------------------------------

def prepare(inputs: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer: str | Any, out: str | os.PathLike,
            *, val_fraction: float = 0.05, seed: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            progress: bool = False) -> dict[str, Any]:
    """Tokenise text files / directories into a packed token dataset at `out`. Returns its meta."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    docs = read_documents(collect_files(inputs))
    tok = load_tokenizer(tokenizer)
    return prepare_documents(docs, tok, out, tokenizer_name=tokenizer_id(tok, tokenizer),
                             val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens, progress=progress)


def prepare_documents(docs: Sequence[tuple[str, str]], tok: Any, out: str | os.PathLike, *, tokenizer_name: str,
                      val_fraction: float = 0.05, seed: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                      progress: bool = False, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    if shard_tokens < 1024:
        raise ValueError(f"shard_tokens must be >= 1024 (got {shard_tokens})")
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise ValueError("no text to prepare: every input document is empty")
    eos, vocab = eos_id(tok), vocab_size_of(tok)
    dtype = token_dtype(vocab)
    # Deterministic document shuffle, then one packed stream with EOS after each document.
    order = np.random.default_rng(seed).permutation(len(docs))
    docs = [docs[i] for i in order]
    ids = _encode_with_progress(tok, [t for _, t in docs], progress)
    stream = np.concatenate([np.append(a, eos) for a in ids])
    if stream.size and int(stream.max()) >= vocab:
        raise ValueError(f"tokenizer produced id {int(stream.max())} >= its vocab_size {vocab}")
    n_val = max(2, int(round(stream.size * val_fraction)))
    if stream.size - n_val < 2:
        raise ValueError(f"only {stream.size} tokens: too little text for a train/validation split")
    splits = {"train": stream[:-n_val], "val": stream[-n_val:]}

    out = Path(out)
    if (out / "meta.json").exists() or (out.exists() and any(out.iterdir())):
        raise ValueError(f"{out}: output directory exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta: dict[str, Any] = {
            "format": FORMAT, "tokenizer": tokenizer_name, "vocab_size": vocab, "eos_token_id": eos,
            "dtype": dtype.name, "seed": seed, "val_fraction": val_fraction, "documents": len(docs),
            "splits": {}, **(extra_meta or {}),
        }
        for split, arr in splits.items():
            shards = []
            for k, start in enumerate(range(0, arr.size, shard_tokens)):
                chunk = arr[start:start + shard_tokens].astype(dtype)
                name = f"{split}_{k:03d}.bin"
                data = chunk.tobytes()
                (tmp / name).write_bytes(data)
                shards.append({"file": name, "tokens": int(chunk.size), "sha256": hashlib.sha256(data).hexdigest()})
            meta["splits"][split] = {"tokens": int(arr.size), "shards": shards}
        meta["fingerprint"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _encode_with_progress(tok: Any, texts: list[str], progress: bool) -> list[np.ndarray]:
    if not progress:
        return encode_many(tok, texts)
    from rich.progress import Progress

    out: list[np.ndarray] = []
    step = 16
    with Progress(transient=True) as bar:
        task = bar.add_task("tokenising", total=len(texts))
        for i in range(0, len(texts), step):
            out.extend(encode_many(tok, texts[i:i + step]))
            bar.advance(task, min(step, len(texts) - i))
    return out


# ---- reading a prepared dataset ----------------------------------------------------------------

def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    mf = path / "meta.json"
    if not mf.is_file():
        raise FileNotFoundError(f"{path}: not a prepared token dataset (no meta.json); "
                                f"run `giants prepare FILES --tokenizer SOURCE --out {path}` first")
    try:
        meta = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mf}: corrupt dataset metadata: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{mf}: unknown dataset format {meta.get('format')!r} (expected {FORMAT})")
    return meta


class TokenStream:
    """One split of a prepared dataset as a single virtual array over memory-mapped shards."""

    def __init__(self, path: str | os.PathLike, split: str, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta = meta or load_meta(path)
        if split not in self.meta["splits"]:
            raise ValueError(f"{path}: dataset has no split {split!r}")
        dtype = np.dtype(self.meta["dtype"])
        self.shards: list[np.memmap] = []
        for s in self.meta["splits"][split]["shards"]:
            f = self.path / s["file"]
            if not f.is_file():
                raise FileNotFoundError(f"{f}: dataset shard is missing")
            if f.stat().st_size != s["tokens"] * dtype.itemsize:
                raise ValueError(f"{f}: shard is {f.stat().st_size} bytes, expected {s['tokens'] * dtype.itemsize} "
                                 "(truncated or corrupt)")
            self.shards.append(np.memmap(f, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.split = split

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64, across shard boundaries."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while filled < n:
            local = pos - int(self.starts[k])
            take = min(n - filled, len(self.shards[k]) - local)
            out[filled:filled + take] = self.shards[k][local:local + take]
            filled += take
            pos += take
            k += 1
        return out


@dataclass
class ReaderState:
    epoch: int = 0
    index: int = 0  # windows of this epoch already served

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


class BatchReader:
    """(B, T) input/label batches from non-overlapping windows of T+1 tokens, visited in a fresh
    seeded permutation each epoch. The position (epoch, index) is all the state there is."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, *, seed: int = 0,
                 shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.seed, self.shuffle = seed, shuffle
        self.n_windows = (len(stream) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{stream.path} ({stream.split}): {len(stream)} tokens is fewer than seq_len+1 = "
                             f"{seq_len + 1}; use a shorter --seq-len or more text")
        self.state = ReaderState()
        self._order_epoch = -1
        self._order = np.arange(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.n_windows) if self.shuffle
                           else np.arange(self.n_windows))
            self._order_epoch = epoch
        return self._order

    def next_windows(self, n: int) -> np.ndarray:
        """Window indices for the next n rows (wrapping into the next epoch)."""
        out = []
        while len(out) < n:
            order = self._epoch_order(self.state.epoch)
            take = min(n - len(out), self.n_windows - self.state.index)
            out.extend(order[self.state.index:self.state.index + take].tolist())
            self.state.index += take
            if self.state.index >= self.n_windows:
                self.state = ReaderState(self.state.epoch + 1, 0)
        return np.asarray(out, dtype=np.int64)

    def rows(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        buf = np.stack([self.stream.get(int(w) * T, T + 1) for w in windows])
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, T), labels (B, T) int64."""
        return self.rows(self.next_windows(self.batch_size))

    def state_dict(self) -> dict[str, Any]:
        return {**self.state.to_dict(), "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "n_windows": self.n_windows, "shuffle": self.shuffle}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "seq_len", "n_windows", "shuffle"):
            if d.get(key) != getattr(self, key):
                raise ValueError(f"data position: saved {key}={d.get(key)!r} but this run has {getattr(self, key)!r}; "
                                 "resume with the same data and batch settings")
        epoch, index = int(d["epoch"]), int(d["index"])
        if epoch < 0 or not 0 <= index < self.n_windows:
            raise ValueError(f"data position: epoch={epoch} index={index} is outside the dataset")
        self.state = ReaderState(epoch, index)
