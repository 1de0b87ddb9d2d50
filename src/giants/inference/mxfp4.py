"""MXFP4 mixture-of-experts weights kept packed (OCP microscaling: 32 FP4 E2M1 values share one E8M0 scale).

`MXFP4MoE` replaces a layer's `MoE` module: the router, biases and activation are unchanged, the expert
matrices stay as uint8 blocks (two values a byte, low nibble first, as gpt-oss checkpoints store them)
plus one uint8 exponent per 32 values: about 4.25 bits a weight, so gpt-oss-120b's experts take ~61 GB
instead of ~230 GB in bf16. On CUDA the decode step multiplies through a Triton kernel that dequantizes
inside the kernel (giants.inference.kernels.mxfp4.mxfp4_gemv); elsewhere each used expert is
dequantized on the fly.

Layout: gate_up_blocks (E, 2F, D/2) with rows [gate | up], gate_up_scales (E, 2F, D/32);
down_blocks (E, D, F/2), down_scales (E, D, F/32).
"""

from __future__ import annotations

import torch
from torch import nn

from giants.config import ModelConfig
from giants.model.mlp import MoE, gated_activation

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks: (..., K/2) uint8, scales: (..., K/32) uint8 -> (..., K) values lut[nibble] * 2**(scale - 127)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.int32)
    vals = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).flatten(-2)  # (..., K) low nibble first
    exp = scales.to(torch.float32) - 127.0
    vals = vals.unflatten(-1, (-1, 32)) * torch.exp2(exp)[..., None]
    return vals.flatten(-2).to(dtype)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (..., K) with K % 32 == 0 -> (blocks (..., K/2) uint8, scales (..., K/32) uint8); round to nearest."""
    if w.shape[-1] % 32:
        raise ValueError(f"quantize_mxfp4: last dim {w.shape[-1]} is not a multiple of 32")
    x = w.float().unflatten(-1, (-1, 32))
    amax = x.abs().amax(-1).clamp(min=2.0**-126)
    exp = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)  # largest E2M1 magnitude is 6 = 1.5 * 2**2
    y = x / torch.exp2(exp)[..., None]
    mags = torch.tensor(FP4_VALUES[:8], device=w.device)
    idx = (y.abs()[..., None] - mags).abs().argmin(-1)  # nearest magnitude (clamps at 6)
    nib = (idx | (((y < 0) & (idx > 0)).to(idx.dtype) << 3)).flatten(-2)  # no negative zero
    packed = (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8)


class MXFP4MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, F = cfg.n_experts, cfg.d_model, cfg.ffn_dim
        if D % 32 or F % 32:
            raise ValueError(f"MXFP4 experts need d_model and ffn_dim divisible by 32 (got {D}, {F})")
        self.router = nn.Linear(D, E, bias=cfg.router_bias, device=device)
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("gate_up_blocks", torch.zeros(E, 2 * F, D // 2, **u8))
        self.register_buffer("gate_up_scales", torch.zeros(E, 2 * F, D // 32, **u8))
        self.register_buffer("down_blocks", torch.zeros(E, D, F // 2, **u8))
        self.register_buffer("down_scales", torch.zeros(E, D, F // 32, **u8))
        if cfg.mlp_bias:
            self.b_gate_up = nn.Parameter(torch.zeros(E, 2 * F, device=device))
            self.b_down = nn.Parameter(torch.zeros(E, D, device=device))
        else:
            self.b_gate_up = self.b_down = None

    route = MoE.route

    @classmethod
    def from_moe(cls, moe: MoE) -> MXFP4MoE:
        """Quantize a dense MoE's experts (round to nearest)."""
        m = cls(moe.cfg, device=moe.w_gate.device)
        with torch.no_grad():
            m.router.load_state_dict(moe.router.state_dict())
            m.gate_up_blocks, m.gate_up_scales = quantize_mxfp4(torch.cat([moe.w_gate, moe.w_up], dim=1))
            m.down_blocks, m.down_scales = quantize_mxfp4(moe.w_down)
            if moe.b_gate is not None:
                m.b_gate_up.copy_(torch.cat([moe.b_gate, moe.b_up], dim=1))
                m.b_down.copy_(moe.b_down)
        return m.to(moe.w_gate.dtype)

    @torch.no_grad()
    def randomize(self, generator: torch.Generator | None = None, scale_exp: tuple[int, int] = (117, 121)) -> None:
        """Random packed weights (uniform nibbles, scales 2**-10..2**-6): benchmark stand-ins."""
        for blocks, scales in ((self.gate_up_blocks, self.gate_up_scales), (self.down_blocks, self.down_scales)):
            blocks.copy_(torch.randint(0, 256, blocks.shape, generator=generator, device=blocks.device,
                                       dtype=torch.int32).to(torch.uint8))
            scales.copy_(torch.randint(scale_exp[0], scale_exp[1], scales.shape, generator=generator,
                                       device=scales.device, dtype=torch.int32).to(torch.uint8))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (gate_up (2F, D), down (D, F)) of expert e."""
        return (dequantize_mxfp4(self.gate_up_blocks[e], self.gate_up_scales[e], dtype),
                dequantize_mxfp4(self.down_blocks[e], self.down_scales[e], dtype))

    def expert_rows(self, x: torch.Tensor, x_row: torch.Tensor, expert: torch.Tensor,
                    pair: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair's expert output, uncombined, straight from the packed weights: (P, D).
        x: (N, D); x_row, expert: (P,) the pair's row of x and its expert; pair: arange(P) (a tensor, so that a
        CUDA-graph caller passes a static one). Two kernels: the gate|up GEMV with the gated activation in its
        epilogue, then the down GEMV; where the default decode multiplies in f16 lanes (16-bit activations on
        sm_89+), x is put in lanes first (a third, small kernel) and the GLU GEMV hands its output on in lanes."""
        from giants.inference import kernels as tk
        from giants.inference.kernels import mxfp4 as kmx

        cfg = self.cfg
        a = tk.mxfp4_gemv(x, x_row, expert, self.gate_up_blocks, self.gate_up_scales, self.b_gate_up,
                          glu=cfg.activation, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit,
                          lanes_out=kmx.uses_lanes(x))
        return tk.mxfp4_gemv(a, pair, expert, self.down_blocks, self.down_scales, self.b_down)

    def _forward_packed(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One Triton GEMV per (token, expert) pair straight from the packed weights, combined. x: (N, D)."""
        N, K = idx.shape
        pairs = torch.arange(N * K, device=x.device)
        y = self.expert_rows(x, pairs // K, idx.reshape(-1).contiguous(), pairs)
        return (y.view(N, K, -1).float() * weights[..., None].float()).sum(1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D). On CUDA the packed-weight Triton kernel for up to a few thousand (token, expert)
        pairs (a prefill chunk); otherwise each used expert is dequantized once."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, idx = self.route(x)
        if x.is_cuda and idx.numel() <= 4096:
            return self._forward_packed(x, weights, idx).view(shape), logits
        F = self.cfg.ffn_dim
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in torch.unique(idx).tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            w_gu, w_down = self.expert_weights(e, x.dtype)
            gu = x[tok] @ w_gu.t()
            if self.b_gate_up is not None:
                gu = gu + self.b_gate_up[e]
            h = gated_activation(gu[:, :F], gu[:, F:], self.cfg)
            y = h @ w_down.t()
            if self.b_down is not None:
                y = y + self.b_down[e]
            out.index_add_(0, tok, (y * weights[tok, slot, None]).float())
        return out.to(x.dtype).view(shape), logits


def pack_experts(model: nn.Module) -> nn.Module:
    """Replace every dense MoE layer of a built model by its MXFP4 quantization (in place)."""
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp = MXFP4MoE.from_moe(layer.mlp)
    return model


def build_mxfp4(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random model whose experts are MXFP4 from the start: never materializes dense experts, so
    gpt-oss-120b (~65 GB) builds on one 80 GB GPU."""
    from giants.model.transformer import build

    if not cfg.is_moe:
        raise ValueError("quantization='mxfp4' needs a mixture-of-experts config (n_experts > 0)")
    model = build(cfg, device="meta")
    for layer in model.layers:
        layer.mlp = MXFP4MoE(cfg, device="meta")
    model.to(dtype).materialize(device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator=gen)
    for layer in model.layers:
        layer.mlp.randomize(gen)
    return model.eval()
