"""Sharded initialisation from a checkpoint: `giants train --init WEIGHTS` under scale-out.

The same order as giants.parallel.init.materialize_sharded (meta build -> plan -> allocate the rank's shards ->
fill), but the values come from the checkpoint instead of the seeded stream. Every rank reads the parameters it
holds a part of (all of them under FSDP/TP/EP, its own layers as a pipeline stage), one full parameter at a time in
host memory (in the file's dtype; a stacked or fused tensor is assembled expert by
expert), keeps its part (the Shard / Replicate slice is cut on the host, so only the local part reaches the
device) and drops the rest, casting to the parameter's dtype (fp32) on the copy. A rank's peak is its shards
plus one full parameter: a model larger than one device, or than host memory x ranks, starts. Values equal
`giants.load(path, dtype=torch.float32)` bit for bit (the same reads and the same name-map transforms).

Read: HF safetensors directories (giants' or transformers' export, HF or giants tensor names, sharded or not;
gpt-oss MXFP4 experts dequantized one expert at a time), GGUF files (tensor by tensor through the GGUF reader,
dequantized in fp32), and a giants run's final/ directory (an HF export). Refused by name: FP8 checkpoints.
Every check giants.load makes on headers (names, shapes, dtypes, the config against the tensors) runs before
any shard is allocated; a stored lm_head under a tied config must equal the embedding, as giants.load checks.
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from giants.checkpoint import hf_map, mxfp4
from giants.checkpoint.errors import CheckpointError
from giants.checkpoint.safetensors_io import SafetensorsSet
from giants.config import ModelConfig
from giants.parallel.init import Materialized, _copy_into, _numel, allocate

Tensors = Iterator[tuple[str, torch.Tensor]]

# gpt-oss rules whose HF tensors and giants tensors both lead with the expert axis and whose transform works on
# any number of experts: assembled one expert at a time (the fused gate|up tensor is twice a parameter)
_PER_EXPERT = ("experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj")


class InitRefused(ValueError):
    """A checkpoint `--init` under scale-out cannot read shard by shard (said by name, never a full load)."""


def _rows(st: SafetensorsSet, name: str, e: int) -> torch.Tensor:
    """Expert `e` (rows [e, e+1) of the leading axis) of HF tensor `name`, dequantized when stored as MXFP4."""
    from giants.checkpoint.loading import _mxfp4_parts

    parts = _mxfp4_parts(name)
    if name in st or parts is None or parts[0] not in st:
        return st.read_rows(name, e, e + 1)
    blocks, scales = st.read_rows(parts[0], e, e + 1), st.read_rows(parts[1], e, e + 1)
    try:
        return mxfp4.dequantize(blocks, scales, torch.float32)
    except mxfp4.ScaleError as err:
        raise CheckpointError(f"{err} (expert {e})", file=st.file_of(parts[1]), tensor=parts[1]) from None
    except ValueError as err:
        raise CheckpointError(str(err), file=st.file_of(parts[0]), tensor=parts[0]) from None


def _hf_tensors(st: SafetensorsSet, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]],
                wanted: Container[str]) -> Tensors:
    from giants.checkpoint.loading import _MXFP4View

    view = _MXFP4View(st)
    for rule in hf_map.family_rules(cfg):
        if not any(o in wanted for o in rule.ours):
            continue  # another pipeline stage's tensors: not read at all
        if rule.identity and rule.hf[0] in st:
            yield rule.ours[0], st[rule.hf[0]]
        elif len(rule.ours) == 1 and len(rule.hf) > 1 and all(n in st for n in rule.hf):
            # one tensor stacked from one per expert (Mixtral): each read straight into its row
            full = torch.empty(shapes[rule.ours[0]], dtype=st.entries[rule.hf[0]].torch_dtype)
            for e, n in enumerate(rule.hf):
                st.read_into(n, full[e])
            yield rule.ours[0], full
            del full
        elif rule.hf[0].endswith(_PER_EXPERT):
            for k, ours in enumerate(rule.ours):  # one output at a time: the file is read once per output
                if ours not in wanted:
                    continue
                full = None
                for e in range(shapes[ours][0]):
                    piece = rule.to_ours([_rows(st, n, e) for n in rule.hf])[k]
                    if full is None:
                        full = torch.empty(shapes[ours], dtype=piece.dtype)
                    full[e:e + 1] = piece
                assert full is not None
                yield ours, full
                del full
        else:
            inputs = [view[n] for n in rule.hf]
            outs = rule.to_ours(inputs)
            del inputs
            while outs:
                ours = rule.ours[len(rule.ours) - len(outs)]
                t = outs.pop(0)
                if ours in wanted:
                    yield ours, t
                del t


def _dir_tensors(path: Path, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], wanted: Container[str]) -> Tensors:
    """Checks the headers now (before any shard is allocated); returns the reading generator."""
    from giants.checkpoint.loading import _check_dir, _check_tied_head, read_dir

    stored, naming, st = read_dir(path)
    if stored.to_dict() != cfg.to_dict():
        raise CheckpointError("the checkpoint's config is not the model's the plan was applied to", file=path)
    _check_dir(st, cfg, naming, path)

    def read() -> Tensors:
        it: Tensors = ((n, st[n]) for n in shapes if n in wanted) if naming == "giants" else \
            _hf_tensors(st, cfg, shapes, wanted)
        for name, t in it:
            if name == "embed.weight":
                _check_tied_head(st, cfg, t)
            yield name, t

    return read()


def _gguf_tensors(path: Path, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], wanted: Container[str]) -> Tensors:
    """Checks the GGUF metadata and tensor table now; returns the reading generator."""
    from giants.checkpoint.gguf_io import GGUFFile
    from giants.cpu import bulk_threads

    g = GGUFFile(path)
    if g.config.to_dict() != cfg.to_dict():
        raise CheckpointError("the checkpoint's config is not the model's the plan was applied to", file=path)
    g.check(shapes)
    unfilled = sorted(set(shapes) - {r.ours for r in g.rules})
    if unfilled:
        raise CheckpointError(f"no tensor of this {g.arch} file fills the model's {unfilled[0]!r}", file=path)

    def read() -> Tensors:
        with bulk_threads():  # no spinning OpenMP barriers while the other ranks hold the cores
            yield from g.items(wanted)

    return read()


def checkpoint_tensors(source: str | os.PathLike, cfg: ModelConfig, wanted: Container[str] | None = None) -> Tensors:
    """(giants name, full tensor in host memory) for every parameter of `cfg`'s model (or those named in `wanted`:
    the others are not read), one at a time, from anything giants.load reads except FP8 checkpoints (InitRefused).
    The header checks (of every tensor) run before the first tensor is read; the caller drops each tensor before
    asking for the next."""
    from giants.checkpoint import quantized
    from giants.checkpoint.files import check_regular
    from giants.checkpoint.loading import meta_model, resolve

    path = resolve(source)
    if not path.is_dir():
        check_regular(path)
    if quantized.needs(path, None):
        raise InitRefused(f"--init FP8 checkpoint under scale-out: {path} stores FP8 weights, which are dequantized "
                          "only by the whole-model loader; dequantize it once (giants.load(path, dtype="
                          "torch.bfloat16) then giants.save) and pass that directory")
    shapes = {n: tuple(p.shape) for n, p in meta_model(cfg).named_parameters()}
    wanted = shapes if wanted is None else wanted
    if path.is_file() and path.suffix == ".gguf":
        it = _gguf_tensors(path, cfg, shapes, wanted)
    elif path.is_dir() or path.suffix == ".safetensors" or path.name.endswith(".json"):
        it = _dir_tensors(path if path.is_dir() else path.parent, cfg, shapes, wanted)
    else:
        raise CheckpointError("not a checkpoint: expected a directory or a .gguf file", file=path)
    return it


@torch.no_grad()
def materialize_from_checkpoint(parts: nn.Module | Iterable[nn.Module], source: str | os.PathLike,
                                config: ModelConfig, device: torch.device | str) -> Materialized:
    """Allocate the meta-built, already parallelized `parts` (a Transformer, or this rank's pipeline stage parts
    under the whole model's parameter names) on `device` and fill each parameter with its slice of the
    checkpoint `source` (`config` is its config). Only this rank's parameters are read from the file (a pipeline
    stage reads its own layers). Every rank of the job must call it (a torch older than 2.7 may scatter FSDP's
    _StridedShard placements)."""
    from giants.checkpoint.loading import meta_model

    device = torch.device(device)
    parts = [parts] if isinstance(parts, nn.Module) else list(parts)
    names = {n for part in parts for n, _ in part.named_parameters()}
    tensors = checkpoint_tensors(source, config, names)  # refusals and header checks before anything is allocated
    local = allocate(parts, device)
    done: set[str] = set()
    full_numel = sum(p.numel() for p in meta_model(config).parameters())
    largest = read = 0
    for name, full in tensors:
        read += full.numel()
        largest = max(largest, full.numel())
        p = local.get(name)
        if p is not None:
            if tuple(full.shape) != tuple(p.shape):  # (a DTensor's shape is the full one)
                raise CheckpointError(f"shape {tuple(full.shape)}, the model's {tuple(p.shape)}", file=Path(source),
                                      tensor=name)
            _copy_into(p, full, on_host=full.device != device)
            done.add(name)
        del full
    missing = sorted(set(local) - done)
    if missing:
        raise CheckpointError(f"no tensor of the checkpoint fills the model's {missing[0]!r}"
                              + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""), file=Path(source))
    return Materialized(sum(_numel(p) for p in local.values()), full_numel, largest, len(local), read)


__all__ = ["InitRefused", "checkpoint_tensors", "materialize_from_checkpoint"]
