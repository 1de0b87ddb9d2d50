"""Safetensors files and HF shard sets as one lazy name -> tensor mapping.

Each file is checked twice before any tensor byte is read: by safetensors' own parser (`safe_open`,
which bounds the header and validates offsets against the file length) and by us against the header
JSON (known dtype, shape x itemsize == byte span, spans inside the file). Tensors are then read with
positioned reads, straight into the destination parameter when dtype and layout already match, so
loading never holds the checkpoint's mmap pages and a second copy of the weights at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from giants.checkpoint.errors import CheckpointError
from giants.checkpoint.files import exists, open_regular, read_text

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
ST_NAMES = {v: k for k, v in DTYPES.items()}
FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class Entry:
    name: str
    file: Path
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """(entries, __metadata__) of one .safetensors file, validated against the file's real size."""
    from safetensors import safe_open

    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"truncated: {size} bytes, too short for a header", file=path)
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"header length {n} is impossible for a {size}-byte file (truncated or "
                                      "not safetensors)", file=path)
            header = json.loads(f.read(n).decode("utf-8"))
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"header is not valid JSON: {type(e).__name__}: {e}", file=path) from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", file=path)
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and isinstance(offsets, list) and all(
                    isinstance(x, int) and not isinstance(x, bool) for x in shape + offsets)):
                raise TypeError("shape and data_offsets must be lists of integers")
            shape, (b, e) = tuple(shape), offsets
        except (TypeError, KeyError, ValueError):
            raise CheckpointError("malformed header entry", file=path, tensor=name) from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"unsupported dtype {dtype!r}", file=path, tensor=name)
        if any(d < 0 for d in shape) or not 0 <= b <= e or base + e > size:
            raise CheckpointError(f"bad shape {shape} or data offsets [{b}, {e}) (file has {size - base} data "
                                  "bytes): truncated or corrupt", file=path, tensor=name)
        if math.prod(shape) * DTYPES[dtype].itemsize != e - b:
            raise CheckpointError(f"shape {shape} of {dtype} needs {math.prod(shape) * DTYPES[dtype].itemsize} "
                                  f"bytes, the header gives {e - b}", file=path, tensor=name)
        entries[name] = Entry(name, path, dtype, shape, base + b, base + e)
    try:  # and safetensors' own validation (overlaps, gaps, exact file length)
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise CheckpointError(f"not a valid safetensors file: {type(e).__name__}: {e}", file=path) from None
    return entries, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


class SafetensorsSet:
    """A lazy `Mapping[str, Tensor]` over one file, or the shards an HF index names."""

    def __init__(self, files: list[Path], index: Path | None = None) -> None:
        self.files = list(files)
        self.entries: dict[str, Entry] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            entries, meta = read_header(f)
            self.metadata.update(meta)
            for name, e in entries.items():
                if name in self.entries:
                    raise CheckpointError(f"appears in two shards ({self.entries[name].file.name} and {f.name})",
                                          file=f, tensor=name)
                self.entries[name] = e
        self.index = index

    @classmethod
    def from_dir(cls, path: Path) -> SafetensorsSet:
        index = path / "model.safetensors.index.json"
        if exists(index):
            try:
                weight_map = json.loads(read_text(index))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map must be a JSON object")
            except CheckpointError:
                raise
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"bad index: {type(e).__name__}: {e}", file=index) from None
            for name, shard in weight_map.items():
                if not isinstance(shard, str):
                    raise CheckpointError(f"index maps it to {shard!r}, not a shard file name", file=index,
                                          tensor=name)
            names = sorted(set(weight_map.values()))
            for n in names:
                if Path(n).name != n or n in ("", ".", ".."):  # no path tricks: shards sit beside the index
                    raise CheckpointError(f"shard name {n!r} is not a plain file name", file=index)
                if not exists(path / n):
                    raise CheckpointError(f"shard {n} named by the index is missing", file=index)
            st = cls([path / n for n in names], index)
            for name, shard in weight_map.items():
                if name not in st.entries:
                    raise CheckpointError(f"index says it is in {shard}, which lacks it", file=path / shard,
                                          tensor=name)
                if st.entries[name].file.name != shard:
                    raise CheckpointError(f"index says {shard}, found in {st.entries[name].file.name}",
                                          file=index, tensor=name)
            extra = sorted(set(st.entries) - set(weight_map))
            if extra:
                raise CheckpointError("tensor in a shard but not in the index", file=st.entries[extra[0]].file,
                                      tensor=extra[0])
            return st
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError("no model.safetensors or model.safetensors.index.json", file=path)
        if len(files) > 1:
            raise CheckpointError(f"{len(files)} .safetensors files but no model.safetensors.index.json", file=path)
        return cls(files)

    # -- Mapping protocol (what hf_map needs) --
    def keys(self):
        return self.entries.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=e.torch_dtype)
        self._read(e, out)
        return out

    def file_of(self, name: str) -> Path:
        return self.entries[name].file

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor `name` into `out` (any device / dtype); zero-copy read when layouts agree."""
        e = self.entries[name]
        if tuple(out.shape) != e.shape:
            raise CheckpointError(f"shape {e.shape} does not fit the model's {tuple(out.shape)}", file=e.file,
                                  tensor=name)
        if out.device.type == "cpu" and out.dtype == e.torch_dtype and out.is_contiguous():
            self._read(e, out)
        else:
            out.copy_(self[name])

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` along its first axis, read without the rest of it."""
        e = self.entries[name]
        if not e.shape or not 0 <= start <= stop <= e.shape[0]:
            raise CheckpointError(f"rows [{start}, {stop}) outside shape {e.shape}", file=e.file, tensor=name)
        out = torch.empty((stop - start, *e.shape[1:]), dtype=e.torch_dtype)
        self._read(e, out, offset=start * out[:1].nbytes if stop > start else 0)
        return out

    def _read(self, e: Entry, out: torch.Tensor, offset: int = 0) -> None:
        """Fill `out` (contiguous CPU, e's dtype) with its byte size from e.start + offset."""
        want = out.numel() * out.element_size()
        if want == 0:
            return
        if offset < 0 or offset + want > e.nbytes:
            raise CheckpointError(f"read of {want} bytes at {offset} outside the tensor's {e.nbytes}", file=e.file,
                                  tensor=e.name)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        try:
            with open_regular(e.file, buffering=0) as f:
                f.seek(e.start + offset)
                got = 0
                while got < want:  # one read() may return less than asked (2 GiB cap on Linux)
                    n = f.readinto(buf[got:])
                    if not n:
                        raise CheckpointError(f"file ended after {got} of {want} bytes: truncated",
                                              file=e.file, tensor=e.name)
                    got += n
        except OSError as err:
            raise CheckpointError(f"read failed: {err.strerror or err}", file=e.file, tensor=e.name) from None


def write_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
    # safetensors does not fsync; the caller renames a finished directory into place.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
