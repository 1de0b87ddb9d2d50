"""GGUF in through the `gguf` package: metadata -> ModelConfig, tensors dequantized into our names.

`GGUFReader` trusts its input, so every file is first walked by `gguf_validate.validate_gguf` (each count
and length checked against the bytes left); after that pass the reader cannot run away. Tensor bytes are
only ever decoded by `gguf.quants.dequantize`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giants.checkpoint.errors import CheckpointError
from giants.checkpoint.gguf_validate import validate_gguf
from giants.config import ModelConfig


# ---- reading -------------------------------------------------------------------------------------
def _reader_class():
    from gguf import GGUFReader
    from gguf.gguf_reader import ReaderField

    class ArrayField:
        """An array read in one piece, in place of the reader's ReaderField: numbers as one numpy view, strings as
        (start, end) byte spans decoded when asked for; contents() returns what the ReaderField's would."""

        def __init__(self, offset, name, parts, types, values=None, spans=None, raw=None) -> None:
            self.offset, self.name, self.parts, self.types = offset, name, parts, types
            self.data = [len(parts) - 1]
            self.values, self.spans, self.raw = values, spans, raw

        def contents(self, index_or_slice=slice(None)):
            if self.spans is not None:
                pick = self.spans[index_or_slice]
                if isinstance(index_or_slice, int):
                    return str(self.raw[pick[0]:pick[1]], encoding="utf-8")
                return [str(self.raw[a:b], encoding="utf-8") for a, b in pick]
            return self.values[index_or_slice].tolist()

    class Reader(GGUFReader):
        # GGUFReader slices its np.memmap hundreds of thousands of times while reading metadata, and every
        # memmap slice pays for memmap.__array_finalize__. A plain ndarray view of the same mapping reads
        # the same bytes ~3x faster.
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

        # Arrays of scalars or strings (a vocabulary: 49,152 tokens and 48,900 merges for SmolLM2) read in one
        # pass instead of one field part per element: 7 s -> a fraction of a second. validate_gguf has already
        # checked every length against the file.
        def _build_fields(self, offs: int, count: int) -> int:
            for _ in range(count):
                orig = offs
                klen, kdata = self._get_str(offs)
                offs += int(klen.nbytes + kdata.nbytes)
                raw_type = self._get(offs, np.uint32)
                offs += int(raw_type.nbytes)
                parts = [klen, kdata, raw_type]
                name = str(bytes(kdata), encoding="utf-8")
                if int(raw_type[0]) == 9:
                    size, field = self._array_field(orig, name, parts, offs)
                    if field is not None:
                        self._push_field(field, skip_sum=True)
                        offs += size
                        continue
                size, fparts, fidx, ftypes = self._get_field_parts(offs, raw_type[0])
                base = len(parts)
                self._push_field(ReaderField(orig, name, parts + fparts, [i + base for i in fidx], ftypes),
                                 skip_sum=True)
                offs += size
            return offs

        def _array_field(self, orig: int, name: str, parts: list, offs: int):
            from gguf.constants import GGUFValueType

            itype = self._get(offs, np.uint32)
            alen = self._get(offs + 4, np.uint64)
            sub, n, start = int(itype[0]), int(alen[0]), offs + 12
            types = [GGUFValueType.ARRAY, GGUFValueType(sub)] if sub in GGUFValueType._value2member_map_ else None
            if types is None or sub == 9:
                return 0, None  # nested arrays: the reader's own walk
            if sub != 8:
                values = self._get(start, self.gguf_scalar_to_np[GGUFValueType(sub)], n)
                return 12 + int(values.nbytes), ArrayField(orig, name, parts + [itype, alen, values], types,
                                                           values=values)
            mv = memoryview(self._data)
            spans = []
            pos = start
            for _ in range(n):
                ln = int.from_bytes(mv[pos:pos + 8], "little")
                spans.append((pos + 8, pos + 8 + ln))
                pos += 8 + ln
            raw = self._data[start:pos]
            return pos - offs, ArrayField(orig, name, parts + [itype, alen, raw], types, spans=spans, raw=mv)

    return Reader


_VALIDATED: dict[tuple[int, int, int, int], None] = {}  # identities of the regular files validate_gguf passed


def _identity(path: str | Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    import stat

    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def open_gguf(path: str | Path):
    """A validated `gguf.GGUFReader`; any defect raises CheckpointError naming the file. A file validated before in
    this process, unchanged since (device, inode, size and modification time equal), is not walked again: one
    `giants generate` opens the same GGUF four times (its config, the weights, the tokenizer)."""
    key = _identity(path)
    if key is None or key not in _VALIDATED:
        validate_gguf(path)
        if key is not None:
            if len(_VALIDATED) >= 64:
                _VALIDATED.clear()
            _VALIDATED[key] = None
    try:
        return _reader_class()(path)
    except CheckpointError:
        raise
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, ... on bad input
        raise CheckpointError(f"cannot read GGUF: {type(e).__name__}: {e}", file=path) from None


def gguf_metadata(reader, path: str | Path | None = None) -> dict[str, Any]:
    """Every metadata key -> plain Python value (str, int, float, bool or list of those)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
            if len(field.types) == 1 and field.types[0] == 6 and isinstance(value, float):
                # float32 metadata: keep the number that was written (1e-05), not its binary neighbour
                value = float(str(np.float32(value)))
            out[key] = value
        except Exception as e:
            raise CheckpointError(f"metadata {key!r} cannot be decoded: {type(e).__name__}: {e}",
                                  file=path or reader.data.filename) from None
    return out


# ---- metadata -> ModelConfig ---------------------------------------------------------------------
# GGUF architectures we read; llama.cpp writes Mistral 7B and Mixtral as `llama` too.
ARCHS = ("llama", "qwen2", "gemma", "gemma2", "gpt-oss")
# llama.cpp rotates q/k pairs (i, i + D/2) as (2i, 2i+1) for these, so the converter permuted the rows.
_PERMUTED = ("llama",)


def _llama3_factors(cfg: ModelConfig) -> torch.Tensor:
    from giants.model.positions import rope_inv_freq

    plain, _ = rope_inv_freq(cfg.replace(rope_scaling="none", rope_factor=1.0))
    scaled, _ = rope_inv_freq(cfg)
    return plain / scaled


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, tuple[int, ...]], path: str | Path,
                     rope_freqs: np.ndarray | None = None) -> ModelConfig:
    """ModelConfig from GGUF metadata; `tensors` maps GGUF tensor names to numpy-order shapes."""
    try:
        return _config_from_gguf(meta, tensors, path, rope_freqs)
    except CheckpointError:
        raise
    except (ValueError, TypeError, OverflowError, KeyError, IndexError) as e:
        raise CheckpointError(f"metadata does not describe a model: {type(e).__name__}: {e}", file=path) from None


def _check_counts(n_layers: int, n_experts: int, tensors: dict[str, tuple[int, ...]], path: str | Path) -> None:
    """Layer and expert counts drive Python loops and name lists: they must match the tensors actually in the
    file, and are compared without building anything of their size (a block_count of 1e9 is one comparison)."""
    layers = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if n_layers != len(layers) or (layers and (min(layers) != 0 or max(layers) != n_layers - 1)):
        raise CheckpointError(f"block_count={n_layers} but the file has blocks {_span(layers)}", file=path)
    if n_experts:
        router = tensors.get("blk.0.ffn_gate_inp.weight")  # (experts, d_model) in numpy order, in every layout
        if router is None or router[0] != n_experts:
            have = "no router tensor blk.0.ffn_gate_inp.weight" if router is None else \
                f"a router blk.0.ffn_gate_inp.weight of {router[0]} rows"
            raise CheckpointError(f"expert_count={n_experts} but the file has {have}", file=path)


def _span(xs: set[int]) -> str:
    return f"{min(xs)}..{max(xs)} ({len(xs)} distinct)" if xs else "none"


def _config_from_gguf(meta: dict[str, Any], tensors: dict[str, tuple[int, ...]], path: str | Path,
                      rope_freqs: np.ndarray | None = None) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})",
                              file=path)

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise CheckpointError(f"missing metadata {arch}.{key}", file=path)
        return v

    d_model = int(get("embedding_length", required=True))
    n_layers = int(get("block_count", required=True))
    _check_counts(n_layers, int(get("expert_count", 0) or 0), tensors, path)
    n_heads = int(get("attention.head_count", required=True))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise CheckpointError("per-layer attention.head_count_kv is not supported", file=path)
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or d_model // n_heads)
    if "token_embd.weight" not in tensors:
        raise CheckpointError("missing tensor", file=path, tensor="token_embd.weight")
    vocab = int(tensors["token_embd.weight"][0])
    if get("vocab_size") is not None and int(get("vocab_size")) != vocab:
        raise CheckpointError(f"{arch}.vocab_size={get('vocab_size')} but token_embd.weight has {vocab} rows",
                              file=path, tensor="token_embd.weight")
    n_experts = int(get("expert_count", 0) or 0)
    ffn = get("expert_feed_forward_length") if n_experts else None
    ffn = int(ffn or get("feed_forward_length", required=True))
    if isinstance(ffn, list):
        raise CheckpointError("per-layer feed_forward_length is not supported", file=path)
    fields: dict[str, Any] = dict(
        vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=int(n_kv),
        head_dim=head_dim, ffn_dim=ffn, max_context=int(get("context_length", 4096)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    bias = "blk.0.attn_q.bias" in tensors
    fields.update(attn_qkv_bias=bias, attn_out_bias="blk.0.attn_output.bias" in tensors,
                  mlp_bias="blk.0.ffn_up.bias" in tensors or "blk.0.ffn_up_exps.bias" in tensors)
    if n_experts:
        fields.update(n_experts=n_experts, experts_per_token=int(get("expert_used_count", required=True)))
    window = int(get("attention.sliding_window", 0) or 0)
    scaling = get("rope.scaling.type", "none") or "none"
    if scaling == "yarn":
        fields.update(rope_scaling="yarn", rope_factor=float(get("rope.scaling.factor", required=True)),
                      rope_original_max_context=int(get("rope.scaling.original_context_length", required=True)),
                      yarn_beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0)),
                      yarn_beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0)))
    elif scaling == "linear":
        raise CheckpointError("linear rope scaling is not supported", file=path)
    elif scaling not in ("none",):
        raise CheckpointError(f"rope.scaling.type {scaling!r} is not supported", file=path)

    if arch in ("llama", "qwen2"):
        if window:
            fields["layer_windows"] = (window,)
    elif arch in ("gemma", "gemma2"):
        fields.update(activation="gelu_tanh_glu", norm_kind="rmsnorm_plus_one", embed_scale=float(d_model) ** 0.5,
                      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)))
        scale = get("attention.scale")
        if scale is not None:
            fields["query_scale"] = float(scale) ** -2
        elif arch == "gemma2" and n_layers == 46:
            fields["query_scale"] = float(d_model // n_heads)  # llama.cpp's rule for Gemma 2 27B
        else:
            fields["query_scale"] = float(head_dim)
        if arch == "gemma2":
            fields.update(post_norms=True, attn_softcap=get("attn_logit_softcapping"),
                          final_softcap=get("final_logit_softcapping"),
                          layer_windows=(window, 0) if window else ())
    elif arch == "gpt-oss":
        # llama.cpp fixes these for gpt-oss (alpha 1.702, limit 7, top-k then softmax, even layers sliding).
        fields.update(activation="clamped_swiglu", attn_sinks=True, router_bias=True,
                      router_softmax_before_topk=False, yarn_truncate=False,
                      layer_windows=(window, 0) if window else ())
    # Sizes that drive work before the tensor shapes are compared (the rotary tables are computed on the CPU
    # while the meta model is built) must fit in the file's largest tensor, each being one of its dimensions.
    biggest = max((math.prod(s) for s in tensors.values()), default=0)
    for what, n in (("embedding_length", d_model), ("feed_forward_length", ffn), ("head_dim", head_dim),
                    ("head_count * head_dim", n_heads * head_dim), ("head_count_kv * head_dim", int(n_kv) * head_dim)):
        if n > biggest:
            raise CheckpointError(f"metadata gives {what} = {n}, more than the largest tensor holds ({biggest} "
                                  "elements)", file=path)
    if "rope_freqs.weight" in tensors:
        fields.update(_llama3_from_factors(fields, rope_freqs, path))
    try:
        cfg = ModelConfig(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"metadata gives an invalid config: {e}", file=path) from None
    return cfg


def _llama3_from_factors(fields: dict[str, Any], freqs: np.ndarray | None, path: str | Path) -> dict[str, Any]:
    """llama.cpp stores Llama 3.1-style rope scaling as a `rope_freqs` tensor of per-frequency divisors.
    Recover the llama3 parameters that produce exactly these divisors, or refuse."""
    if freqs is None:
        raise CheckpointError("rope_freqs.weight present but unreadable", file=path, tensor="rope_freqs.weight")
    target = torch.from_numpy(np.asarray(freqs, dtype=np.float32)).double()
    factor = float(target.max())
    if factor <= 1.0 + 1e-6:
        return {}
    for orig in (8192, 4096, 2048, 16384, 32768, 65536, 131072, 64, 128, 256, 512, 1024):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            trial = dict(fields, rope_scaling="llama3", rope_factor=factor, rope_original_max_context=orig,
                         rope_low_freq_factor=low, rope_high_freq_factor=high)
            try:
                got = _llama3_factors(ModelConfig(**trial)).double()
            except ValueError:
                continue
            if got.shape == target.shape and torch.allclose(got, target, rtol=1e-4, atol=1e-5):
                return {k: trial[k] for k in ("rope_scaling", "rope_factor", "rope_original_max_context",
                                              "rope_low_freq_factor", "rope_high_freq_factor")}
    raise CheckpointError("rope_freqs does not match llama3 rope scaling for any standard parameters",
                          file=path, tensor="rope_freqs.weight")


# ---- tensors -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFRule:
    ours: str
    gguf: tuple[str, ...]  # one tensor, or one per expert (stacked)
    fix: Callable[[torch.Tensor], torch.Tensor] | None = None


def _unpermute(n_head: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Undo convert_hf_to_gguf's `permute` of q/k rows, which interleaved the two rotary halves of each head:
    file rows are (H, D/2, 2), ours (H, 2, D/2)."""
    def f(w: torch.Tensor) -> torch.Tensor:
        rows = w.shape[0]
        return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return f


def _minus_one(w: torch.Tensor) -> torch.Tensor:
    return w - 1.0  # Gemma GGUFs store norm weights with the +1 folded in


def gguf_rules(cfg: ModelConfig, arch: str, names: set[str]) -> list[GGUFRule]:
    permute = arch in _PERMUTED
    norm_fix = _minus_one if arch in ("gemma", "gemma2") else None
    R = GGUFRule
    rules = [R("embed.weight", ("token_embd.weight",)), R("norm.weight", ("output_norm.weight",), norm_fix)]
    if not cfg.tie_embeddings:
        rules.append(R("lm_head.weight", ("output.weight",)))
    for i in range(cfg.n_layers):
        b, o = f"blk.{i}.", f"layers.{i}."
        rules.append(R(o + "attn_norm.weight", (b + "attn_norm.weight",), norm_fix))
        for g, p in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            fix = None
            if permute and g in ("attn_q", "attn_k"):
                fix = _unpermute(cfg.n_heads if g == "attn_q" else cfg.n_kv_heads)
            rules.append(R(f"{o}attn.{p}.weight", (f"{b}{g}.weight",), fix))
            if cfg.attn_out_bias if g == "attn_output" else cfg.attn_qkv_bias:
                rules.append(R(f"{o}attn.{p}.bias", (f"{b}{g}.bias",), fix))
        if cfg.attn_sinks:
            rules.append(R(o + "attn.sinks", (b + "attn_sinks.weight",)))
        if cfg.post_norms:
            rules += [R(o + "attn_post_norm.weight", (b + "post_attention_norm.weight",), norm_fix),
                      R(o + "mlp_norm.weight", (b + "ffn_norm.weight",), norm_fix),
                      R(o + "mlp_post_norm.weight", (b + "post_ffw_norm.weight",), norm_fix)]
        elif arch == "gpt-oss":
            rules.append(R(o + "mlp_norm.weight", (b + "post_attention_norm.weight",)))
        else:
            rules.append(R(o + "mlp_norm.weight", (b + "ffn_norm.weight",), norm_fix))
        if not cfg.is_moe:
            for g, p in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
                rules.append(R(f"{o}mlp.{p}.weight", (f"{b}{g}.weight",)))
                if cfg.mlp_bias:
                    rules.append(R(f"{o}mlp.{p}.bias", (f"{b}{g}.bias",)))
            continue
        rules.append(R(o + "mlp.router.weight", (b + "ffn_gate_inp.weight",)))
        if cfg.router_bias:
            rules.append(R(o + "mlp.router.bias", (b + "ffn_gate_inp.bias",)))
        for g, w in (("gate", "w_gate"), ("up", "w_up"), ("down", "w_down")):
            stacked = f"{b}ffn_{g}_exps.weight"
            if stacked in names or f"{b}ffn_{g}.0.weight" not in names:
                rules.append(R(f"{o}mlp.{w}", (stacked,)))
            else:  # older llama.cpp files: one tensor per expert
                rules.append(R(f"{o}mlp.{w}", tuple(f"{b}ffn_{g}.{e}.weight" for e in range(cfg.n_experts))))
            if cfg.mlp_bias:
                rules.append(R(f"{o}mlp.b_{g}", (f"{b}ffn_{g}_exps.bias",)))
    return rules


def _fast_dequantize(data: np.ndarray, qtype) -> np.ndarray | None:
    """Q4_0, Q4_1 and Q8_0 (the common llama.cpp types) with torch's vectorised, multi-threaded kernels, the same
    float32 operations in the same order as gguf.quants (bit-identical results), ~10x faster; None for others."""
    import warnings

    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as T

    if qtype not in (T.Q4_0, T.Q4_1, T.Q8_0):
        return None
    _, type_size = GGML_QUANT_SIZES[qtype]
    with warnings.catch_warnings():  # a read-only view of the file mapping: only ever read here
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(np.ascontiguousarray(data).reshape(-1)).view(-1, type_size)
    halves = blocks.view(torch.float16)  # every block starts with its float16 scale d (Q4_1: then its min m)
    d = halves[:, :1].float()
    if qtype == T.Q8_0:
        return blocks[:, 2:].view(torch.int8).float().mul_(d).numpy()
    qs = blocks[:, 4:] if qtype == T.Q4_1 else blocks[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # low nibbles are elements 0-15, high 16-31
    if qtype == T.Q4_0:
        return q.sub_(8).mul_(d).numpy()
    return q.mul_(d).add_(halves[:, 1:2].float()).numpy()


def dequantize_tensor(t, path: str | Path) -> torch.Tensor:
    """One `ReaderTensor` as float32, in numpy (PyTorch) dimension order, via gguf.quants.dequantize (Q4_0,
    Q4_1, Q8_0 through `_fast_dequantize`)."""
    from gguf.quants import dequantize

    check_mxfp4_scales(t.data, t.tensor_type, t.name, path)
    try:
        arr = _fast_dequantize(t.data, t.tensor_type)
        if arr is None:
            arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"GGML type {t.tensor_type.name} cannot be dequantized", file=path,
                              tensor=t.name) from None
    except Exception as e:
        raise CheckpointError(f"cannot dequantize: {type(e).__name__}: {e}", file=path, tensor=t.name) from None
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if math.prod(arr.shape) != math.prod(shape):
        raise CheckpointError(f"dequantized to {arr.shape}, header says {shape}", file=path, tensor=t.name)
    # F32 comes back as a view of the read-only file mapping; everything else is a fresh array.
    arr = np.array(arr, dtype=np.float32, copy=True if not (arr.flags.owndata and arr.flags.writeable) else None)
    if not np.isfinite(arr).all():
        raise CheckpointError("non-finite values after dequantization", file=path, tensor=t.name)
    return torch.from_numpy(arr.reshape(shape))


def check_mxfp4_scales(data: np.ndarray, qtype, name: str, path: str | Path) -> None:
    """An MXFP4 block's E8M0 scale byte 0xFF is NaN (OCP MX v1.0), which decodes to inf: refuse it, naming the
    block. One vectorised comparison over the scale bytes (every 17th byte), not a decode."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if qtype != GGMLQuantizationType.MXFP4:
        return
    _, type_size = GGML_QUANT_SIZES[qtype]
    scales = np.asarray(data).reshape(-1).view(np.uint8).reshape(-1, type_size)[:, 0]
    bad = scales == 0xFF
    if bad.any():
        raise CheckpointError(f"scale 0xFF (E8M0 NaN) in block {int(bad.argmax())} ({int(bad.sum())} such blocks of "
                              f"{len(scales)})", file=path, tensor=name)


class GGUFFile:
    """A validated GGUF file: metadata, config, and our tensors dequantized on demand."""

    IGNORED = ("rope_freqs.weight",)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.meta = gguf_metadata(self.reader, self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.meta.get("general.architecture")
        shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in self.tensors.items()}
        self.shapes = shapes
        freqs = self.dequant("rope_freqs.weight").numpy() if "rope_freqs.weight" in self.tensors else None
        self.config = config_from_gguf(self.meta, shapes, self.path, freqs)
        self.rules = gguf_rules(self.config, self.arch, set(self.tensors))

    def qtype(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def dequant(self, name: str) -> torch.Tensor:
        return dequantize_tensor(self.tensors[name], self.path)

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every rule's tensors present with the shapes the config implies; nothing unexpected left over."""
        used: set[str] = set(self.IGNORED)
        for r in self.rules:
            want = expected[r.ours]
            per = want[1:] if len(r.gguf) > 1 else want
            for g in r.gguf:
                if g not in self.tensors:
                    raise CheckpointError(f"missing tensor (needed for {r.ours})", file=self.path, tensor=g)
                if self.shapes[g] != tuple(per):
                    raise CheckpointError(f"shape {self.shapes[g]} but the metadata implies {tuple(per)}",
                                          file=self.path, tensor=g)
                used.add(g)
        extra = sorted(set(self.tensors) - used)
        if extra:
            raise CheckpointError(f"unexpected tensor (+{len(extra) - 1} more)" if len(extra) > 1
                                  else "unexpected tensor", file=self.path, tensor=extra[0])

    def items(self, names: Container[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(giants name, tensor) for every rule, or only the giants names in `names` (the rest are not read)."""
        for r in self.rules:
            if names is not None and r.ours not in names:
                continue
            ts = [self.dequant(g) for g in r.gguf]
            t = ts[0] if len(ts) == 1 else torch.stack(ts)
            yield r.ours, (r.fix(t) if r.fix is not None else t)
