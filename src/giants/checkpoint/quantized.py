"""giants.load(..., quantization=...): checkpoints whose weights stay quantized in memory.

quantization:
  None        every weight as a float tensor (FP8 and MXFP4 checkpoints are dequantized; the default).
  "auto"      as the checkpoint stores them: FP8 weights stay FP8, MXFP4 experts stay packed, floats stay float.
  "mxfp4"     MoE experts as packed MXFP4 (giants.inference.mxfp4.MXFP4MoE): read straight from `*_blocks` /
              `*_scales` (or a GGUF's MXFP4 tensors, repacked) without a float copy; float experts quantized.
  "fp8", "fp8-block" (+"+head")  every linear and every expert FP8 (giants.inference.fp8): an FP8 checkpoint's
              weights and scales are read as stored (its linears stored in float stay float); float weights are
              quantized one tensor at a time as they are read. MXFP4 experts stay packed MXFP4 (4.25 bits);
              with "+mxfp4" float (or FP8) experts are packed MXFP4 too.
Every check of giants.load runs before allocation; the model is built on the meta device with the quantized
modules in place, materialised once, and filled tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from giants.checkpoint import fp8 as ckfp8
from giants.checkpoint import hf_map, loading, mxfp4
from giants.checkpoint.errors import CheckpointError
from giants.checkpoint.safetensors_io import FLOATING, SafetensorsSet
from giants.config import ModelConfig


def needs(path: Path, quantization: str | None) -> bool:
    """Whether giants.load routes this checkpoint here: a quantization asked for, or an FP8 checkpoint."""
    if quantization is not None:
        return True
    d = path if path.is_dir() else path.parent
    return path.suffix != ".gguf" and ckfp8.quantization_config(d).get("quant_method") in ckfp8.METHODS


def _check_quantization(q: str | None) -> None:
    from giants.inference.fp8 import is_fp8, parse_fp8

    if q in (None, "auto", "mxfp4"):
        return
    if is_fp8(q):
        parse_fp8(q)
        return
    raise ValueError(f"quantization: one of None, 'auto', 'mxfp4', 'fp8', 'fp8-block' (+'+head', +'+mxfp4') "
                     f"(got {q!r})")


def load_quantized(path: Path, dtype: torch.dtype | None, device, quantization: str | None) -> nn.Module:
    from giants.inference.fp8 import check_experts

    _check_quantization(quantization)
    if not isinstance(device, (str, torch.device)):
        raise ValueError("device_map: not combined with quantization= or quantized (FP8) checkpoints yet")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device, quantization)
    d = path if path.is_dir() else path.parent
    cfg, naming = loading.read_dir_config(d)
    qc = ckfp8.quantization_config(d)
    method = qc.get("quant_method")
    if method not in (None, "mxfp4", *ckfp8.METHODS):
        raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported (mxfp4, "
                              f"{', '.join(ckfp8.METHODS)})", file=d / "config.json")
    stored_fp8 = method in ckfp8.METHODS
    q = quantization
    if q == "auto":
        q = "fp8" if stored_fp8 else "mxfp4" if method == "mxfp4" else None
    if q is None and not stored_fp8:
        return loading._load_dir(d, dtype, device)
    check_experts(q, cfg)
    if naming == "giants":  # our own tensor names (no HF family): load as floats, then quantize in memory
        if stored_fp8:
            raise CheckpointError("an FP8 quantization_config with giants tensor names", file=d)
        return _convert(loading._load_dir(d, dtype, device), q)
    layout = ckfp8.stored_layout(qc) if stored_fp8 else None
    st = SafetensorsSet.from_dir(d)
    stored = _check(st, cfg, d, layout)
    return _Filler(st, cfg, d, layout, stored, q, dtype or loading._default_dtype(st), device).run()


def _convert(model: nn.Module, q: str | None) -> nn.Module:
    from giants.inference.fp8 import is_fp8, quantize_model
    from giants.inference.mxfp4 import pack_experts

    if q == "mxfp4":
        return pack_experts(model)
    if is_fp8(q):
        return quantize_model(model, q)
    return model


# ---- checks ----------------------------------------------------------------------------------------
def _check(st: SafetensorsSet, cfg: ModelConfig, path: Path, layout) -> set[str]:
    """loading._check_dir for quantized checkpoints: FP8 weights need their scale (shape from the layout),
    MXFP4 parts their shapes; returns the HF names stored as FP8."""
    loading.check_plausible(cfg, {n: e.shape for n, e in st.entries.items()}, path)
    loading._check_rules_cover_model(cfg, path)
    used: set[str] = set()
    fp8_names: set[str] = set()
    for name, shape in loading._expected_hf(cfg).items():
        packed = loading._mxfp4_parts(name)
        if name not in st and packed and packed[0] in st:
            E, K, N = shape
            want = {packed[0]: (E, N, K // mxfp4.BLOCK, mxfp4.BLOCK // 2), packed[1]: (E, N, K // mxfp4.BLOCK)}
            for p, w in want.items():
                e = st.entries.get(p)
                if e is None or e.dtype != "U8" or e.shape != w:
                    raise CheckpointError(f"MXFP4 part must be U8 {w}" + (f", got {e.dtype} {e.shape}" if e else ""),
                                          file=st.file_of(packed[0]), tensor=p)
            used.update(packed)
            continue
        if name not in st:
            raise CheckpointError("missing tensor", file=path, tensor=name)
        e = st.entries[name]
        if e.shape != shape:
            raise CheckpointError(f"shape {e.shape} but the config implies {shape}", file=e.file, tensor=name)
        if e.dtype == "F8_E4M3":
            if layout is None:
                raise CheckpointError("an FP8 weight but config.json has no FP8 quantization_config", file=e.file,
                                      tensor=name)
            method, block, per_tensor = layout
            sname = ckfp8.scale_name(name, method)
            s = st.entries.get(sname)
            want = ckfp8.scale_shape(shape, block, per_tensor)
            if s is None:
                raise CheckpointError(f"FP8 weight without its scale {sname}", file=e.file, tensor=name)
            if s.dtype not in ("F32", "BF16", "F16") or (s.shape != want and not (per_tensor and s.shape == (1,))):
                raise CheckpointError(f"scale {s.dtype} {s.shape}, expected F32 {want}", file=s.file, tensor=sname)
            used.add(sname)
            fp8_names.add(name)
        elif e.dtype not in FLOATING:
            raise CheckpointError(f"dtype {e.dtype} where a floating-point weight is expected", file=e.file,
                                  tensor=name)
        used.add(name)
    extra = sorted(n for n in st.keys() if n not in used and not hf_map._ignorable(n, cfg))
    if extra:
        static = [n for n in extra if n.endswith(("activation_scale", "input_scale"))]
        why = "a static activation scale (only dynamic activation quantization is supported)" if static else \
            "unexpected tensor: the config does not use it"
        raise CheckpointError(why + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""),
                              file=st.file_of(extra[0]), tensor=extra[0])
    return fp8_names


# ---- filling ---------------------------------------------------------------------------------------
class _Filler:
    """Builds the model with the target modules and fills it rule by rule from an HF-named SafetensorsSet."""

    def __init__(self, st: SafetensorsSet, cfg: ModelConfig, path: Path, layout, stored_fp8: set[str],
                 q: str | None, dtype: torch.dtype, device) -> None:
        from giants.inference.fp8 import FP8Options, is_fp8, parse_fp8

        self.st, self.cfg, self.path, self.layout, self.stored_fp8 = st, cfg, path, layout, stored_fp8
        self.dtype, self.device = dtype, device
        self.opts = parse_fp8(q) if is_fp8(q) else None
        if self.opts is not None and layout is not None:  # an FP8 checkpoint's layout wins
            self.opts = FP8Options(layout[1], self.opts.head, self.opts.mxfp4_experts)
        self.rules = hf_map.family_rules(cfg)
        packed = any(n.endswith("_blocks") for n in st.keys())
        # an FP8 checkpoint's experts stored in float (e.g. gpt-oss' fused ones) stay float, as its linears do
        exp_hf = [n for r in self.rules if r.ours[0].endswith(("mlp.w_gate", "mlp.w_up", "mlp.w_down")) for n in r.hf]
        fp8_experts = self.opts is not None and (layout is None or any(n in stored_fp8 for n in exp_hf))
        self.experts = "mxfp4" if (q == "mxfp4" or (self.opts and (packed or self.opts.mxfp4_experts))) \
            else "fp8" if fp8_experts else "float"

    def _fp8_target(self, hf: str) -> bool:
        """An FP8 module for this linear? As stored in an FP8 checkpoint; else every linear when asked."""
        if self.opts is None:
            return False
        return hf in self.stored_fp8 if self.layout is not None else True

    def build(self) -> nn.Module:
        from giants.inference.fp8 import FP8Linear, FP8MoE
        from giants.inference.mxfp4 import MXFP4MoE

        model = loading.meta_model(self.cfg)
        mods = dict(model.named_modules())
        for rule in self.rules:
            owner, leaf = rule.ours[0].rsplit(".", 1)
            lin = mods.get(owner)
            if rule.identity and type(lin) is nn.Linear and leaf == "weight" and not owner.endswith("router"):
                hf = rule.hf[0]
                if self.opts is not None and ((hf in self.stored_fp8 or self.opts.head) if owner == "lm_head"
                                              else self._fp8_target(hf)):
                    parent, name = owner.rsplit(".", 1) if "." in owner else ("", owner)
                    new = FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, self.opts.block,
                                    device="meta")
                    (model.get_submodule(parent) if parent else model).__setattr__(name, new)
        for layer in model.layers:
            if self.cfg.is_moe and self.experts == "mxfp4":
                layer.mlp = MXFP4MoE(self.cfg, device="meta")
            elif self.cfg.is_moe and self.experts == "fp8":
                layer.mlp = FP8MoE(self.cfg, self.opts.block, device="meta")
        if self.opts is not None and self.opts.head and model.lm_head is None:
            model.lm_head = FP8Linear(self.cfg.d_model, self.cfg.vocab_size, False, self.opts.block, device="meta")
        return model.to(self.dtype).materialize(self.device)

    # -- reading --
    def float_tensor(self, name: str) -> torch.Tensor:
        """A stored tensor as a float (FP8 dequantized with its scale, MXFP4 parts dequantized)."""
        from giants.inference.fp8 import dequantize

        st = self.st
        if name not in st:
            packed = loading._mxfp4_parts(name)
            return mxfp4.dequantize(st[packed[0]], st[packed[1]], torch.float32)
        if name in self.stored_fp8:
            q, s = self.fp8_pair(name)
            return dequantize(q, s, self.layout[1], torch.float32)
        return st[name]

    def fp8_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        method, _, per_tensor = self.layout
        q = self.st[name]
        return q, ckfp8.to_module_scale(self.st[ckfp8.scale_name(name, method)], q.shape[0], per_tensor)

    def expert_slices(self, rule, e: int) -> list[torch.Tensor]:
        """Expert e of each of the rule's outputs, as floats, reading only that expert."""
        if len(rule.hf) == self.cfg.n_experts and len(rule.ours) == 1:
            return [self.float_tensor(rule.hf[e])]
        name = rule.hf[0]
        if name in self.st and name not in self.stored_fp8:
            part = self.st.read_rows(name, e, e + 1)
        else:
            blocks, scales = loading._mxfp4_parts(name)
            part = mxfp4.dequantize(self.st.read_rows(blocks, e, e + 1), self.st.read_rows(scales, e, e + 1))
        return [t[0] for t in rule.to_ours([part])]

    # -- writing --
    @torch.no_grad()
    def run(self) -> nn.Module:
        from giants.inference.fp8 import FP8Linear, FP8MoE
        from giants.inference.mxfp4 import MXFP4MoE

        model = self.build()
        mods = dict(model.named_modules())
        params = dict(model.named_parameters())
        st = self.st
        for rule in self.rules:
            owner, leaf = rule.ours[0].rsplit(".", 1)
            mod = mods.get(owner)
            if isinstance(mod, FP8Linear) and leaf == "weight":
                self._fill_linear(rule.hf[0], mod)
            elif isinstance(mod, FP8MoE) and leaf in FP8MoE.NAMES:
                self._fill_fp8_experts(rule, mod)
            elif isinstance(mod, MXFP4MoE) and leaf in ("w_gate", "w_up", "w_down", "b_gate", "b_up"):
                self._fill_mxfp4(rule, mod)
            elif rule.identity and rule.hf[0] in st and rule.hf[0] not in self.stored_fp8:
                st.read_into(rule.hf[0], params[rule.ours[0]])
            else:
                outs = rule.to_ours([self.float_tensor(n) for n in rule.hf])
                for ours, t in zip(rule.ours, outs):
                    if tuple(t.shape) != tuple(params[ours].shape):
                        raise CheckpointError(f"maps to shape {tuple(t.shape)}, model has {tuple(params[ours].shape)}",
                                              file=self.path, tensor=rule.hf[0])
                    params[ours].copy_(t)
        embed = params["embed.weight"]
        loading._check_tied_head(st, self.cfg, embed)
        if self.opts is not None and self.opts.head and self.cfg.tie_embeddings:
            model.lm_head.set_float(embed)
        return model.eval()

    def _fill_linear(self, hf: str, mod) -> None:
        if hf in self.stored_fp8:
            q, s = self.fp8_pair(hf)
            mod.qweight.copy_(q)
            mod.weight_scale.copy_(s)
        else:
            mod.set_float(self.st[hf].to(self.device))

    def _fill_fp8_experts(self, rule, mod) -> None:
        E = self.cfg.n_experts
        per_expert = len(rule.hf) == E and len(rule.ours) == 1
        for e in range(E):
            if per_expert and rule.hf[e] in self.stored_fp8:
                q, s = self.fp8_pair(rule.hf[e])
                leaf = rule.ours[0].rsplit(".", 1)[1]
                getattr(mod, leaf + "_q")[e].copy_(q)
                getattr(mod, leaf + "_scale")[e].copy_(s)
                continue
            for ours, t in zip(rule.ours, self.expert_slices(rule, e)):
                mod.set_expert(ours.rsplit(".", 1)[1], e, t.to(self.device))

    def _check_scales(self, scales: torch.Tensor, name: str) -> None:
        try:
            mxfp4.check_scales(scales)
        except mxfp4.ScaleError as e:
            raise CheckpointError(str(e), file=self.st.file_of(name), tensor=name) from None

    def _fill_mxfp4(self, rule, mod) -> None:
        """Packed experts: MXFP4 parts copied (gate|up rows de-interleaved), floats quantized per expert."""
        from giants.inference.mxfp4 import quantize_mxfp4

        cfg, st = self.cfg, self.st
        E, Fd = cfg.n_experts, cfg.ffn_dim
        leaves = [o.rsplit(".", 1)[1] for o in rule.ours]
        if leaves == ["b_gate", "b_up"]:
            g, u = rule.to_ours([self.float_tensor(rule.hf[0])])
            mod.b_gate_up.copy_(torch.cat([g, u], dim=1))
            return
        parts = loading._mxfp4_parts(rule.hf[0]) if len(rule.hf) == 1 else None
        if parts is not None and rule.hf[0] not in st and parts[0] in st:
            if leaves == ["w_down"]:  # (E, D, F/32, 16) is down_blocks (E, D, F/2) byte for byte
                st.read_into(parts[0], mod.down_blocks.view(st.entries[parts[0]].shape))
                st.read_into(parts[1], mod.down_scales)
                self._check_scales(mod.down_scales, parts[1])
                return
            for e in range(E):  # rows interleave gate and up: ours are [gate | up]
                b = st.read_rows(parts[0], e, e + 1)[0].flatten(-2)
                s = st.read_rows(parts[1], e, e + 1)[0]
                self._check_scales(s, parts[1])
                mod.gate_up_blocks[e].copy_(torch.cat([b[0::2], b[1::2]]))
                mod.gate_up_scales[e].copy_(torch.cat([s[0::2], s[1::2]]))
            return
        for e in range(E):
            for leaf, t in zip(leaves, self.expert_slices(rule, e)):
                blocks, scales = quantize_mxfp4(t.to(self.device).float())
                if leaf == "w_down":
                    mod.down_blocks[e].copy_(blocks)
                    mod.down_scales[e].copy_(scales)
                else:
                    r = slice(0, Fd) if leaf == "w_gate" else slice(Fd, 2 * Fd)
                    mod.gate_up_blocks[e, r].copy_(blocks)
                    mod.gate_up_scales[e, r].copy_(scales)


# ---- GGUF --------------------------------------------------------------------------------------------
def gguf_mxfp4_packed(t, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF MXFP4 tensor (..., K) -> (blocks (..., K/2), scales (..., K/32)) in giants' packed layout.
    GGUF blocks are 17 bytes: the E8M0 scale (the same exponent: kvalues are e2m1 doubled, the scale halved),
    then 16 bytes whose low nibbles are elements 0..15 and high nibbles 16..31; ours pair elements 2j, 2j+1."""
    from giants.checkpoint.gguf_io import check_mxfp4_scales

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    check_mxfp4_scales(t.data, t.tensor_type, t.name, path)
    raw = torch.from_numpy(t.data.reshape(-1, 17).copy())  # (blocks, 17)
    scales = raw[:, 0]
    qs = raw[:, 1:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=1)  # (blocks, 32) element order
    blocks = codes[:, 0::2] | (codes[:, 1::2] << 4)
    lead, K = shape[:-1], shape[-1]
    return blocks.reshape(*lead, K // 2).contiguous(), scales.reshape(*lead, K // 32).contiguous()


def _load_gguf(path: Path, dtype: torch.dtype | None, device, quantization: str | None) -> nn.Module:
    from giants.checkpoint.gguf_io import GGUFFile
    from giants.inference.fp8 import FP8Linear, FP8MoE, check_experts, is_fp8, meta_fp8, parse_fp8
    from giants.inference.mxfp4 import MXFP4MoE, quantize_mxfp4

    g = GGUFFile(path)
    cfg = g.config
    exps = [r for r in g.rules if r.ours.endswith(("mlp.w_gate", "mlp.w_up", "mlp.w_down"))]
    has_mx = any(len(r.gguf) == 1 and g.qtype(r.gguf[0]) == "MXFP4" for r in exps)
    q = quantization
    if q == "auto":
        q = "mxfp4" if has_mx else None
    if q is None:
        return loading._load_gguf(path, dtype, device)
    check_experts(q, cfg)
    params = dict(loading.meta_model(cfg).named_parameters())
    g.check({n: tuple(t.shape) for n, t in params.items()})
    unfilled = sorted(set(params) - {r.ours for r in g.rules})
    if unfilled:
        raise CheckpointError(f"no tensor of this {g.arch} file fills the model's {unfilled[0]!r}", file=path)
    opts = parse_fp8(q) if is_fp8(q) else None
    packed = q == "mxfp4" or (opts is not None and (has_mx or opts.mxfp4_experts))
    model = meta_fp8(cfg, opts, experts=not packed) if opts is not None else loading.meta_model(cfg)
    if packed:
        for layer in model.layers:
            layer.mlp = MXFP4MoE(cfg, device="meta")
    model = model.to(dtype or torch.float32).materialize(device)
    mods, params = dict(model.named_modules()), dict(model.named_parameters())
    F_ = cfg.ffn_dim
    with torch.no_grad():
        for r in g.rules:
            owner, leaf = r.ours.rsplit(".", 1)
            mod = mods.get(owner)
            if isinstance(mod, MXFP4MoE) and leaf in ("w_gate", "w_up", "w_down"):
                if len(r.gguf) == 1 and g.qtype(r.gguf[0]) == "MXFP4" and r.fix is None:
                    blocks, scales = gguf_mxfp4_packed(g.tensors[r.gguf[0]], path)
                else:
                    t = _gguf_float(g, r)
                    blocks, scales = quantize_mxfp4(t.to(mod.gate_up_blocks.device))
                if leaf == "w_down":
                    mod.down_blocks.copy_(blocks)
                    mod.down_scales.copy_(scales)
                else:
                    rows = slice(0, F_) if leaf == "w_gate" else slice(F_, 2 * F_)
                    mod.gate_up_blocks[:, rows].copy_(blocks)
                    mod.gate_up_scales[:, rows].copy_(scales)
                continue
            if isinstance(mod, MXFP4MoE) and leaf in ("b_gate", "b_up"):
                rows = slice(0, F_) if leaf == "b_gate" else slice(F_, 2 * F_)
                mod.b_gate_up[:, rows].copy_(_gguf_float(g, r))
                continue
            t = _gguf_float(g, r)
            if isinstance(mod, FP8Linear) and leaf == "weight":
                mod.set_float(t)
            elif isinstance(mod, FP8MoE) and leaf in FP8MoE.NAMES:
                for e in range(t.shape[0]):
                    mod.set_expert(leaf, e, t[e].to(device))
            else:
                params[r.ours].copy_(t)
        if opts is not None and opts.head and cfg.tie_embeddings:
            model.lm_head.set_float(params["embed.weight"])
    return model.eval()


def _gguf_float(g, r) -> torch.Tensor:
    ts = [g.dequant(n) for n in r.gguf]
    t = ts[0] if len(ts) == 1 else torch.stack(ts)
    return r.fix(t) if r.fix is not None else t
