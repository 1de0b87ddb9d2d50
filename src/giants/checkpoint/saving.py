"""giants.save: a Transformer -> an HF-format directory transformers loads, written atomically.

Files: config.json (cfg.to_hf()), model.safetensors or model-0000k-of-0000n.safetensors + index,
generation_config.json, giants_config.json (the full ModelConfig, so fields HF cannot express still
round-trip through giants.load), and tokenizer files when a tokenizer is given. A config no HF
family can express (e.g. T5 relative bias) is saved under our own tensor names with
giants_config.json only; asking for format="hf" then raises, naming the field HF lacks.
The directory is assembled under a temporary name beside the target and renamed into place.

Every directory written holds `.giants-checkpoint`, a JSON list of the files giants put there. An existing
directory is only ever replaced when that marker lists every entry in it (or it is empty): a folder of the
user's, or a checkpoint someone has since added files to, is refused by name and nothing in it is deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from giants.checkpoint import hf_map, mxfp4
from giants.checkpoint.loading import FORMAT_VERSION, GIANTS_CONFIG
from giants.checkpoint.safetensors_io import write_file
from giants.config import ModelConfig

MARKER = ".giants-checkpoint"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", size)
        unit = (m.group(2) or "B").upper() if m else ""
        if not m or unit not in _UNITS:
            raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '5GB', '500MB', '2GiB'")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_tensors(model, cfg: ModelConfig, dtype: torch.dtype | None = None,
               quantize: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for export; gpt-oss experts as MXFP4 blocks + scales when quantize='mxfp4'."""
    state = dict(model.state_dict())
    for name, t in hf_map.giants_to_hf(state, cfg):
        if quantize == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.quantize(t)
            yield name + "_blocks", blocks
            yield name + "_scales", scales
            continue
        yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)


def _shards(items: Iterator[tuple[str, torch.Tensor]], limit: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        if shard and size + n > limit:
            yield shard
            shard, size = {}, 0
        shard[name] = t
        size += n
    if shard:
        yield shard


def save(model, path: str | os.PathLike, tokenizer=None, max_shard_size: int | str = "5GB", *,
         dtype: torch.dtype | str | None = None, format: str = "auto", quantize: str | None = None) -> Path:
    """Write `model` to directory `path` (replacing a previous checkpoint there). Returns the path.

    format: "hf" (transformers-loadable, raises if the config has no HF family), "giants" (our tensor
    names + giants_config.json), or "auto" (hf when possible). quantize="mxfp4" stores gpt-oss experts
    the way openai/gpt-oss checkpoints do."""
    from giants.checkpoint.loading import _dtype

    cfg: ModelConfig = model.config
    path = Path(path).expanduser()
    limit = parse_size(max_shard_size)
    dtype = _dtype(dtype)
    if format not in ("auto", "hf", "giants"):
        raise ValueError(f"format must be 'auto', 'hf' or 'giants', got {format!r}")
    hf_cfg: dict[str, Any] | None = None
    if format in ("auto", "hf"):
        try:
            hf_cfg = cfg.to_hf()
        except ValueError as e:
            if format == "hf":
                raise ValueError(f"cannot save as an HF checkpoint: {e}") from None
    if quantize not in (None, "mxfp4"):
        raise ValueError(f"quantize must be None or 'mxfp4', got {quantize!r}")
    if quantize and (hf_cfg is None or hf_cfg["model_type"] != "gpt_oss"):
        raise ValueError("quantize='mxfp4' applies to gpt-oss experts saved in HF format only")
    from giants.inference.fp8 import is_quantized as has_fp8

    fp8_model = has_fp8(model)  # FP8 weights (giants.inference.fp8): written as transformers' FP8 formats
    if fp8_model and (hf_cfg is None or quantize):
        raise ValueError("save: a model with FP8 weights is written in HF format (quant_method fbgemm_fp8 or fp8), "
                         "without quantize=")
    check_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp_dir(path)
    try:
        param = next(model.parameters())
        out_dtype = dtype or param.dtype
        if hf_cfg is not None:
            if fp8_model:
                from giants.checkpoint import fp8 as ckfp8

                items, hf_cfg["quantization_config"] = ckfp8.hf_tensors(model, cfg, dtype)
            else:
                items = hf_tensors(model, cfg, dtype, quantize)
            hf_cfg["torch_dtype"] = hf_cfg["dtype"] = _dtype_name(out_dtype)
            if quantize == "mxfp4":
                hf_cfg["quantization_config"] = {
                    "quant_method": "mxfp4",
                    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                               "model.embed_tokens", "lm_head"]}
            _write_json(tmp / "config.json", hf_cfg)
        else:
            items = ((n, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
                     for n, t in model.state_dict().items())
        _write_json(tmp / GIANTS_CONFIG, {"format_version": FORMAT_VERSION,
                                          "tensor_names": "hf" if hf_cfg is not None else "giants",
                                          "dtype": _dtype_name(out_dtype), "config": cfg.to_dict()})
        _write_weights(items, tmp, limit)
        _write_json(tmp / "generation_config.json", _generation_config(cfg, tokenizer))
        if tokenizer is not None:
            tokenizer.save(tmp)
        _write_json(tmp / MARKER, {"written_by": "giants", "format_version": FORMAT_VERSION,
                                   "files": sorted(f.name for f in tmp.iterdir())})
        _set_modes(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _owned(path: Path) -> set[str] | None:
    """The file names `path`'s marker says giants wrote; None without a readable marker."""
    from giants.checkpoint.files import read_text

    marker = path / MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        files = json.loads(read_text(marker)).get("files")
    except (ValueError, AttributeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {f for f in files if f and f == Path(f).name and f not in (".", "..")}


def check_destination(path: str | os.PathLike) -> Path:
    """Where `save` (and `giants convert`) may write: a new path, an empty directory, or a directory giants
    wrote whose marker lists every entry in it. Anything else raises FileExistsError naming the directory,
    before any work is done (convert calls this before loading its source)."""
    path = Path(path).expanduser()
    if not os.path.lexists(path):
        return path
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link; refusing to replace it: give the directory itself")
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return path
    owned = _owned(path)
    if owned is None:
        raise FileExistsError(f"{path} is a non-empty directory not written by giants (it does not hold a checkpoint "
                              f"with a valid {MARKER}); refusing to replace it: choose a new or empty directory")
    foreign = [n for n in entries if n != MARKER and (n not in owned or not _plain_file(path / n))]
    if foreign:
        more = f" (+{len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise FileExistsError(f"{path} holds {foreign[0]!r}{more}, which giants did not write; refusing to replace "
                              "the directory: move it out or choose another directory")
    return path


def _plain_file(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _generation_config(cfg: ModelConfig, tokenizer) -> dict[str, Any]:
    eos: Any = cfg.eos_token_id
    if tokenizer is not None and tokenizer.eos_token_ids:
        ids = list(tokenizer.eos_token_ids)
        eos = ids[0] if len(ids) == 1 else ids
    out = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}
    return {k: v for k, v in out.items() if v is not None}


def _write_weights(items: Iterator[tuple[str, torch.Tensor]], tmp: Path, limit: int) -> None:
    names: list[list[str]] = []  # tensor names per shard (the tensors themselves are dropped once written)
    weight_map: dict[str, str] = {}
    total = 0
    parts: list[Path] = []
    for i, shard in enumerate(_shards(items, limit)):
        name = f"part-{i:05d}.safetensors"
        write_file(shard, tmp / name)
        parts.append(tmp / name)
        names.append(list(shard))
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
    if len(parts) <= 1:
        if parts:
            os.replace(parts[0], tmp / "model.safetensors")
        else:
            write_file({}, tmp / "model.safetensors")
        return
    n = len(parts)
    for i, (part, shard_names) in enumerate(zip(parts, names)):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(part, tmp / final)
        weight_map.update(dict.fromkeys(shard_names, final))
    _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _make_tmp_dir(path: Path) -> Path:
    """An empty sibling of `path` with the permissions the user's umask gives a new directory (mkdtemp's
    0700 would travel with the rename and lock everyone else out of the checkpoint)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            tmp.mkdir(mode=0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary directory beside {path}")


def _set_modes(tmp: Path) -> None:
    """Files as the umask gives new files (safetensors writes its files 0600 through a temporary)."""
    file_mode = tmp.stat().st_mode & 0o666  # the directory was created 0777 & ~umask
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, file_mode)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing checkpoint there (checked by `check_destination`) is moved aside
    first, and after the rename only the files its marker lists are deleted: anything that appeared in it
    since the check is left where it is, named in a warning."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    check_destination(path)  # again, just before: the directory may have changed while the weights were written
    owned = _owned(path) or set()
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / "ckpt")
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old / "ckpt", path)
        os.rmdir(old)
        raise
    for name in (*owned, MARKER):
        with contextlib.suppress(OSError):
            (old / "ckpt" / name).unlink()
    try:
        os.rmdir(old / "ckpt")
        os.rmdir(old)
    except OSError:
        warnings.warn(f"{path}: files that appeared in the replaced checkpoint while it was written were kept in "
                      f"{old / 'ckpt'}", stacklevel=3)
