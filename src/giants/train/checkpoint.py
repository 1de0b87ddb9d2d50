"""Training checkpoints that survive a kill.

RUN_DIR/checkpoints/step_00000100/
    model/                 the weights as an HF-format directory (giants.save), or
    adapter.safetensors    only the LoRA tensors when the base model is frozen
    optimizer.safetensors  AdamW moments and step counts, keyed by parameter name
    rng.safetensors        torch CPU/CUDA generator states, numpy's MT19937 key, python's state
    state.json             step, data position, schedule, configs, RNG scalars
    manifest.json          size and sha256 of every file above; written last

Everything is written into `checkpoints/.tmp-...` and renamed into place, so a reader sees either a
complete checkpoint or none; a directory without a valid manifest is refused, never half-loaded.
Nothing is unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FORMAT = "giants-train-checkpoint-v1"
STEP_DIR = re.compile(r"^step_(\d{8})$")
# Test hook: "STEP:PATH" (or just "PATH" for every step). The checkpoint write of that step stops after its
# big files are written (before the manifest and the rename), writes PATH and sleeps, so a test can
# SIGKILL the process in the middle of writing a checkpoint.
PAUSE_ENV = "GIANTS_TRAIN_PAUSE_IN_CHECKPOINT"


def _pause_marker(step: int) -> Path | None:
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return None
    at, sep, path = value.partition(":")
    if sep and at.isdigit():
        return Path(path) if int(at) == step else None
    return Path(value)


class TrainCheckpointError(ValueError):
    """A training checkpoint that is missing, incomplete, corrupt or does not match the run."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Completed checkpoint directories (renamed into place), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---- RNG ---------------------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    tensors["numpy_key"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python_state"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "gauss_next": gauss_next}}
    return tensors, meta


_RNG_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError)


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: Path | None = None) -> None:
    """Restore the generators saved by rng_state. Everything is checked before any generator changes: a wrong-size
    tensor (rng.safetensors) or garbage metadata (state.json's "rng") raises TrainCheckpointError naming the file of
    checkpoint directory `where`."""
    where = Path(where) if where is not None else Path("<checkpoint>")
    live_cuda = (torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
                 else [])
    try:
        expected = {"torch_cpu": torch.get_rng_state(), "numpy_key": torch.zeros(624, dtype=torch.int64),
                    "python_state": torch.zeros(625, dtype=torch.int64)}
        cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
        cuda_states = [tensors[k] for k in cuda] if cuda and len(cuda) == len(live_cuda) else []
        if cuda_states:
            expected.update({f"torch_cuda_{i}": t for i, t in enumerate(live_cuda)})
        for k, want in expected.items():
            t = tensors[k]
            if not isinstance(t, torch.Tensor) or t.dtype != want.dtype or t.shape != want.shape:
                raise ValueError(f"{k} is {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}, "
                                 f"expected {want.dtype} {tuple(want.shape)}")
    except _RNG_ERRORS as e:
        raise TrainCheckpointError(f"{where / 'rng.safetensors'}: unusable generator state ({type(e).__name__}: "
                                   f"{e})") from None
    try:
        n = meta["numpy"]
        np_state = (n["kind"], tensors["numpy_key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        np.random.RandomState().set_state(np_state)  # (a throw-away generator: a bad state fails here)
        p = meta["python"]
        py_state = (p["version"], tuple(int(x) for x in tensors["python_state"].tolist()), p["gauss_next"])
        random.Random().setstate(py_state)
    except _RNG_ERRORS as e:
        raise TrainCheckpointError(f"{where / 'state.json'}: unusable generator state under 'rng' "
                                   f"({type(e).__name__}: {e})") from None
    torch.set_rng_state(tensors["torch_cpu"])
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    np.random.set_state(np_state)
    random.setstate(py_state)


# ---- optimizer ---------------------------------------------------------------------------------------

def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state keyed `name::key` (names in the order the optimizer holds the parameters)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        name = names[idx]
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}::{key}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = v
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        g["params"] = [names[i] for i in g["params"]]
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any], where: Path) -> None:
    index = {n: i for i, n in enumerate(names)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise TrainCheckpointError(f"{where}: optimizer has {len(saved_groups)} parameter groups, this run "
                                   f"{len(optimizer.param_groups)}")
    groups = []
    for saved, live in zip(saved_groups, optimizer.param_groups):
        missing = sorted(set(saved["params"]) ^ {names[index_of(params, p)] for p in live["params"]})
        if missing:
            raise TrainCheckpointError(f"{where}: optimizer parameters differ from this model's: {missing[:5]}")
        g = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items()}
        # how this run's optimizer computes (fused kernel or not) is its own, not the checkpoint's: a run saved by
        # MasterAdamW (no such keys) resumes into a fused AdamW that stays fused
        g.update({k: live[k] for k in IMPLEMENTATION_KEYS if k in live})
        g["params"] = [index[n] for n in saved["params"]]
        groups.append(g)
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition("::")
        if name not in index:
            raise TrainCheckpointError(f"{where}: optimizer state for unknown parameter {name!r}")
        p = params[index[name]]
        if field in ("exp_avg", "exp_avg_sq") and tuple(t.shape) != tuple(p.shape):
            raise TrainCheckpointError(f"{where}: optimizer state {key} has shape {tuple(t.shape)}, parameter has "
                                       f"{tuple(p.shape)}")
        state.setdefault(index[name], {})[field] = t
    for name, sc in meta.get("scalars", {}).items():
        state.setdefault(index[name], {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def index_of(params: list[torch.Tensor], p: torch.Tensor) -> int:
    for i, q in enumerate(params):
        if q is p:
            return i
    raise KeyError("parameter not in optimizer")


# ---- files -------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def save(run_dir: str | os.PathLike, step: int, *, optimizer: torch.optim.Optimizer, param_names: list[str],
         state: dict[str, Any], write_model, adapter: dict[str, torch.Tensor] | None = None,
         keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically. `write_model(dir)` writes the model directory (giants.save);
    with `adapter` only those tensors are stored instead. Returns the final directory."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        if adapter is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        else:
            write_model(tmp / "model")
        opt_tensors, opt_meta = optimizer_state(optimizer, param_names)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        full_state = {"format": FORMAT, "step": step, "saved_at": time.time(), **state, "optimizer": opt_meta,
                      "rng": rng_meta}
        (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
        pause = _pause_marker(step)
        if pause is not None:
            pause.write_text(str(tmp))
            time.sleep(3600)
        _fsync_tree(tmp)
        manifest = {"format": FORMAT, "step": step,
                    "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in _files(tmp)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        with open(tmp / MANIFEST, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (after a resume): swap the old one out first
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify(ckpt: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest; return state.json. Raises TrainCheckpointError naming the
    file when anything is missing, truncated, altered or unreadable."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise TrainCheckpointError(f"{ckpt}: no such checkpoint directory")
    mf = ckpt / MANIFEST
    if not mf.is_file():
        raise TrainCheckpointError(f"{ckpt}: incomplete checkpoint (no {MANIFEST}); refusing to load it")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainCheckpointError(f"{mf}: corrupt manifest ({e})") from None
    files = _check_manifest(manifest, mf)
    present = {str(p.relative_to(ckpt)) for p in _files(ckpt)}
    for name in sorted(set(files) - present):
        raise TrainCheckpointError(f"{ckpt / name}: file listed in the manifest is missing")
    for name in sorted(present - set(files)):
        raise TrainCheckpointError(f"{ckpt / name}: file is not in the manifest (checkpoint was modified)")
    for name, info in files.items():
        p = ckpt / name
        size = p.stat().st_size
        if size != info["bytes"]:
            raise TrainCheckpointError(f"{p}: {size} bytes, manifest says {info['bytes']} (truncated or altered)")
        if _sha256(p) != info["sha256"]:
            raise TrainCheckpointError(f"{p}: sha256 does not match the manifest (corrupt)")
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainCheckpointError(f"{ckpt / 'state.json'}: unreadable ({e})") from None
    if not isinstance(state, dict):
        raise TrainCheckpointError(f"{ckpt / 'state.json'}: not a JSON object (got {type(state).__name__})")
    if state.get("step") != manifest.get("step"):
        raise TrainCheckpointError(f"{ckpt}: state.json step {state.get('step')} != manifest step")
    return state


def _check_manifest(manifest: Any, mf: Path) -> dict[str, dict[str, Any]]:
    """The manifest's files ({relative path: {"bytes": int, "sha256": str}}), its structure checked."""
    def bad(why: str) -> TrainCheckpointError:
        return TrainCheckpointError(f"{mf}: corrupt manifest ({why})")

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise TrainCheckpointError(f"{mf}: unknown checkpoint format {manifest.get('format')!r}")
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"step {step!r} is not a non-negative integer")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad(f"'files' is {type(files).__name__}, not an object of file entries")
    for name, info in files.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise bad(f"file name {name!r} is not a path inside the checkpoint")
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is {type(info).__name__}, not {{'bytes': ..., 'sha256': ...}}")
        size, digest = info.get("bytes"), info.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"entry {name!r}: bytes {size!r} is not a non-negative integer")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise bad(f"entry {name!r}: sha256 {digest!r} is not 64 hex digits")
    return files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainCheckpointError(f"{path}: cannot read tensors ({e})") from None


def check_compatible(state: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint whose model or run settings differ from this run's (naming the fields)."""
    for section in ("model_config", "run"):
        saved, live = state.get(section, {}), expected.get(section, {})
        if not isinstance(saved, dict):
            raise TrainCheckpointError(f"{where / 'state.json'}: {section!r} is {type(saved).__name__}, not an object")
        diffs = [f"{k}: checkpoint {saved.get(k)!r} != this run {live.get(k)!r}"
                 for k in sorted(set(saved) | set(live)) if saved.get(k) != live.get(k)]
        if diffs:
            what = "model config" if section == "model_config" else "run settings"
            raise TrainCheckpointError(f"{where}: checkpoint does not match this run's {what}: " + "; ".join(diffs[:6]))
