"""Sharded training checkpoints through torch.distributed.checkpoint (DCP), written under scale-out.

RUN_DIR/checkpoints/step_00000100/
    dcp/                   .metadata and every rank's shards (__<rank>_<i>.distcp) of {"model": ..., "optim": ...},
                           the state dicts of torch.distributed.checkpoint.state_dict.get_state_dict (parameter names
                           are the whole model's, whatever the layout)
    rng.safetensors        rank 0's generator states
    state.json             step, data position, configs (as giants.train.checkpoint), "sharded": the layout
    manifest.json          size and sha256 of every file (each rank hashes the shards it wrote); written last

Atomic as the one-device format: every rank writes into checkpoints/.tmp-step_*-dcp/, and only after a barrier
(every shard on disk) does rank 0 write the manifest and rename the directory into place; a job killed mid-save
leaves the previous checkpoint as the latest. The run directory must be on a filesystem every rank sees (one
host, or a shared filesystem across nodes).

DCP stores each tensor's global shape and each shard's offsets, so a checkpoint loads on any layout: another
mix of --tp / --dp-shard / --pp, another world size, or one process without a process group (`load` below reads
whole tensors and hands them to the one-device model and optimizer, MasterAdamW included). A one-device
checkpoint also resumes under scale-out (`load_single_device_checkpoint`: full tensors distributed to the shards).

`export_final` writes the trained model as ONE HF-format directory: the full state dict gathered to rank 0
(get_model_state_dict(full_state_dict=True, cpu_offload=True); across pipeline stages, each stage's gathered to
rank 0) and written by giants.save, which giants.load and transformers read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from giants.train import checkpoint as ckpt

SHARDS = "dcp"  # the DCP directory inside checkpoints/step_*/


def is_sharded(path: Path) -> bool:
    """Whether checkpoint `path` holds DCP shards (written under scale-out) rather than one device's files."""
    return (Path(path) / SHARDS / ".metadata").is_file()


def _state_dicts(tr: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(tr.model, tr.optimizer)
    return {"model": msd, "optim": osd}


def _hash_files(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (root / n).stat().st_size, "sha256": ckpt._sha256(root / n)} for n in names}


def save(tr: Any) -> Path:
    """Write checkpoint tr.step from every rank (a collective); returns the final directory."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    d = tr.dist
    root = ckpt.checkpoints_dir(tr.out)
    final = root / f"step_{tr.step:08d}"
    tmp = root / f".tmp-{final.name}-dcp"
    if d.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a job killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    d.barrier()
    try:
        dcp.save(_state_dicts(tr), checkpoint_id=str(tmp / SHARDS))
        mine = sorted(p.name for p in (tmp / SHARDS).iterdir() if p.name.startswith(f"__{d.rank}_"))
        for n in mine:
            with open(tmp / SHARDS / n, "rb") as f:
                os.fsync(f.fileno())
        hashes = _hash_files(tmp, [f"{SHARDS}/{n}" for n in mine])
        every: list[Any] = [None] * d.world
        dist.all_gather_object(every, hashes)
        if d.rank == 0:
            files: dict[str, Any] = {}
            for h in every:
                files.update(h)
            rng_tensors, rng_meta = ckpt.rng_state()
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            state = {"format": ckpt.FORMAT, "step": tr.step, "saved_at": time.time(), **tr.checkpoint_state(),
                     "sharded": d.to_dict(), "optimizer": {"format": "dcp"}, "rng": rng_meta}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            pause = ckpt._pause_marker(tr.step)
            if pause is not None:
                pause.write_text(str(tmp))
                time.sleep(3600)
            for n in (f"{SHARDS}/.metadata", "rng.safetensors", "state.json"):
                with open(tmp / n, "rb") as f:
                    os.fsync(f.fileno())
            files.update(_hash_files(tmp, [f"{SHARDS}/.metadata", "rng.safetensors", "state.json"]))
            present = {str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()}
            if present != set(files):
                raise ckpt.TrainCheckpointError(f"{tmp}: files {sorted(present ^ set(files))} were not accounted "
                                                "for by the ranks that wrote them")
            (tmp / ckpt.MANIFEST).write_text(json.dumps({"format": ckpt.FORMAT, "step": tr.step, "files": files},
                                                        indent=1))
            with open(tmp / ckpt.MANIFEST, "rb") as f:
                os.fsync(f.fileno())
            if final.exists():  # re-saving a step (after a resume): swap the old one out first
                old = root / f".tmp-old-{final.name}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            ckpt._fsync_dir(root)
            if tr.cfg.keep_last > 0:
                for old in ckpt.list_checkpoints(tr.out)[:-tr.cfg.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if d.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    d.barrier()
    return final


def load(tr: Any, path: Path) -> None:
    """Load a sharded checkpoint into the live model and optimizer, under any layout or in one process."""
    import torch.distributed.checkpoint as dcp

    if tr.dist is None:
        _load_whole(tr, path)
        return
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = _state_dicts(tr)  # (this also creates the optimizer's state, which the load then fills)
    try:
        dcp.load(sd, checkpoint_id=str(path / SHARDS))
    except Exception as e:  # noqa: BLE001 - any reader failure means an unusable checkpoint
        raise ckpt.TrainCheckpointError(f"{path / SHARDS}: cannot load the sharded checkpoint: {e}") from e
    set_state_dict(tr.model, tr.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _load_whole(tr: Any, path: Path) -> None:
    """One process, no process group: read every tensor whole from the shards, then hand them to the one-device
    model (the fp32 masters) and optimizer through the one-device loaders."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path / SHARDS)).read_metadata().state_dict_metadata

    def empty(key: str) -> torch.Tensor:
        if key not in meta:
            raise ckpt.TrainCheckpointError(f"{path / SHARDS}: no tensor {key!r} (a checkpoint of another model)")
        m = meta[key]
        return torch.empty(tuple(m.size), dtype=m.properties.dtype)

    names = list(tr.model.state_dict())
    opt_keys = ("exp_avg", "exp_avg_sq", "step")
    want = {"model": {n: empty(f"model.{n}") for n in names},
            "optim": {"state": {n: {k: empty(f"optim.state.{n}.{k}") for k in opt_keys
                                    if f"optim.state.{n}.{k}" in meta} for n in tr.param_names}}}
    try:
        dcp.load(want, checkpoint_id=str(path / SHARDS), no_dist=True)
    except Exception as e:  # noqa: BLE001
        raise ckpt.TrainCheckpointError(f"{path / SHARDS}: cannot load the sharded checkpoint: {e}") from e
    with torch.no_grad(), tr._masters_in_model():
        live = tr.model.state_dict()
        for n, v in live.items():
            v.copy_(want["model"][n])
    tensors = {f"{n}::{k}": t for n, st in want["optim"]["state"].items() for k, t in st.items()}
    _, opt_meta = ckpt.optimizer_state(tr.optimizer, tr.param_names)  # this run's groups, by parameter name
    ckpt.load_optimizer_state(tr.optimizer, tr.param_names, tensors, {"param_groups": opt_meta["param_groups"]},
                              path)


def load_single_device_checkpoint(tr: Any, path: Path, state: dict[str, Any]) -> None:
    """Under scale-out, resume from a one-device checkpoint: every rank reads the whole tensors and
    set_state_dict(full_state_dict=True) keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    import giants

    try:
        full = giants.load(path / "model").state_dict()
    except Exception as e:  # noqa: BLE001
        raise ckpt.TrainCheckpointError(f"{path / 'model'}: cannot load the model: {e}") from e
    mine = set(tr.model.state_dict())
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(tr.model, {k: v for k, v in full.items() if k in mine}, options=opts)
    tensors = ckpt.read_tensors(path / "optimizer.safetensors")
    groups = get_optimizer_state_dict(tr.model, tr.optimizer, options=opts)["param_groups"]
    osd: dict[str, Any] = {"state": {}, "param_groups": groups}
    for key, t in tensors.items():
        name, _, fld = key.rpartition("::")
        if name in mine:
            osd["state"].setdefault(name, {})[fld] = t.float() if fld == "step" else t
    set_optimizer_state_dict(tr.model, tr.optimizer, osd, options=opts)


def export_final(tr: Any) -> Path:
    """The trained model as one HF-format directory written by rank 0 (a collective: every rank calls it)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import giants

    d = tr.dist
    dest = tr.out / "final"
    if d.pp_group is None:
        full = get_model_state_dict(tr.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        # cpu_offload keeps the gathered tensors on global rank 0 only; each stage's are gathered on every rank of
        # it, then rank 0's pipeline group brings them to rank 0
        sd = get_model_state_dict(tr.model, options=StateDictOptions(full_state_dict=True))
        full = {}
        group_ranks = dist.get_process_group_ranks(d.pp_group)
        if 0 in group_ranks:
            parts: list[Any] = [None] * len(group_ranks) if d.rank == 0 else None  # type: ignore[assignment]
            dist.gather_object({k: v.detach().cpu() for k, v in sd.items()}, parts, dst=0, group=d.pp_group)
            if d.rank == 0:
                for p in parts:
                    full.update(p)
        del sd
    if d.rank == 0:
        model = giants.build(tr.model_config, device="meta").materialize("cpu")  # (no initialisation to pay for)
        missing, unexpected = model.load_state_dict(full, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"export: gathered state dict does not match the model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        giants.save(model, dest, tokenizer=tr._checkpoint_tokenizer())
    d.barrier()
    return dest
