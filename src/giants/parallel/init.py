"""Sharded initialisation: a model built on the meta device, parallelized there (TP / EP / pipeline split / FSDP all
accept meta modules), then each rank allocates only its shards and fills them with its slice of the weights one
process would build from the same seed (torchtitan's order: meta build -> plan -> to_empty -> init).

Equal to the one-device build, bit for bit. `giants.build(cfg, device, seed=s)` seeds the global RNG, constructs
the modules (nn.Linear / nn.Embedding draw their default init from that stream) and then runs
Transformer.init_weights, which draws every parameter again, in named_parameters order, from the same stream.
`materialize_sharded` replays exactly that sequence of random draws on `device`: the constructors' draws
(recorded once while a meta reference model is built, replayed into a scratch tensor of the same shape) and then
each parameter's FULL tensor through giants.model.transformer.init_parameter, including the parameters that
live on other pipeline stages, so every rank's stream advances as the one-device build's does and the global RNG
ends in the same state. Of each full tensor the rank keeps only its part: a DTensor parameter (TP, EP, FSDP and
their compositions) the local chunk of its placements, a plain parameter the whole tensor.

Peak memory on a rank: its shards plus one full parameter (and its scratch twin) at a time. The price is
compute: every rank draws every element of the model once for the constructors and once for init_weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from giants.config import ModelConfig
from giants.model.positions import Rotary
from giants.model.transformer import Transformer, build, init_parameter


@dataclass
class Materialized:
    """What one rank allocated: `local_numel` elements of parameters out of the model's `full_numel`; the largest
    scratch tensor held at any moment had `largest_scratch_numel` elements (one parameter); from a checkpoint,
    `read_numel` elements were read (a pipeline stage reads its own parameters only)."""

    local_numel: int
    full_numel: int
    largest_scratch_numel: int
    n_params: int
    read_numel: int | None = None


@dataclass(frozen=True)
class _Scratch:
    """A recorded tensor argument: replayed as an uninitialised tensor of this shape and dtype."""

    shape: torch.Size
    dtype: torch.dtype


class _RandomDraws(TorchDispatchMode):
    """Records every op that consumes a random generator (aten's nondeterministic_seeded tag), with its
    arguments, so the draws a constructor made on meta tensors can be replayed on a real device."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            rec = tree_map(lambda a: _Scratch(a.shape, a.dtype) if isinstance(a, torch.Tensor) else a, (args, kwargs))
            self.draws.append((func, *rec))
        return func(*args, **kwargs)


def meta_reference(config: ModelConfig) -> tuple[Transformer, list[tuple[Any, tuple, dict]]]:
    """A meta-device model of `config` (its named_parameters order is init_weights' order) and the random draws
    its constructors make (what `giants.build` draws before init_weights)."""
    rec = _RandomDraws()
    with rec:
        model = build(config, device="meta")
    return model, rec.draws


def _replay(draws: list[tuple[Any, tuple, dict]], device: torch.device) -> int:
    """Make the recorded draws on `device` into scratch tensors; returns the largest scratch numel."""
    largest = 0

    def real(a: Any) -> Any:
        nonlocal largest
        if isinstance(a, _Scratch):
            largest = max(largest, a.shape.numel())
            return torch.empty(a.shape, dtype=a.dtype, device=device)
        if isinstance(a, torch.device) and a.type == "meta":
            return device
        return a

    for func, args, kwargs in draws:
        args, kwargs = tree_map(real, args), tree_map(real, kwargs)
        if "device" in kwargs:
            kwargs["device"] = device
        func(*args, **kwargs)
    return largest


def _src_data_rank_supported() -> bool:
    try:
        return "src_data_rank" in inspect.signature(distribute_tensor).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C-level signature
        return False


_LOCAL_SPLIT = _src_data_rank_supported()


def local_chunk(full: torch.Tensor, p: DTensor, *, manual: bool | None = None) -> torch.Tensor:
    """This rank's part of `full` under `p`'s mesh and placements, without communication.

    torch >= 2.7: distribute_tensor(src_data_rank=None) splits locally. Older torch (or manual=True): Shard and
    Replicate placements are sliced here as DTensor does (torch.chunk along the dim, mesh dims left to right);
    anything else (FSDP's _StridedShard under TP + FSDP) goes through distribute_tensor's scatter from coordinate
    0, correct because every rank holds the same full tensor."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    if manual is None:
        manual = not _LOCAL_SPLIT
    if not manual:
        return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
    if not all(type(pl) in (Shard, Replicate) for pl in placements):
        return distribute_tensor(full, mesh, placements).to_local()
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not on the parameter's mesh
        return full.new_empty(0)
    local = full
    for i, pl in enumerate(placements):
        if isinstance(pl, Shard):
            chunks = torch.chunk(local, mesh.size(i), dim=pl.dim)
            if coord[i] < len(chunks):
                local = chunks[coord[i]]
            else:  # torch.chunk gives fewer chunks than ranks: this rank holds an empty slice, as DTensor's
                shape = list(local.shape)
                shape[pl.dim] = 0
                local = local.new_empty(shape)
    return local


def _copy_into(p: torch.Tensor, full: torch.Tensor, *, on_host: bool = False) -> None:
    """Copy `p`'s part of `full` into it. on_host: `full` lives on another device (a checkpoint's tensor in host
    memory) and Shard / Replicate placements are sliced there, so only the local part crosses to `p`'s device
    (distribute_tensor would move the whole tensor first)."""
    if isinstance(p, DTensor):
        dst = p.to_local()  # under no_grad: the local tensor itself (FSDP: a view of its sharded storage)
        simple = all(type(pl) in (Shard, Replicate) for pl in p.placements)
        src = local_chunk(full, p, manual=True if on_host and simple else None)
        if dst.shape != src.shape:
            raise RuntimeError(f"sharded init: local shard {tuple(dst.shape)} != the placements' chunk "
                               f"{tuple(src.shape)} ({p.placements} over {p.device_mesh})")
        dst.copy_(src)
    else:
        p.copy_(full)


def _numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def _unique_modules(parts: Iterable[nn.Module]) -> list[nn.Module]:
    seen: set[int] = set()
    out = []
    for part in parts:
        if id(part) not in seen:
            seen.add(id(part))
            out.append(part)
    return out


def allocate(parts: nn.Module | Iterable[nn.Module], device: torch.device) -> dict[str, torch.Tensor]:
    """Uninitialised storage for the meta-built, parallelized `parts` on `device` (each rank's shards only) and
    the rotary tables rebuilt; returns name -> parameter over every part (a tied embedding once)."""
    parts = _unique_modules([parts] if isinstance(parts, nn.Module) else parts)
    for part in parts:
        part.to_empty(device=device)
        for m in part.modules():
            if isinstance(m, Rotary):
                m.reset_buffers()
    local: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, p in part.named_parameters():
            local.setdefault(name, p)
    return local


@torch.no_grad()
def materialize_sharded(parts: nn.Module | Iterable[nn.Module], config: ModelConfig, seed: int,
                        device: torch.device | str) -> Materialized:
    """Allocate the meta-built, already parallelized `parts` (a Transformer, or this rank's pipeline stage parts
    under the whole model's parameter names) on `device` and give each parameter its slice of
    `giants.build(config, device, seed=seed)`'s weights; rebuilds the rotary tables. The global RNG ends in the
    state that build leaves. Every rank of the job must call it (the draws are local, but a torch older than 2.7
    may scatter _StridedShard placements)."""
    device = torch.device(device)
    ref, draws = meta_reference(config)
    local = allocate(parts, device)
    torch.manual_seed(seed)  # as giants.build: every device's default generator
    largest = _replay(draws, device)
    done: set[str] = set()
    full_numel = 0
    for name, r in ref.named_parameters():
        full = torch.empty(r.shape, dtype=r.dtype, device=device)
        largest = max(largest, full.numel())
        full_numel += full.numel()
        init_parameter(name, full, config)
        p = local.get(name)
        if p is not None:
            _copy_into(p, full)
            done.add(name)
        del full
    missing = sorted(set(local) - done)
    if missing:
        raise RuntimeError(f"sharded init: parameters {missing[:5]} are not the model's (a plan that renamed or "
                           "added parameters must initialise them itself)")
    return Materialized(sum(_numel(p) for p in local.values()), full_numel, largest, len(local))


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter of `model` is still on the meta device (built for sharded initialisation)."""
    return any(p.is_meta for p in model.parameters())
