"""giants.load: HF directories, giants directories, GGUF files and known model names -> Transformer.

Every check that can fail (config, tensor names, shapes, dtypes, file integrity) runs on headers
before the model is allocated; the model is built on the meta device, materialised once at the
target device/dtype, and filled tensor by tensor. Any error raises CheckpointError and the partly
filled model is dropped, never returned.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from giants.checkpoint import hf_map, hub, mxfp4
from giants.checkpoint.errors import CheckpointError
from giants.checkpoint.files import check_regular, exists, read_text
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
         device_map: str | dict | None = None, max_memory: dict | None = None,
         offload_folder: str | os.PathLike | None = None, quantization: str | None = None) -> Transformer:
    """Load a checkpoint as a giants Transformer (eval mode).

    dtype None keeps the checkpoint's floating dtype (float32 for GGUF, whose weights are dequantized).
    device_map ("auto", "balanced", "sequential" or {module: device}) places whole blocks on GPUs, in host
    memory or on disk (offload_folder) instead of `device`, within max_memory ({0: "70GiB", "cpu": "200GiB"});
    each weight is read straight to its placement (giants.inference.placement).
    quantization: None (every weight a float tensor), "auto" (as stored: FP8 stays FP8, MXFP4 experts stay
    packed), "mxfp4" or "fp8" / "fp8-block" (+ "+head"): see giants.checkpoint.quantized."""
    path = resolve(source)
    dtype = _dtype(dtype)
    if device_map is not None:
        device = _Placed(device_map, max_memory, offload_folder)
    if not path.is_dir():
        check_regular(path)  # a FIFO would block the first open() forever
    from giants.checkpoint import quantized

    if quantized.needs(path, quantization):  # weights kept quantized (or an FP8 checkpoint dequantized)
        return quantized.load_quantized(path, dtype, device, quantization)
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, dtype, device)
        if path.suffix == ".safetensors" or path.name.endswith(".json"):
            path = path.parent
        else:
            raise CheckpointError("not a checkpoint: expected a directory or a .gguf file", file=path)
    return _load_dir(path, dtype, device)


class _Placed:
    """A device_map request standing where a device goes: _allocate places the model with it."""

    def __init__(self, device_map: str | dict, max_memory: dict | None, offload_folder) -> None:
        self.device_map, self.max_memory, self.offload_folder = device_map, max_memory, offload_folder


# ---- directories -----------------------------------------------------------------------------------
def read_dir_config(path: Path) -> tuple[ModelConfig, str]:
    """(config, tensor naming 'hf' | 'giants') of a checkpoint directory. The safetensors headers are read too:
    every size in the config is checked against the tensors present before anything is built from it."""
    cfg, naming, _ = read_dir(path)
    return cfg, naming


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except CheckpointError:
        raise
    except Exception as e:  # untrusted JSON: whatever the parser trips on is a bad config, not a crash
        raise CheckpointError(f"bad JSON: {e}", file=path) from None


def read_dir(path: Path) -> tuple[ModelConfig, str, SafetensorsSet]:
    """(config, tensor naming, the safetensors headers) of a checkpoint directory, the config checked against
    the tensors (`check_plausible`) before anything proportional to its sizes (window lists, name maps, the
    HF export compared below) is built."""
    gpath, hpath = path / GIANTS_CONFIG, path / "config.json"
    hf_cfg = None
    if exists(hpath):
        hf = _read_json(hpath)
        try:
            if not isinstance(hf, dict):
                raise ValueError("config.json must hold a JSON object")
            hf_cfg = ModelConfig.from_hf(hf)
        except Exception as e:  # untrusted JSON: whatever the parser trips on is a bad config, not a crash
            raise CheckpointError(f"bad config: {e}", file=hpath) from None
    cfg = naming = None
    if exists(gpath):
        g = _read_json(gpath)
        try:
            naming = g["tensor_names"]
            if naming not in ("hf", "giants"):
                raise ValueError(f"tensor_names must be 'hf' or 'giants', got {naming!r}")
            cfg = ModelConfig.from_dict(g["config"])
        except Exception as e:
            raise CheckpointError(f"bad giants config: {e}", file=gpath) from None
    if cfg is None and hf_cfg is None:
        raise CheckpointError(f"no config.json or {GIANTS_CONFIG}", file=path)
    st = SafetensorsSet.from_dir(path)
    shapes = {n: e.shape for n, e in st.entries.items()}
    if hf_cfg is not None:
        check_plausible(hf_cfg, shapes, hpath)
    if cfg is not None:
        check_plausible(cfg, shapes, gpath)
        if hf_cfg is not None:
            # Both present: they must describe the same model (someone may have edited one).
            theirs = hf_cfg.to_dict()
            try:
                ours = ModelConfig.from_hf(cfg.to_hf()).to_dict()
            except Exception as e:
                raise CheckpointError(f"describes a model config.json cannot ({e})", file=gpath) from None
            diff = [k for k in ours if ours[k] != theirs[k]]
            if diff:
                raise CheckpointError(f"config.json and {GIANTS_CONFIG} disagree on {', '.join(diff)}",
                                      file=hpath)
        return cfg, str(naming), st
    assert hf_cfg is not None
    return hf_cfg, "hf", st


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
        except mxfp4.ScaleError as e:
            raise CheckpointError(str(e), file=self.st.file_of(packed[1]), tensor=packed[1]) from None
        except ValueError as e:
            raise CheckpointError(str(e), file=self.st.file_of(packed[0]), tensor=packed[0]) from None


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ROUTERS = ("mlp.router.weight", "block_sparse_moe.gate.weight")  # (experts, d_model): HF gpt-oss / giants, Mixtral


def _span(xs: set[int]) -> str:
    return f"{min(xs)}..{max(xs)} ({len(xs)} distinct)" if xs else "none"


def check_plausible(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """Counts and sizes that drive work before the shape checks (Python loops and name lists over layers and
    experts, window lists, the rotary tables computed on the CPU while the meta model is built) must be backed
    by the file: `shapes` holds every tensor in it. A corrupt config therefore cannot make us build a
    billion-layer model or allocate a terabyte of rotary frequencies before its tensors are compared; each
    check is a comparison, never a structure of the size it checks."""
    sizes = [math.prod(s) for s in shapes.values()]
    biggest = max(sizes, default=0)
    layers = {int(m.group(1)) for n in shapes if (m := _LAYER.search(n))}
    if cfg.n_layers > len(layers):
        raise CheckpointError(f"config says {cfg.n_layers} layers but the checkpoint holds layers {_span(layers)}",
                              file=where)
    if cfg.n_experts:
        routers = {n: s for n, s in shapes.items() if n.endswith(_ROUTERS) and s}
        wrong = next(((n, s) for n, s in sorted(routers.items()) if s[0] != cfg.n_experts), None)
        if not routers or wrong is not None:
            have = f"the router {wrong[0]} has {wrong[1][0]} rows" if wrong else "it holds no router weight"
            raise CheckpointError(f"config says {cfg.n_experts} experts but {have}", file=where)
    # Every one of these is (a factor of) one dimension of some weight, so it cannot exceed the largest tensor.
    dims = {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "ffn_dim": cfg.ffn_dim, "head_dim": cfg.head_dim,
            "n_heads * head_dim": cfg.n_heads * cfg.head_dim, "n_kv_heads * head_dim": cfg.n_kv_heads * cfg.head_dim}
    if cfg.position == "t5_bias":
        dims["rel_buckets"] = cfg.rel_buckets
    for what, n in dims.items():
        if n > biggest:
            raise CheckpointError(f"config says {what} = {n}, more than the largest tensor in the checkpoint "
                                  f"holds ({biggest} elements)", file=where)


def _check_dir(st: SafetensorsSet, cfg: ModelConfig, naming: str, path: Path) -> None:
    """Names, shapes and dtypes of every tensor against what the config implies, before allocation."""
    check_plausible(cfg, {n: e.shape for n, e in st.entries.items()}, path)
    if naming == "giants":
        expected = {n: tuple(t.shape) for n, t in meta_model(cfg).state_dict().items()}
    else:
        _check_rules_cover_model(cfg, path)
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


def _check_rules_cover_model(cfg: ModelConfig, path: Path) -> None:
    """Every parameter must be written by some name-map rule: one that none fills would be returned as
    uninitialised memory (a half-loaded model), so refuse before allocating."""
    filled = {o for r in hf_map.family_rules(cfg) for o in r.ours}
    unfilled = sorted(set(dict(meta_model(cfg).named_parameters())) - filled)
    if unfilled:
        raise CheckpointError(f"no tensor of a {cfg.hf_model_type} checkpoint fills the model's {unfilled[0]!r}"
                              + (f" (+{len(unfilled) - 1} more)" if len(unfilled) > 1 else ""), file=path)


def _check_tied_head(st: SafetensorsSet, cfg: ModelConfig, embed: torch.Tensor) -> None:
    """A tied config ignores a stored lm_head.weight (as transformers does); that is only right when the
    stored head is the embedding. A different one means the config disagrees with the tensors."""
    name = "lm_head.weight"
    if not cfg.tie_embeddings or name not in st:
        return
    e = st.entries[name]
    if e.shape != tuple(embed.shape):
        raise CheckpointError(f"config ties the embeddings, but the stored head has shape {e.shape}, the embedding "
                              f"{tuple(embed.shape)}", file=e.file, tensor=name)
    rows = max(1, (64 << 20) // max(1, math.prod(e.shape[1:]) * e.torch_dtype.itemsize))  # ~64 MiB at a time
    for r in range(0, e.shape[0], rows):
        part = st.read_rows(name, r, min(r + rows, e.shape[0]))
        if not torch.equal(part.to(device=embed.device, dtype=embed.dtype), embed[r:r + part.shape[0]]):
            raise CheckpointError("config ties the embeddings (tie_word_embeddings), but the stored head differs "
                                  "from the embedding", file=e.file, tensor=name)


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
    if isinstance(device, _Placed):
        from giants.inference.placement import materialize

        return materialize(meta_model(cfg).to(dtype), device.device_map, device.max_memory, device.offload_folder)
    return meta_model(cfg).to(dtype).materialize(device)


def _load_dir(path: Path, dtype: torch.dtype | None, device) -> Transformer:
    cfg, naming, st = read_dir(path)
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
        _check_tied_head(st, cfg, params["embed.weight"])
    return model.eval()


# ---- GGUF ------------------------------------------------------------------------------------------
def _load_gguf(path: Path, dtype: torch.dtype | None, device) -> Transformer:
    from giants.checkpoint.gguf_io import GGUFFile

    g = GGUFFile(path)
    cfg = g.config
    params = dict(meta_model(cfg).named_parameters())
    expected = {n: tuple(t.shape) for n, t in params.items()}
    g.check(expected)
    unfilled = sorted(set(params) - {r.ours for r in g.rules})
    if unfilled:  # would come back as uninitialised memory
        raise CheckpointError(f"no tensor of this {g.arch} file fills the model's {unfilled[0]!r}", file=path)
    model = _allocate(cfg, device, dtype or torch.float32)
    params = dict(model.named_parameters())
    from giants.cpu import bulk_threads

    with torch.no_grad(), bulk_threads():  # no spinning OpenMP barriers while other processes hold the cores
        for name, t in g.items():
            params[name].copy_(t)
    return model.eval()


def load_config(source: str | os.PathLike) -> ModelConfig:
    """Only the config of a checkpoint (no tensors read)."""
    path = resolve(source)
    if not path.is_dir():
        check_regular(path)
    if path.is_file() and path.suffix == ".gguf":
        from giants.checkpoint.gguf_io import GGUFFile

        return GGUFFile(path).config
    return read_dir_config(path if path.is_dir() else path.parent)[0]


__all__: list[Any] = ["load", "load_config", "resolve", "read_dir_config", "read_dir"]
