"""One tensor-parallel rank's share of a checkpoint, read without the rest of it.

Each parameter's split comes from `giants.parallel.layout.tp_shard` (the one split table). For safetensors
(HF or giants naming) a rank reads its rows or columns of each tensor and nothing else: positioned reads of
exactly those byte runs (`SliceReader`), straight into the parameter when the dtype agrees. No file is
mapped (a mapped column slice would page in the whole tensor), so resident memory stays the shard plus at
most one slice-sized buffer for tensors that are converted, stacked or de-interleaved. HF name-map rules that
fuse, stack or transpose tensors are sliced in the HF layout at the positions that map onto the giants slice
(see `_hf_index`), then the rule's own transform runs on the slices.
MXFP4-packed gpt-oss experts are sliced in their packed layout and dequantized per slice.

GGUF: quantized tensors are sliced by whole quantization blocks in the file mapping (rows freely, columns at
block boundaries), dequantized per slice; Q/K rows llama.cpp permuted for rotary are un-permuted per head.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from giants.checkpoint import hf_map, mxfp4
from giants.checkpoint.errors import CheckpointError
from giants.checkpoint.safetensors_io import SafetensorsSet
from giants.config import ModelConfig
from giants.parallel.layout import tp_shard

Index = tuple[slice, ...]
Shard = tuple[int, int, int] | None


def _index(ndim: int, shard: Shard, offset: int = 0) -> Index:
    """The slices selecting `shard` (dim, start, end) of an ndim tensor; dim shifted by `offset`."""
    idx = [slice(None)] * ndim
    if shard is not None:
        dim, a, b = shard
        idx[dim + offset] = slice(a, b)
    return tuple(idx)


class SliceReader:
    """Slices of safetensors tensors by positioned reads of exactly their bytes (no mapping of the file): a
    slice along one dim of a row-major tensor is `outer` runs of contiguous bytes, each read with os.preadv
    straight into the destination (the parameter itself when dtype and layout agree, else one slice-sized
    buffer). `bytes_read` counts every byte read; `_pread` is the one place that reads."""

    def __init__(self, st: SafetensorsSet) -> None:
        self.st = st
        self.bytes_read = 0

    def shape(self, name: str) -> tuple[int, ...]:
        return self.st.entries[name].shape

    def _pread(self, fd: int, buf: memoryview, offset: int, e) -> None:
        got = 0
        while got < len(buf):
            n = os.preadv(fd, [buf[got:]], offset + got)
            if not n:
                raise CheckpointError(f"file ended {got} bytes into a {len(buf)}-byte read at {offset}: truncated",
                                      file=e.file, tensor=e.name)
            got += n
        self.bytes_read += got

    def read(self, name: str, index: Index, out: torch.Tensor | None = None) -> torch.Tensor:
        """tensor[index] (at most one dim sliced, step 1), into `out` when it fits (CPU, contiguous, the file's
        dtype and the slice's shape), else into a new tensor; returns what it filled."""
        e = self.st.entries[name]
        shape = e.shape
        cut = [(d, *s.indices(shape[d])) for d, s in enumerate(index) if s.indices(shape[d]) != (0, shape[d], 1)]
        if len(cut) > 1 or any(c[3] != 1 for c in cut):
            raise CheckpointError(f"slice {index} cuts more than one dim (or steps): not a tensor-parallel share",
                                  file=e.file, tensor=name)
        d, a, b = cut[0][:3] if cut else (0, 0, shape[0] if shape else 1)
        out_shape = tuple(b - a if i == d else n for i, n in enumerate(shape))
        if out is None or out.device.type != "cpu" or out.dtype != e.torch_dtype or not out.is_contiguous() \
                or tuple(out.shape) != out_shape:
            out = torch.empty(out_shape, dtype=e.torch_dtype)
        if out.numel() == 0:
            return out
        item = e.torch_dtype.itemsize
        inner = math.prod(shape[d + 1:]) * item if shape else item
        outer = math.prod(shape[:d]) if shape else 1
        seg, stride = (b - a) * inner, (shape[d] if shape else 1) * inner
        mv = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
        try:
            fd = os.open(e.file, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"cannot open: {err.strerror or err}", file=e.file, tensor=name) from None
        try:
            if seg == stride:  # the whole tensor, or a dim-0 slice: one run
                self._pread(fd, mv, e.start + a * inner, e)
            else:
                for o in range(outer):
                    self._pread(fd, mv[o * seg:(o + 1) * seg], e.start + o * stride + a * inner, e)
        except OSError as err:
            raise CheckpointError(f"read failed: {err.strerror or err}", file=e.file, tensor=name) from None
        finally:
            os.close(fd)
        return out


def _hf_index(rule: hf_map.Rule, shards: list[Shard], reader: SliceReader) -> list[Index]:
    """For each HF input of `rule`, the slices whose transform gives our shards. Rules that only rename slice
    at the same place; stacked experts (Mixtral) one dim lower; gpt-oss' interleaved gate|up (HF (E, D, 2F),
    ours (E, F, D) x2) at [2a, 2b) of the last axis; gpt-oss down_proj (HF (E, F, D), ours (E, D, F)) on dim 1."""
    hf = rule.hf
    first = next((s for s in shards if s is not None), None)
    if first is None:
        return [_index(len(reader.shape(n)), None) for n in hf]
    if len(rule.ours) == 1 and len(hf) == 1 and rule.identity:
        return [_index(len(reader.shape(hf[0])), shards[0])]
    if len(rule.ours) == 1 and len(hf) > 1:  # one tensor stacked from one per expert
        return [_index(len(reader.shape(n)), shards[0], offset=-1) for n in hf]
    dim, a, b = first
    name = hf[0]
    if name.endswith("experts.gate_up_proj") and dim == 1 and len(set(shards)) == 1:
        return [(slice(None), slice(None), slice(2 * a, 2 * b))]
    if name.endswith("experts.gate_up_proj_bias") and dim == 1 and len(set(shards)) == 1:
        return [(slice(None), slice(2 * a, 2 * b))]
    if name.endswith("experts.down_proj") and dim == 2:
        return [(slice(None), slice(a, b), slice(None))]
    raise CheckpointError(f"no tensor-parallel slice mapping for the HF rule {rule.hf[0]!r} -> {rule.ours}; "
                          "add one to giants.checkpoint.sharded._hf_index", tensor=rule.hf[0])


def _read_hf(reader: SliceReader, name: str, index: Index) -> torch.Tensor:
    """HF tensor `name`[index], serving gpt-oss `*_proj` from MXFP4 `*_blocks` + `*_scales` when so stored."""
    st = reader.st
    parts = name + "_blocks", name + "_scales"
    if name in st or parts[0] not in st:
        return reader.read(name, index)
    # packed W^T (E, N, K): blocks (E, N, K/32, 16), scales (E, N, K/32); index is over W (E, K, N)
    e_sl, k_sl, n_sl = index
    k0, k1, _ = k_sl.indices(reader.shape(parts[1])[2] * mxfp4.BLOCK)
    if k0 % mxfp4.BLOCK or k1 % mxfp4.BLOCK:
        raise CheckpointError(f"MXFP4 experts can only be split at multiples of {mxfp4.BLOCK} along the reduction "
                              f"axis (this rank's slice is [{k0}, {k1})): choose a tensor parallel size that leaves "
                              f"ffn_dim / tp a multiple of {mxfp4.BLOCK}", tensor=parts[0])
    kb = slice(k0 // mxfp4.BLOCK, k1 // mxfp4.BLOCK)
    blocks = reader.read(parts[0], (e_sl, n_sl, kb, slice(None)))
    scales = reader.read(parts[1], (e_sl, n_sl, kb))
    try:
        return mxfp4.dequantize(blocks, scales, torch.float32)
    except mxfp4.ScaleError as err:  # block index within this rank's slice
        raise CheckpointError(f"{err} in this rank's slice", file=st.file_of(parts[1]), tensor=parts[1]) from None
    except ValueError as err:
        raise CheckpointError(str(err), tensor=parts[0]) from None


def load_dir_shard(path: Path, cfg: ModelConfig, naming: str, params: dict[str, torch.Tensor], rank: int, tp: int,
                   reader_hook: Callable[[SliceReader], None] | None = None) -> int:
    """Fill `params` (one rank's local tensors) from the checkpoint directory; returns the bytes read."""
    from giants.checkpoint.loading import _check_dir

    st = SafetensorsSet.from_dir(path)
    _check_dir(st, cfg, naming, path)  # headers only: names, shapes, dtypes
    reader = SliceReader(st)
    if reader_hook is not None:
        reader_hook(reader)
    full = _full_shapes(cfg)

    def put(ours: str, t: torch.Tensor, where: str) -> None:
        p = params[ours]
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"rank {rank}'s slice has shape {tuple(t.shape)}, its parameter "
                                  f"{tuple(p.shape)}", file=path, tensor=where)
        p.copy_(t)

    with torch.no_grad():
        if naming == "giants":
            for name in params:
                t = reader.read(name, _index(len(full[name]), tp_shard(cfg, name, full[name], rank, tp)),
                                out=params[name])
                if t is not params[name]:
                    put(name, t, name)
        else:
            for rule in hf_map.family_rules(cfg):
                shards = [tp_shard(cfg, o, full[o], rank, tp) for o in rule.ours]
                index = _hf_index(rule, shards, reader)
                if rule.identity and rule.hf[0] in st:  # straight into the parameter when the dtype agrees
                    t = reader.read(rule.hf[0], index[0], out=params[rule.ours[0]])
                    if t is not params[rule.ours[0]]:
                        put(rule.ours[0], t, rule.hf[0])
                    continue
                inputs = [_read_hf(reader, n, i) for n, i in zip(rule.hf, index)]
                for ours, t in zip(rule.ours, rule.to_ours(inputs)):
                    put(ours, t, rule.hf[0])
                del inputs
            _check_tied_head_slice(reader, cfg, params, rank, tp)
    return reader.bytes_read


def _check_tied_head_slice(reader: SliceReader, cfg: ModelConfig, params: dict[str, torch.Tensor], rank: int,
                           tp: int) -> None:
    """A tied config with a stored lm_head: this rank's rows of it must equal its rows of the embedding."""
    name = "lm_head.weight"
    if not cfg.tie_embeddings or name not in reader.st:
        return
    emb = params["embed.weight"]
    shard = tp_shard(cfg, "embed.weight", (cfg.vocab_size, cfg.d_model), rank, tp)
    e = reader.st.entries[name]
    if e.shape != (cfg.vocab_size, cfg.d_model):
        raise CheckpointError(f"config ties the embeddings, but the stored head has shape {e.shape}", file=e.file,
                              tensor=name)
    part = reader.read(name, _index(2, shard))
    if not torch.equal(part.to(device=emb.device, dtype=emb.dtype), emb):
        raise CheckpointError("config ties the embeddings (tie_word_embeddings), but the stored head differs "
                              "from the embedding", file=e.file, tensor=name)


def _full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from giants.checkpoint.loading import meta_model

    return {n: tuple(p.shape) for n, p in meta_model(cfg).named_parameters()}


# ---- GGUF ------------------------------------------------------------------------------------------
def _gguf_slice(t, shard: Shard, offset: int, path: Path) -> np.ndarray:
    """Rows/columns of one GGUF tensor (numpy dims, quantized rows as bytes) before dequantization."""
    from gguf.constants import GGML_QUANT_SIZES

    data = t.data
    if shard is None:
        return data
    dim, a, b = shard
    dim += offset
    ndim = len(t.shape)
    block, type_size = GGML_QUANT_SIZES[t.tensor_type]
    idx = [slice(None)] * data.ndim
    if dim == ndim - 1 and block > 1:  # columns of a quantized tensor: whole blocks of each row
        if a % block or b % block:
            raise CheckpointError(f"a {t.tensor_type.name} tensor can only be split at multiples of its {block}-"
                                  f"value blocks along a row; this rank's columns are [{a}, {b}) (choose a tensor "
                                  "parallel size that leaves the split dimension a multiple of the block)",
                                  file=path, tensor=t.name)
        idx[-1] = slice(a // block * type_size, b // block * type_size)
    else:
        idx[dim] = slice(a, b)
    return np.ascontiguousarray(data[tuple(idx)])


def load_gguf_shard(path: Path, params: dict[str, torch.Tensor], rank: int, tp: int) -> int:
    """Fill `params` from a GGUF file, each tensor sliced before dequantization; returns the bytes read."""
    from gguf.quants import dequantize

    from giants.checkpoint.gguf_io import GGUFFile, _unpermute, check_mxfp4_scales

    g = GGUFFile(path)
    cfg = g.config
    full = _full_shapes(cfg)
    g.check(full)
    nbytes = 0
    with torch.no_grad():
        for r in g.rules:
            shard = tp_shard(cfg, r.ours, full[r.ours], rank, tp)
            parts = []
            for name in r.gguf:
                t = g.tensors[name]
                raw = _gguf_slice(t, shard, -1 if len(r.gguf) > 1 else 0, path)
                nbytes += raw.nbytes
                check_mxfp4_scales(raw, t.tensor_type, name, path)  # an E8M0 NaN scale would decode to inf
                try:
                    arr = dequantize(raw, t.tensor_type)
                except NotImplementedError:
                    raise CheckpointError(f"GGML type {t.tensor_type.name} cannot be dequantized", file=path,
                                          tensor=name) from None
                parts.append(torch.from_numpy(np.array(arr, dtype=np.float32)))
            x = parts[0] if len(parts) == 1 else torch.stack(parts)
            fix = r.fix
            if fix is not None and shard is not None and r.ours.endswith(("q_proj.weight", "k_proj.weight",
                                                                             "q_proj.bias", "k_proj.bias")):
                fix = _unpermute(x.shape[0] // cfg.head_dim)  # this rank's heads, each un-permuted alone
            if fix is not None:
                x = fix(x)
            p = params[r.ours]
            if math.prod(x.shape) != p.numel():
                raise CheckpointError(f"rank {rank}'s slice has shape {tuple(x.shape)}, its parameter "
                                      f"{tuple(p.shape)}", file=path, tensor=r.gguf[0])
            p.copy_(x.reshape(p.shape))
    return nbytes
