"""GGUF header validation before `gguf.GGUFReader` sees a file. The reader trusts its input: a huge array count
in the metadata makes it loop (and allocate) without end. So the header is walked once here, every count and
length checked against the bytes actually left in the file; after that pass the reader cannot run away."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from giants.checkpoint.errors import CheckpointError
from giants.checkpoint.files import open_regular

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
# GGUF value types -> byte width of a scalar; 8 = string, 9 = array
_SCALAR_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Cursor:
    def __init__(self, f, size: int, path: Path) -> None:
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise CheckpointError(f"truncated or corrupt GGUF header: {what} needs {n} bytes at offset {self.pos}, "
                                  f"{self.left()} left", file=self.path)

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.f.read(n)
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.read(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.read(8, what))[0]

    def string(self, what: str, keep: bool = False) -> str | None:
        n = self.u64(what + " length")
        if not keep:
            self.skip(n, what)
            return None
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{what} is not valid UTF-8", file=self.path) from None


def _skip_value(c: _Cursor, vtype: int, key: str, depth: int = 0) -> None:
    if vtype in _SCALAR_WIDTH:
        c.skip(_SCALAR_WIDTH[vtype], f"value of {key!r}")
    elif vtype == 8:
        c.string(f"string value of {key!r}")
    elif vtype == 9:
        if depth >= MAX_ARRAY_DEPTH:
            raise CheckpointError(f"metadata {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH}", file=c.path)
        sub = c.u32(f"array type of {key!r}")
        count = c.u64(f"array length of {key!r}")
        if sub in _SCALAR_WIDTH:
            c.skip(count * _SCALAR_WIDTH[sub], f"array {key!r} of {count} values")
            return
        if sub not in (8, 9):
            raise CheckpointError(f"metadata {key!r}: unknown array element type {sub}", file=c.path)
        # Every string / array element takes at least 8 bytes, so a count the file cannot hold is refused
        # before we loop over it.
        c.need(count * 8, f"array {key!r} of {count} elements")
        for _ in range(count):
            _skip_value(c, sub, key, depth + 1)
    else:
        raise CheckpointError(f"metadata {key!r}: unknown value type {vtype}", file=c.path)


def validate_gguf(path: str | Path) -> None:
    """Bounds-check the whole header (metadata and tensor table) of a GGUF file without trusting it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    f = open_regular(path)  # a FIFO or device is refused, never waited on
    with f:
        size = os.fstat(f.fileno()).st_size
        c = _Cursor(f, size, path)
        if size < 4 or c.read(4, "magic") != GGUF_MAGIC:
            raise CheckpointError("not a GGUF file (bad magic)", file=path)
        version = c.u32("version")
        if version not in (2, 3):
            raise CheckpointError(f"unsupported GGUF version {version} (supported: 2, 3)", file=path)
        n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
        c.need(n_kv * 13, f"{n_kv} metadata entries")  # key length (8) + type (4) + >= 1 byte value
        alignment = 32
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}", keep=True)
            vtype = c.u32(f"type of {key!r}")
            if key == "general.alignment":
                if vtype != 4:
                    raise CheckpointError("general.alignment must be uint32", file=path)
                alignment = c.u32("general.alignment")
                if alignment == 0 or alignment & (alignment - 1):
                    raise CheckpointError(f"general.alignment {alignment} is not a power of two", file=path)
            else:
                _skip_value(c, vtype, key)
        c.need(n_tensors * 24, f"{n_tensors} tensor entries")  # name len + ndim + type + offset
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}", keep=True)
            ndim = c.u32(f"dimension count of {name!r}")
            if not 1 <= ndim <= MAX_DIMS:
                raise CheckpointError(f"{ndim} dimensions (GGML allows 1..{MAX_DIMS})", file=path, tensor=name)
            dims = [c.u64(f"shape of {name!r}") for _ in range(ndim)]
            raw_type = c.u32(f"type of {name!r}")
            offset = c.u64(f"offset of {name!r}")
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(f"unknown GGML type {raw_type}", file=path, tensor=name) from None
            if dims[0] % block:
                raise CheckpointError(f"row length {dims[0]} is not a multiple of the {qtype.name} block {block}",
                                      file=path, tensor=name)
            n = 1
            for d in dims:
                n *= d
            infos.append((name, offset, n // block * type_size))
        data_start = c.pos + (-c.pos % alignment)
        for name, offset, nbytes in infos:
            if data_start + offset + nbytes > size:
                raise CheckpointError(f"data at offset {offset} (+{nbytes} bytes) runs past the end of the file "
                                      f"({size} bytes): truncated?", file=path, tensor=name)
        _check_overlaps(infos, path)


def _check_overlaps(infos: list[tuple[str, int, int]], path: Path) -> None:
    """No two tensors may share data bytes (one would silently load the other's weights)."""
    spans = sorted((offset, offset + nbytes, name) for name, offset, nbytes in infos if nbytes)
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CheckpointError(f"data [{a0}, {a1}) overlaps tensor {b!r} at [{b0}, {b1}) (relative to the data "
                                  "section): each tensor needs bytes of its own", file=path, tensor=a)
