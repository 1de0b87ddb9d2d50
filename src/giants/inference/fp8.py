"""FP8 (E4M3) weights for every linear layer and every expert, with per-output-channel or block scales.

A weight W (N, K) is stored as q (N, K) torch.float8_e4m3fn and float32 scales over blocks of bn x bk
values: W ~= q * scale[n // bn, k // bk], scale (ceil(N/bn), ceil(K/bk)). Two layouts, as hub checkpoints
store them:
  per output channel (fbgemm_fp8, giants' default): block (1, K), scale (N, 1) = amax(|W[n]|) / 448;
  128 x 128 blocks (quant_method "fp8", weight_block_size [128, 128]; DeepSeek / Qwen FP8): scale_inv
  (ceil(N/128), ceil(K/128)), partial edge blocks allowed.
A fused Q|K|V or gate|up weight whose parts do not end on a block boundary gets per-row (1, bk) scales.

Where the matmul runs (FP8Weight.linear): on the CPU and on GPUs without FP8 support (compute capability
below 8.9) the weight is dequantized per layer at matmul time (F.linear on q * scale); on CUDA a Triton GEMV
that reads one byte a weight for up to GEMV_ROWS rows (decode), torch._scaled_mm with per-token activation
scales for larger row-wise batches on Hopper (prefill; activations quantized to FP8 per token), and a Triton
weight-only GEMM otherwise (giants.inference.kernels.fp8). Embeddings, norms and routers stay as they are;
the output head only with `+head`.

`FP8Weight` is what the runners hold: F.linear(x, w, b) on it runs w.linear (it implements
__torch_function__), so the model's own modules, Transformer.logits and the runners' fused weights all work.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from giants.config import ModelConfig
from giants.model.mlp import MoE, gated_activation

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = (128, 128)
# Measured on an H100 at the Llama-3-70B shapes (benchmarks/investigations/fp8_small_batch.py, 2026-12-06): the
# GEMV's time grows with every row (2 rows: 2x, 8 rows: 7-8x one row's), while the Triton GEMM stays flat from 2 to
# 16 rows (qkv 42 us vs the GEMV's 59-221 us) and _scaled_mm wins from 64 rows on (gate_up 198 vs 294 us).
GEMV_ROWS = int(os.environ.get("GIANTS_FP8_GEMV_ROWS", "1"))  # up to this many rows: the Triton GEMV
SCALED_MM_ROWS = int(os.environ.get("GIANTS_FP8_SCALED_MM_ROWS", "48"))  # above: _scaled_mm (row-wise, bf16)
DEQUANT_ROWS = 512  # block-scaled above this many rows: dequantize + cuBLAS (the dequant is then cheap)
_QUANT_CHUNK = 1 << 26  # elements quantized at a time (bounds the float32 temporaries)


# ---- options ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FP8Options:
    """quantization="fp8" | "fp8-block" with "+head": the scale layout for weights quantized on load and
    whether the output head is FP8 too. Weights an FP8 checkpoint stores keep their stored layout."""

    block: tuple[int, int] | None = None  # None: per output channel; (128, 128): block scales
    head: bool = False
    # "+mxfp4": the MoE experts packed MXFP4 (4.25 bits, giants.inference.mxfp4) instead of FP8, the linears FP8:
    # Mixtral-8x22B in ~78 GB, one 80 GB card
    mxfp4_experts: bool = False


def is_fp8(quantization: str | None) -> bool:
    return isinstance(quantization, str) and quantization.split("+")[0] in ("fp8", "fp8-block", "fp8-channel")


def parse_fp8(quantization: str) -> FP8Options:
    base, *extra = quantization.split("+")
    if base not in ("fp8", "fp8-block", "fp8-channel") or any(e not in ("head", "mxfp4") for e in extra) \
            or len(set(extra)) != len(extra):
        raise ValueError(f"quantization: FP8 is 'fp8' (per-channel scales), 'fp8-block' (128x128 block scales), "
                         f"either with '+head' to quantize the output head and '+mxfp4' to pack the MoE experts "
                         f"MXFP4 instead (got {quantization!r})")
    return FP8Options(BLOCK if base == "fp8-block" else None, "head" in extra, "mxfp4" in extra)


def check_experts(quantization: str | FP8Options | None, cfg: ModelConfig) -> None:
    """'mxfp4' and FP8's '+mxfp4' pack MoE experts: on a model without experts that is an error, not a no-op."""
    if cfg.is_moe or quantization is None:
        return
    if quantization == "mxfp4":
        what = "'mxfp4' quantizes"
    elif isinstance(quantization, FP8Options) and quantization.mxfp4_experts or \
            is_fp8(quantization) and parse_fp8(quantization).mxfp4_experts:
        what = "'+mxfp4' packs"
    else:
        return
    raise ValueError(f"quantization: {what} mixture-of-experts layers, and this model has none "
                     f"(n_experts={cfg.n_experts}) (got {quantization!r})")


# ---- quantize / dequantize ---------------------------------------------------------------------
def _grid(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, int]:
    N, K = shape[-2:]
    return (1, K) if block is None else (int(block[0]), int(block[1]))


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    bn, bk = _grid(shape, block)
    return (*shape[:-2], -(-shape[-2] // bn), -(-shape[-1] // max(bk, 1)))


def _quantize_rows(x: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n, K) float32 with n a multiple of bn or the last rows -> (q, scale)."""
    n, K = x.shape[-2:]
    nb, kb = -(-n // bn), -(-K // bk)
    pad = F.pad(x, (0, kb * bk - K, 0, nb * bn - n))
    t = pad.unflatten(-1, (kb, bk)).unflatten(-3, (nb, bn))  # (..., nb, bn, kb, bk)
    amax = t.abs().amax(dim=(-3, -1))  # (..., nb, kb)
    if bn == 1 and bk >= K:  # per channel: fbgemm's / compressed-tensors' formula (scale = amax / 448, q = w / scale)
        scale = torch.where(amax > 0, amax, torch.ones_like(amax)) / FP8_MAX
        q = (t / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    else:  # blocks: transformers' Fp8Quantize (q = w * (448 / amax), scale_inv = 1 / (448 / amax))
        fwd = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)),
                          torch.ones_like(amax))
        scale = 1.0 / fwd
        q = (t * fwd[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.to(FP8_DTYPE).flatten(-4, -3).flatten(-2)[..., :n, :K]
    return q, scale.float()


def quantize(w: torch.Tensor, block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., N, K) -> (q (..., N, K) float8_e4m3fn, scale (..., ceil(N/bn), ceil(K/bk)) float32), W ~= q * scale.
    block None: per output channel; (bn, bk): block scales (edge blocks may be partial). Rows are done in
    chunks so the float32 temporaries stay small."""
    N, K = w.shape[-2:]
    bn, bk = _grid(w.shape, block)
    lead = math.prod(w.shape[:-2])
    rows = max(bn, (_QUANT_CHUNK // max(1, K * max(lead, 1))) // bn * bn)
    if rows >= N:
        q, s = _quantize_rows(w.detach().float(), bn, bk)
        return q.contiguous(), s.contiguous()
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(scale_shape(tuple(w.shape), block), dtype=torch.float32, device=w.device)
    for r in range(0, N, rows):
        qq, ss = _quantize_rows(w[..., r:r + rows, :].detach().float(), bn, bk)
        q[..., r:r + rows, :] = qq
        s[..., r // bn:r // bn + ss.shape[-2], :] = ss
    return q, s


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q, scale) -> W (..., N, K) in dtype: q * scale per block, computed in float32 and rounded once."""
    N, K = q.shape[-2:]
    bn, bk = _grid(q.shape, block)
    s = scale.float()
    if bn > 1:
        s = s.repeat_interleave(bn, dim=-2)[..., :N, :]
    w = q.float()
    if s.shape[-1] == 1:
        w.mul_(s)
    else:
        full, rem = divmod(K, bk)
        if full:
            w[..., :full * bk].unflatten(-1, (full, bk)).mul_(s[..., :full, None])
        if rem:
            w[..., full * bk:].mul_(s[..., full:full + 1])
    return w.to(dtype)


def expand_rows(scale: torch.Tensor, n: int, block: tuple[int, int]) -> torch.Tensor:
    """Block scales (nb, kb) -> per-row scales (n, kb), the (1, bk) layout of a fused weight."""
    return scale.repeat_interleave(block[0], dim=-2)[..., :n, :].contiguous()


# ---- the weight the runners hold ---------------------------------------------------------------
def _triton_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm_ok(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and \
        torch.cuda.get_device_capability(device) >= (9, 0) and hasattr(torch, "_scaled_mm")


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (M, K) -> (FP8 (M, K), per-row float32 scales (M, 1)) for torch._scaled_mm."""
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


class FP8Weight:
    """q (N, K) float8_e4m3fn + scale (ceil(N/bn), ceil(K/bk)) float32 for block (bn, bk).

    Not a tensor: F.linear(x, w, b) dispatches to `linear` through __torch_function__."""

    __slots__ = ("q", "scale", "block")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> None:
        self.q, self.scale = q, scale
        self.block = _grid(tuple(q.shape), block)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def rowwise(self) -> bool:
        return self.block[0] == 1 and self.scale.shape[-1] == 1

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def data_ptr(self) -> int:
        return self.q.data_ptr()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.block, dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
        """x (..., K) -> (..., N). path: "auto", or for tests "dequant" | "gemv" | "gemm" | "scaled_mm"."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        M = x2.shape[0]
        if path == "auto":
            path = "dequant"
            if _triton_ok(x.device):
                if M <= GEMV_ROWS:
                    path = "gemv"
                elif self.rowwise and M > SCALED_MM_ROWS and x.dtype == torch.bfloat16 and _scaled_mm_ok(x.device) \
                        and self.q.shape[0] % 16 == 0 and self.q.shape[1] % 16 == 0:
                    path = "scaled_mm"
                elif M <= DEQUANT_ROWS or self.rowwise:
                    path = "gemm"
        if path == "dequant":
            y = F.linear(x2, self.dequantize(x.dtype), bias)
        elif path == "scaled_mm":
            xq, xs = quantize_rows_fp8(x2)
            y = torch._scaled_mm(xq, self.q.t(), scale_a=xs, scale_b=self.scale.reshape(1, -1), out_dtype=x.dtype)
            if bias is not None:
                y = y + bias
        else:
            from giants.inference.kernels import fp8 as k8

            x2 = x2.contiguous()
            y = k8.fp8_gemv(x2, self, bias) if path == "gemv" else k8.fp8_gemm(x2, self, bias)
        return y.view(*shape[:-1], -1)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, torch._C._nn.linear):
            x, w, *rest = args
            b = rest[0] if rest else kwargs.get("bias")
            if isinstance(w, FP8Weight) and not isinstance(x, FP8Weight):
                return w.linear(x, b)
        raise TypeError(f"FP8Weight: {getattr(func, '__name__', func)} is not supported on an FP8 weight "
                        "(F.linear is; dequantize() gives a float tensor)")

    @staticmethod
    def cat(parts: list[FP8Weight]) -> FP8Weight:
        """Rows of several weights (same K) as one: the scales concatenate when every part but the last ends on
        a block boundary, else per-row (1, bk) scales."""
        block = parts[0].block
        if any(p.block != block or p.q.shape[1] != parts[0].q.shape[1] for p in parts):
            raise ValueError("FP8Weight.cat: parts with different block layouts or widths")
        q = torch.cat([p.q for p in parts])
        if all(p.q.shape[0] % block[0] == 0 for p in parts[:-1]):
            return FP8Weight(q, torch.cat([p.scale for p in parts]), block)
        rows = [expand_rows(p.scale, p.q.shape[0], block) for p in parts]
        return FP8Weight(q, torch.cat(rows), (1, block[1]))


class _KeepFP8(nn.Module):
    """Module whose FP8 and scale buffers keep their dtypes through .to(dtype) / .half() (only the device
    moves): casting q would double it and casting a scale to bf16 would lose precision."""

    _kept: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        old = {n: self._buffers[n] for n in self._kept if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, t in old.items():
            new = self._buffers[n]
            if new.dtype != t.dtype:
                self._buffers[n] = t.to(new.device) if t.device != new.device else t
        return self


class FP8Linear(_KeepFP8):
    """A linear layer with an FP8 weight (buffers qweight, weight_scale) and a bias in the model's dtype.
    `.weight` is an FP8Weight, so code that runs F.linear(x, mod.weight, mod.bias) works unchanged."""

    _kept = ("qweight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 block: tuple[int, int] | None = None, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = _grid((out_features, in_features), block)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.empty(scale_shape((out_features, in_features), block),
                                                         dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @property
    def weight(self) -> FP8Weight:
        return FP8Weight(self.qweight, self.weight_scale, self.block)

    @property
    def per_channel(self) -> bool:
        return self.block == (1, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)

    @torch.no_grad()
    def set_float(self, w: torch.Tensor) -> None:
        """Quantize a float weight (N, K) into this layer's layout."""
        q, s = quantize(w.to(self.qweight.device), None if self.per_channel else self.block)
        self.qweight.copy_(q)
        self.weight_scale.copy_(s)

    @classmethod
    def from_float(cls, w: torch.Tensor, b: torch.Tensor | None, block: tuple[int, int] | None) -> FP8Linear:
        m = cls(w.shape[1], w.shape[0], b is not None, block, device=w.device, dtype=w.dtype)
        m.set_float(w)
        if b is not None:
            m.bias.data.copy_(b.detach())
        return m

    def extra_repr(self) -> str:
        layout = "per-channel" if self.per_channel else f"block {self.block[0]}x{self.block[1]}"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, {layout}"


class FP8MoE(_KeepFP8):
    """A MoE layer whose experts are FP8: w_{gate,up} (E, F, D), w_down (E, D, F) as *_q float8_e4m3fn plus
    *_scale (E, rows, cols) float32; router and biases unchanged. On CUDA a few (token, expert) pairs run
    through the expert-indexed FP8 GEMV (one byte a weight); otherwise each used expert goes through
    FP8Weight.linear (dequantized per expert on the CPU, Triton / _scaled_mm on CUDA)."""

    _kept = ("w_gate_q", "w_gate_scale", "w_up_q", "w_up_scale", "w_down_q", "w_down_scale")
    NAMES = ("w_gate", "w_up", "w_down")

    def __init__(self, cfg: ModelConfig, block: tuple[int, int] | None = None, device=None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, Fd = cfg.n_experts, cfg.d_model, cfg.ffn_dim
        self.router = nn.Linear(D, E, bias=cfg.router_bias, device=device, dtype=dtype)
        self.blocks: dict[str, tuple[int, int]] = {}
        for name, (n, k) in zip(self.NAMES, ((Fd, D), (Fd, D), (D, Fd))):
            self.blocks[name] = _grid((n, k), block)
            self.register_buffer(name + "_q", torch.empty(E, n, k, dtype=FP8_DTYPE, device=device))
            self.register_buffer(name + "_scale", torch.empty(scale_shape((E, n, k), block), dtype=torch.float32,
                                                              device=device))
        if cfg.mlp_bias:
            self.b_gate = nn.Parameter(torch.zeros(E, Fd, device=device, dtype=dtype), requires_grad=False)
            self.b_up = nn.Parameter(torch.zeros(E, Fd, device=device, dtype=dtype), requires_grad=False)
            self.b_down = nn.Parameter(torch.zeros(E, D, device=device, dtype=dtype), requires_grad=False)
        else:
            self.b_gate = self.b_up = self.b_down = None

    route = MoE.route

    def per_channel(self, name: str) -> bool:
        return self.blocks[name] == (1, getattr(self, name + "_q").shape[-1])

    def weight(self, name: str, e: int | None = None) -> FP8Weight:
        q, s = getattr(self, name + "_q"), getattr(self, name + "_scale")
        return FP8Weight(q if e is None else q[e], s if e is None else s[e], self.blocks[name])

    @torch.no_grad()
    def set_expert(self, name: str, e: int, w: torch.Tensor) -> None:
        q, s = quantize(w.to(self.w_gate_q.device), None if self.per_channel(name) else self.blocks[name])
        getattr(self, name + "_q")[e].copy_(q)
        getattr(self, name + "_scale")[e].copy_(s)

    @classmethod
    def from_moe(cls, moe: MoE, block: tuple[int, int] | None) -> FP8MoE:
        m = cls(moe.cfg, block, device=moe.w_gate.device, dtype=moe.router.weight.dtype)
        with torch.no_grad():
            m.router.load_state_dict(moe.router.state_dict())
            for name in cls.NAMES:
                w = getattr(moe, name)
                for e in range(w.shape[0]):
                    m.set_expert(name, e, w[e])
            for b in ("b_gate", "b_up", "b_down"):
                if getattr(moe, b) is not None:
                    getattr(m, b).copy_(getattr(moe, b))
        return m

    def _bias(self, name: str, e):
        b = getattr(self, name)
        return None if b is None else b[e]

    def expert_rows(self, x: torch.Tensor, x_row: torch.Tensor, expert: torch.Tensor,
                    pair: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair's expert output, uncombined: (P, D), through the expert-indexed FP8 GEMV (CUDA;
        capturable). x: (N, D); x_row, expert: (P,) the pair's row of x and its expert; pair: arange(P). Four
        kernels: the gate and up GEMVs into the halves of one [gate | up] buffer, the GLU kernel, the down GEMV."""
        from giants.inference import kernels as tk
        from giants.inference.kernels import fp8 as k8

        P, Fd = expert.shape[0], self.cfg.ffn_dim
        x = x.contiguous()
        gu = torch.empty(P, 2 * Fd, dtype=x.dtype, device=x.device)
        k8.fp8_expert_gemv(x, x_row, expert, self.weight("w_gate"), self.b_gate, out=gu[:, :Fd])
        k8.fp8_expert_gemv(x, x_row, expert, self.weight("w_up"), self.b_up, out=gu[:, Fd:])
        a = tk.glu(gu, self.cfg.activation, self.cfg.swiglu_alpha, self.cfg.swiglu_limit)
        return k8.fp8_expert_gemv(a, pair, expert, self.weight("w_down"), self.b_down)

    def _forward_packed(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Every (token, expert) pair through the expert-indexed FP8 GEMV, combined. x: (N, D)."""
        N, K = idx.shape
        pairs = torch.arange(N * K, device=x.device)
        y = self.expert_rows(x, pairs // K, idx.reshape(-1).contiguous(), pairs)
        return (y.view(N, K, -1).float() * weights[..., None].float()).sum(1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, idx = self.route(x)
        if _triton_ok(x.device) and idx.numel() <= 4096:
            return self._forward_packed(x, weights, idx).view(shape), logits
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in torch.unique(idx).tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            xe = x[tok]
            g = self.weight("w_gate", e).linear(xe, self._bias("b_gate", e))
            u = self.weight("w_up", e).linear(xe, self._bias("b_up", e))
            y = self.weight("w_down", e).linear(gated_activation(g, u, self.cfg), self._bias("b_down", e))
            out.index_add_(0, tok, (y * weights[tok, slot, None]).float())
        return out.to(x.dtype).view(shape), logits


# ---- whole models --------------------------------------------------------------------------------
LINEARS = (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def quantize_model(model: nn.Module, options: FP8Options | str = FP8Options()) -> nn.Module:
    """Every linear of every block and every dense MoE layer's experts to FP8 (in place; the experts packed MXFP4
    with options.mxfp4_experts); the head too with options.head (a tied head becomes an FP8 copy of the
    embedding). Embeddings, norms, routers unchanged."""
    opts = parse_fp8(options) if isinstance(options, str) else options
    check_experts(options, model.config)
    for layer in model.layers:
        for owner_name, names in LINEARS:
            owner = getattr(layer, owner_name)
            for name in names:
                mod = getattr(owner, name, None)
                if type(mod) is nn.Linear:
                    setattr(owner, name, FP8Linear.from_float(mod.weight.detach(), mod.bias, opts.block))
        if isinstance(layer.mlp, MoE):
            if opts.mxfp4_experts:
                from giants.inference.mxfp4 import MXFP4MoE

                layer.mlp = MXFP4MoE.from_moe(layer.mlp)
            else:
                layer.mlp = FP8MoE.from_moe(layer.mlp, opts.block)
    if opts.head:
        quantize_head(model, opts.block)
    return model


def quantize_head(model: nn.Module, block: tuple[int, int] | None) -> None:
    w = model.output_weight
    if isinstance(w, torch.Tensor):
        model.lm_head = FP8Linear.from_float(w.detach(), None, block)


def fuse(mods: list[nn.Module]) -> tuple[FP8Weight, torch.Tensor | None] | None:
    """The runners' fused Q|K|V or gate|up weight of FP8 linears sharing an input (None unless every part is an
    FP8Linear with the same layout). The rows are copied into one buffer and the modules become views of it."""
    if not all(type(m) is FP8Linear for m in mods) or len({m.block for m in mods}) != 1 \
            or len({m.in_features for m in mods}) != 1 or len({m.bias is None for m in mods}) != 1:
        return None
    w = FP8Weight.cat([m.weight for m in mods])
    b = torch.cat([m.bias.data for m in mods]) if mods[0].bias is not None else None
    start = 0
    for m in mods:
        n = m.out_features
        m.qweight = w.q[start:start + n]
        if w.block == m.block and n % m.block[0] == 0:
            r = start // m.block[0]
            m.weight_scale = w.scale[r:r + m.weight_scale.shape[0]]
        if b is not None:
            m.bias.data = b[start:start + n]
        start += n
    return w, b


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (FP8Linear, FP8MoE)) for m in model.modules())


def fp8_bytes(model: nn.Module) -> int:
    """Bytes of the FP8 weights and their scales."""
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, _KeepFP8)
               for n, t in m._buffers.items() if n in m._kept and t is not None)


def meta_fp8(cfg: ModelConfig, opts: FP8Options, experts: bool = True) -> nn.Module:
    """The model on the meta device with FP8 modules in place of every linear and, with `experts`, FP8 experts, or
    packed MXFP4 ones with opts.mxfp4_experts."""
    from giants.checkpoint.loading import meta_model
    from giants.inference.mxfp4 import MXFP4MoE

    model = meta_model(cfg)
    for layer in model.layers:
        for owner_name, names in LINEARS:
            owner = getattr(layer, owner_name)
            for name in names:
                mod = getattr(owner, name, None)
                if type(mod) is nn.Linear:
                    setattr(owner, name, FP8Linear(mod.in_features, mod.out_features, mod.bias is not None,
                                                   opts.block, device="meta"))
        if experts and isinstance(layer.mlp, MoE):
            layer.mlp = MXFP4MoE(cfg, device="meta") if opts.mxfp4_experts else FP8MoE(cfg, opts.block, device="meta")
    if opts.head:
        model.lm_head = FP8Linear(cfg.d_model, cfg.vocab_size, False, opts.block, device="meta")
    return model


@torch.no_grad()
def build_fp8(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
              options: FP8Options | str = FP8Options()) -> nn.Module:
    """A random model (a preset) whose linears and experts are FP8 from the start, never the whole float model:
    each weight is drawn as Transformer.init_weights draws it for the float preset (same generator, order, dtype
    and device), then quantized, so the result is quantize_model(LLM's float preset of the same seed) while
    Llama-3-70B (~70 GB in FP8) builds on one 80 GB GPU."""
    from giants.checkpoint.loading import meta_model
    from giants.inference.mxfp4 import MXFP4MoE
    from giants.model.transformer import init_parameter

    opts = parse_fp8(options) if isinstance(options, str) else options
    check_experts(options, cfg)
    model = meta_fp8(cfg, opts).to(dtype).materialize(device, dtype)
    mods, params = dict(model.named_modules()), dict(model.named_parameters())
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in meta_model(cfg).named_parameters():  # Transformer.init_weights, on the float model's names
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        mod = mods.get(owner)
        if isinstance(mod, MXFP4MoE):  # packed experts: random blocks and scales, zero biases, below
            continue
        if isinstance(mod, FP8Linear) and leaf == "weight" or isinstance(mod, FP8MoE) and leaf in FP8MoE.NAMES:
            t = torch.empty(p.shape, dtype=dtype, device=device)  # drawn as the float weight, then quantized
            init_parameter(name, t, cfg, gen)
            if isinstance(mod, FP8Linear):
                mod.set_float(t)
            else:
                for e in range(t.shape[0]):
                    mod.set_expert(leaf, e, t[e])
        else:  # kept as they are: norms, biases, sinks, embeddings, the router, a float head
            init_parameter(name, params[name], cfg, gen)
    for layer in model.layers:
        if isinstance(layer.mlp, MXFP4MoE):
            layer.mlp.randomize(gen)
            for b in (layer.mlp.b_gate_up, layer.mlp.b_down):  # materialize leaves them uninitialised
                if b is not None:
                    b.data.zero_()  # as init_weights starts every bias
    if opts.head and cfg.tie_embeddings:
        model.lm_head.set_float(model.embed.weight)
    return model.eval()
