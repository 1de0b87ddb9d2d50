"""The messages between rank 0 and its tensor-parallel workers, without pickle: a JSON header (plain values,
with tagged dtypes, configs and shard specs) followed by one safetensors blob holding every tensor. Nothing
here can construct an arbitrary object, so a message is data, whoever wrote it.

Layout: 8-byte little-endian header length | JSON header | safetensors bytes (absent when no tensor).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from giants.config import ModelConfig

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64,
    torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


class WireError(ValueError):
    """A message that does not follow the format."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    from giants.inference.tp_model import ShardSpec

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if isinstance(obj, ModelConfig):
        return {"__config__": obj.to_dict()}
    if isinstance(obj, ShardSpec):
        return {"__spec__": {f.name: _encode(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj)}}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise WireError(f"dict keys must be strings, got {sorted({type(k).__name__ for k in obj})}")
        return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
    raise WireError(f"cannot send a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    from giants.inference.tp_model import ShardSpec

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict) or len(obj) != 1:
        raise WireError(f"malformed value {str(obj)[:80]!r}")
    (tag, val), = obj.items()
    if tag == "__tensor__":
        return tensors[val]
    if tag == "__dtype__":
        if val not in _DTYPES:
            raise WireError(f"unknown dtype {val!r}")
        return _DTYPES[val]
    if tag == "__device__":
        return torch.device(val)
    if tag == "__config__":
        return ModelConfig.from_dict(val)
    if tag == "__spec__":
        names = {f.name for f in dataclasses.fields(ShardSpec)}
        if set(val) - names:
            raise WireError(f"unknown ShardSpec fields {sorted(set(val) - names)}")
        return ShardSpec(**{k: _decode(v, tensors) for k, v in val.items()})
    if tag == "__dict__":
        return {k: _decode(v, tensors) for k, v in val.items()}
    raise WireError(f"unknown tag {tag!r}")


def dumps(obj: Any) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    header = json.dumps(_encode(obj, tensors), allow_nan=True).encode()
    blob = st_save(tensors) if tensors else b""
    return struct.pack("<Q", len(header)) + header + blob


def loads(buf: bytes) -> Any:
    if len(buf) < 8:
        raise WireError(f"message of {len(buf)} bytes is shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise WireError(f"header length {n} runs past the message's {len(buf)} bytes")
    try:
        header = json.loads(buf[8:8 + n])
    except json.JSONDecodeError as e:
        raise WireError(f"header is not JSON: {e}") from e
    tensors = st_load(bytes(buf[8 + n:])) if len(buf) > 8 + n else {}
    return _decode(header, tensors)
