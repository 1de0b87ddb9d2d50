"""Process group and device mesh for a scale-out job.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK; a lone process without them
is a world of one) and starts the default process group: NCCL for CUDA tensors plus gloo for CPU tensors on a
GPU host, gloo alone on a CPU host. The group's timeout bounds every collective, so a rank that died makes the
others raise instead of waiting forever.

`build_mesh(dims, device_type)` lays the world out as one `DeviceMesh` with EVERY dim present, size 1 or not, in
this order (the slowest-varying first, as torchtitan does: pipeline stages talk least, tensor parallel most):

    ("pp", "dp_replicate", "dp_shard", "tp")                    when ep == 1
    ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")       when ep > 1 (ep borrows dp_shard's ranks)

and these flattened views on top (also always present):

    "dp_shard"  = dp_shard_mod_ep x ep   (only when ep > 1; otherwise it is a real dim)
    "dp"        = dp_replicate x dp_shard: the data-parallel ranks (which slice of the global batch a rank
                  reads; the group the loss's token count is summed over)

Names, their meaning, and who reads them:
    pp               pipeline stages (giants.parallel.pipeline)
    dp_replicate     HSDP replicas: parameters replicated, gradients all-reduced
    dp_shard         FSDP shards: parameters/gradients/optimizer state sharded (the dense parameters' FSDP mesh)
    dp_shard_mod_ep  with ep > 1: the part of dp_shard that is not ep; FSDP mesh of the expert parameters
    ep               expert parallel: experts split over these ranks, tokens exchanged all-to-all
    tp               tensor parallel (giants.parallel.tensor); also sequence parallel (same ranks)
    dp               flattened dp_replicate x dp_shard

Keeping the size-1 dims means a name always resolves; `mesh_dim(mesh, name)` returns None for a dim of size 1
(nothing to parallelize over), so plans test `mesh_dim(...) is not None` instead of reading sizes.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from giants.parallel.layout import LayoutError, ParallelDims

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, *, device_type: str | None = None) -> DistInfo:
    """Start (or join) the default process group from torchrun's environment and return where this rank is.

    device_type: "cuda" or "cpu"; None picks CUDA when available. On CUDA the rank's device is cuda:LOCAL_RANK
    (set as the current device) and the backend "cuda:nccl,cpu:gloo"; on the CPU, gloo. Without RANK/WORLD_SIZE
    (a plain `python` run) this is a world of one on a free local port. Called twice, it returns the same info
    without starting a second group."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("init_distributed: device_type='cuda' but no CUDA device is visible")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                               f"visible on this host")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    kwargs: dict = dict(backend=backend, timeout=timedelta(seconds=timeout_s), rank=rank, world_size=world)
    if "MASTER_ADDR" not in os.environ and world == 1:
        kwargs["init_method"] = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group(**kwargs)
    return DistInfo(rank, world, local_rank, device, backend)


def shutdown_distributed(orderly: bool, timeout_s: float = 60.0) -> None:
    """Tear the process groups down. orderly (the run ended normally on every rank): meet first, so no rank destroys
    its groups while another still talks to them; after a failure, no meeting (a dead peer would hold it until the
    timeout).

    The meeting goes through the rendezvous store, not a collective: a gloo barrier holds the rank's previous
    collectives (tensors Python made) until its worker thread drops the barrier, just after waking the caller,
    which widens a race at exit (core dump: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllreduceWork
    -> decref_pyobject, the GIL wanted after the interpreter began to exit: "terminate called without an active
    exception"). The last collective's work can still be dropped that late, so a process that ends after this
    should leave without the interpreter's teardown (giants.train.cli._leave)."""
    if not dist.is_initialized():
        return
    if orderly and dist.get_world_size() > 1:
        try:
            _store_barrier("giants/shutdown", dist.get_world_size(), timeout_s)
        except Exception:  # noqa: BLE001 - a peer gone at the very end: tear down all the same
            pass
    dist.destroy_process_group()


def _store_barrier(key: str, world: int, timeout_s: float) -> None:
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)  # private: may go in a later torch
    if get_store is None:
        dist.barrier()  # the collective meeting, exit race and all, rather than none
        return
    store = get_store()
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: not every rank arrived within {timeout_s:.0f} s")
        time.sleep(0.005)


def mesh_names(dims: ParallelDims) -> tuple[str, ...]:
    """The mesh's real dims, slowest-varying first (see the module docstring)."""
    if dims.ep > 1:
        return ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")
    return ("pp", "dp_replicate", "dp_shard", "tp")


def mesh_shape(dims: ParallelDims) -> tuple[int, ...]:
    if dims.ep > 1:
        if dims.dp_shard % dims.ep:
            raise LayoutError(f"--ep {dims.ep} must divide --dp-shard {dims.dp_shard}")
        return (dims.pp, dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep, dims.tp)
    return (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp)


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The job's DeviceMesh: every dim of `mesh_names(dims)` (size-1 ones too) plus the flattened "dp" view (and
    "dp_shard" when ep > 1). Needs the default process group (init_distributed) with world == dims.world_size."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims.check_world(world)
    names = mesh_names(dims)
    mesh = init_device_mesh(device_type, mesh_shape(dims), mesh_dim_names=names)
    # torch >= 2.11 wants flattened meshes kept by the caller rather than sliced from the root again: keep them
    # on the root (mesh_dim reads them from there).
    flat: dict[str, DeviceMesh] = {}
    if dims.ep > 1:
        flat["dp_shard"] = mesh[("dp_shard_mod_ep", "ep")]._flatten("dp_shard")
        flat["dp"] = mesh[("dp_replicate", "dp_shard_mod_ep", "ep")]._flatten("dp")
    else:
        flat["dp"] = mesh[("dp_replicate", "dp_shard")]._flatten("dp")
    mesh._giants_flat = flat  # type: ignore[attr-defined]
    return mesh


def _flat(mesh: DeviceMesh) -> dict[str, DeviceMesh]:
    return getattr(mesh, "_giants_flat", {})


def _has_dim(mesh: DeviceMesh, name: str) -> bool:
    if name in (mesh.mesh_dim_names or ()) or name in _flat(mesh):
        return True
    try:
        mesh[name]
    except (KeyError, RuntimeError, ValueError):
        return False
    return True


def _get(mesh: DeviceMesh, names: tuple[str, ...]) -> DeviceMesh:
    if len(names) == 1 and names[0] in _flat(mesh):
        return _flat(mesh)[names[0]]
    with warnings.catch_warnings():
        # a 2-D slice holding a flattened dim (HSDP's ("dp_replicate", "dp_shard") when ep > 1): torch 2.11+ warns
        # that slicing flattened dims from the root will be deprecated; there is no other way to form it on 2.6.
        warnings.filterwarnings("ignore", message=".*flattened dim.*")
        return mesh[names[0]] if len(names) == 1 else mesh[names]


def mesh_dim(mesh: DeviceMesh | None, name: str | tuple[str, ...]) -> DeviceMesh | None:
    """The sub-mesh named `name` (one name or a tuple of names, e.g. ("dp_replicate", "dp_shard") for HSDP), with
    size-1 dims dropped from a tuple; None when the mesh is None, lacks the name(s), or everything left has size 1
    (nothing to parallelize over)."""
    if mesh is None:
        return None
    names = (name,) if isinstance(name, str) else tuple(name)
    present = [n for n in names if _has_dim(mesh, n)]
    if len(present) != len(names):
        return None
    kept = tuple(n for n in names if _get(mesh, (n,)).size() > 1)
    if not kept:
        return None
    return _get(mesh, kept)


def dp_coords(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(this rank's data-parallel index, the number of data-parallel ranks): which slice of the global batch
    to read. (0, 1) without data parallelism."""
    dp = mesh_dim(mesh, "dp")
    if dp is None:
        return 0, 1
    return dp.get_local_rank(), dp.size()


def fsdp_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The mesh FSDP shards dense parameters over: ("dp_replicate", "dp_shard") for HSDP, either alone when the
    other has size 1 (with dp_replicate > 1 always the 2-D mesh, so dp_shard = 1 replicates, DDP-like), None when
    there is no data parallelism."""
    if mesh_dim(mesh, "dp_replicate") is None:
        return mesh_dim(mesh, "dp_shard")
    assert mesh is not None
    return _get(mesh, ("dp_replicate", "dp_shard"))
