"""giants.load: HF directories, giants directories, GGUF files and known model names -> Transformer.

Every check that can fail (config, tensor names, shapes, dtypes, file integrity) runs on headers
before the model is allocated; the model is built on the meta device, materialised once at the
target device/dtype, and filled tensor by tensor. Any error raises CheckpointError and the partly
filled model is dropped, never returned.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from giants.checkpoint import hf_map, hub, mxfp4
from giants.checkpoint.errors import CheckpointError
from giants.checkpoint.safetensors_io import FLOATING, SafetensorsSet
from giants.config import ModelConfig
from giants.model import Transformer, build

GIANTS_CONFIG = "giants_config.json"
FORMAT_VERSION = 1


def resolve(source: str | os.PathLike) -> Path:
    """A known model name (downloaded when missing), a directory or a .gguf file."""
    if hub.is_known(source):
        return hub.download(str(source))
    path = Path(source).expanduser()
    if not path.exists():
        known = ", ".join(hub.KNOWN_MODELS)
        raise FileNotFoundError(f"{source}: no such checkpoint (an HF directory, a .gguf file or one of: {known})")
    return path


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(names)}")
    return names[dtype]


def load(source: str | os.PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
         ) -> Transformer:
    """Load a checkpoint as a giants Transformer (eval mode).

    dtype None keeps the checkpoint's floating dtype (float32 for GGUF, whose weights are dequantized)."""
    path = resolve(source)
    dtype = _dtype(dtype)
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, dtype, device)
        if path.suffix == ".safetensors" or path.name.endswith(".json"):
            path = path.parent
        else:
            raise CheckpointError("not a checkpoint: expected a directory or a .gguf file", file=path)
    return _load_dir(path, dtype, device)


# ---- directories -----------------------------------------------------------------------------------
def read_dir_config(path: Path) -> tuple[ModelConfig, str]:
    """(config, tensor naming 'hf' | 'giants') of a checkpoint directory."""
    gpath, hpath = path / GIANTS_CONFIG, path / "config.json"
    hf_cfg = None
    if hpath.is_file():
        try:
            hf = json.loads(hpath.read_text(encoding="utf-8"))
            if not isinstance(hf, dict):
                raise ValueError("config.json must hold a JSON object")
            hf_cfg = ModelConfig.from_hf(hf)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"bad config: {e}", file=hpath) from None
    if gpath.is_file():
        try:
            g = json.loads(gpath.read_text(encoding="utf-8"))
            naming = g["tensor_names"]
            if naming not in ("hf", "giants"):
                raise ValueError(f"tensor_names must be 'hf' or 'giants', got {naming!r}")
            cfg = ModelConfig.from_dict(g["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"bad giants config: {e}", file=gpath) from None
        if hf_cfg is not None:
            # Both present: they must describe the same model (someone may have edited one).
            theirs = hf_cfg.to_dict()
            ours = ModelConfig.from_hf(cfg.to_hf()).to_dict()
            diff = [k for k in ours if ours[k] != theirs[k]]
            if diff:
                raise CheckpointError(f"config.json and {GIANTS_CONFIG} disagree on {', '.join(diff)}",
                                      file=hpath)
        return cfg, naming
    if hf_cfg is None:
        raise CheckpointError(f"no config.json or {GIANTS_CONFIG}", file=path)
    return hf_cfg, "hf"


def _expected_hf(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for `cfg`, computed by exporting a meta-device model."""
    meta = meta_model(cfg)
    return {n: tuple(t.shape) for n, t in hf_map.giants_to_hf(dict(meta.state_dict()), cfg)}


def _mxfp4_parts(name: str) -> tuple[str, str] | None:
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return name + "_blocks", name + "_scales"
    return None


class _MXFP4View:
    """HF names over a SafetensorsSet, serving `*_proj` from `*_proj_blocks` + `*_proj_scales` when the
    checkpoint stores gpt-oss experts as MXFP4."""

    def __init__(self, st: SafetensorsSet) -> None:
        self.st = st

    def _packed(self, name: str) -> tuple[str, str] | None:
        parts = _mxfp4_parts(name)
        return parts if parts and name not in self.st and parts[0] in self.st else None

    def keys(self):
        out = []
        for k in self.st.keys():
            if k.endswith("_blocks") and _mxfp4_parts(k[:-7]):
                out.append(k[:-7])
            elif not (k.endswith("_scales") and _mxfp4_parts(k[:-7])):
                out.append(k)
        return out

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.st or self._packed(name) is not None)

    def __getitem__(self, name: str) -> torch.Tensor:
        packed = self._packed(name)
        if packed is None:
            return self.st[name]
        blocks, scales = self.st[packed[0]], self.st[packed[1]]
        try:
            return mxfp4.dequantize(blocks, scales, torch.float32)
        except ValueError as e:
            raise CheckpointError(str(e), file=self.st.file_of(packed[0]), tensor=packed[0]) from None


def check_plausible(cfg: ModelConfig, n_tensors: int, where: Path) -> None:
    """Counts that size Python-side work (layers, per-expert names) must be backed by tensors in the file,
    so a corrupt config cannot make us build a billion-layer model before the shape checks run."""
    if cfg.n_layers > n_tensors:
        raise CheckpointError(f"config says {cfg.n_layers} layers but the checkpoint holds only {n_tensors} tensors",
                              file=where)
    if cfg.n_experts > max(n_tensors, 256):
        raise CheckpointError(f"config says {cfg.n_experts} experts; the checkpoint holds {n_tensors} tensors",
                              file=where)


def _check_dir(st: SafetensorsSet, cfg: ModelConfig, naming: str, path: Path) -> None:
    """Names, shapes and dtypes of every tensor against what the config implies, before allocation."""
    check_plausible(cfg, len(st), path)
    if naming == "giants":
        expected = {n: tuple(t.shape) for n, t in meta_model(cfg).state_dict().items()}
    else:
        expected = _expected_hf(cfg)
    used: set[str] = set()
    for name, shape in expected.items():
        packed = _mxfp4_parts(name) if naming == "hf" else None
        if name not in st and packed and packed[0] in st:
            blocks, scales = (st.entries[p] for p in packed)
            # MXFP4 stores W^T: (E, K, N) -> blocks (E, N, K/32, 16), scales (E, N, K/32)
            E, K, N = shape
            want_b, want_s = (E, N, K // mxfp4.BLOCK, mxfp4.BLOCK // 2), (E, N, K // mxfp4.BLOCK)
            for e, want in ((blocks, want_b), (scales, want_s)):
                if e.dtype != "U8":
                    raise CheckpointError(f"MXFP4 part has dtype {e.dtype}, expected U8", file=e.file, tensor=e.name)
                if e.shape != want:
                    raise CheckpointError(f"shape {e.shape} but the config implies {want}", file=e.file,
                                          tensor=e.name)
            used.update(packed)
            continue
        if name not in st:
            raise CheckpointError("missing tensor", file=st.files[0] if len(st.files) == 1 else path, tensor=name)
        e = st.entries[name]
        if e.shape != shape:
            raise CheckpointError(f"shape {e.shape} but the config implies {shape}", file=e.file, tensor=name)
        if e.dtype not in FLOATING:
            raise CheckpointError(f"dtype {e.dtype} where a floating-point weight is expected", file=e.file,
                                  tensor=name)
        used.add(name)
    extra = sorted(n for n in st.keys() if n not in used and not hf_map._ignorable(n, cfg))
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"unexpected tensor{more}: the config does not use it", file=st.file_of(extra[0]),
                              tensor=extra[0])


def _default_dtype(st: SafetensorsSet) -> torch.dtype:
    kinds = {e.torch_dtype for e in st.entries.values() if e.dtype in FLOATING and e.dtype[:2] != "F8"}
    return kinds.pop() if len(kinds) == 1 else torch.float32


_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "constant_", "ones_", "zeros_", "orthogonal_")
_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_meta_init() -> Iterator[None]:
    """Skip torch.nn.init on meta tensors while a model is built for loading: the values are about to be
    overwritten, and the first random op on the meta device imports torch._dynamo (~3 s, ~75 MB of RSS).
    Real tensors (another thread building a model) are still initialised as usual."""
    import torch.nn.init as init

    with _INIT_LOCK:
        saved = {n: getattr(init, n) for n in _INIT_FNS}

        def skip(orig):
            def fn(tensor, *args, **kwargs):
                return tensor if getattr(tensor, "is_meta", False) else orig(tensor, *args, **kwargs)
            return fn

        try:
            for n, f in saved.items():
                setattr(init, n, skip(f))
            yield
        finally:
            for n, f in saved.items():
                setattr(init, n, f)


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model on the meta device, built cheaply (no init work)."""
    with _no_meta_init():
        return build(cfg, device="meta")


def _allocate(cfg: ModelConfig, device, dtype: torch.dtype) -> Transformer:
    """Uninitialised weights, allocated once, directly in the target dtype (no float32 detour)."""
    return meta_model(cfg).to(dtype).materialize(device)


def _load_dir(path: Path, dtype: torch.dtype | None, device) -> Transformer:
    cfg, naming = read_dir_config(path)
    st = SafetensorsSet.from_dir(path)
    _check_dir(st, cfg, naming, path)
    model = _allocate(cfg, device, dtype or _default_dtype(st))
    params = dict(model.named_parameters())
    with torch.no_grad():
        if naming == "giants":
            for name, p in params.items():
                st.read_into(name, p)
        else:
            view = _MXFP4View(st)
            for rule in hf_map.family_rules(cfg):
                if rule.identity and rule.hf[0] in st:
                    st.read_into(rule.hf[0], params[rule.ours[0]])  # straight from the file into the weight
                    continue
                inputs = [view[n] for n in rule.hf]
                for ours, t in zip(rule.ours, rule.to_ours(inputs)):
                    if tuple(t.shape) != tuple(params[ours].shape):
                        raise CheckpointError(f"maps to shape {tuple(t.shape)}, model has "
                                              f"{tuple(params[ours].shape)}", file=path, tensor=rule.hf[0])
                    params[ours].copy_(t)
                del inputs
    return model.eval()


# ---- GGUF ------------------------------------------------------------------------------------------
def _load_gguf(path: Path, dtype: torch.dtype | None, device) -> Transformer:
    from giants.checkpoint.gguf_io import GGUFFile

    g = GGUFFile(path)
    cfg = g.config
    expected = {n: tuple(t.shape) for n, t in meta_model(cfg).state_dict().items()}
    g.check(expected)
    model = _allocate(cfg, device, dtype or torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in g.items():
            params[name].copy_(t)
    return model.eval()


def load_config(source: str | os.PathLike) -> ModelConfig:
    """Only the config of a checkpoint (no tensors read)."""
    path = resolve(source)
    if path.is_file() and path.suffix == ".gguf":
        from giants.checkpoint.gguf_io import GGUFFile

        return GGUFFile(path).config
    return read_dir_config(path if path.is_dir() else path.parent)[0]


__all__: list[Any] = ["load", "load_config", "resolve", "read_dir_config"]
