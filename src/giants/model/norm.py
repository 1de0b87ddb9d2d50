"""Norms. Statistics in fp32, result cast back to the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from giants.config import ModelConfig


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, eps: float) -> torch.Tensor:
    """Norm.forward as a function of tensors (the compiled CPU decode passes each layer's weights in)."""
    dtype = x.dtype
    xf = x.float()
    if kind == "layernorm":
        y = torch.nn.functional.layer_norm(xf, (xf.shape[-1],), weight.float(),
                                           bias.float() if bias is not None else None, eps)
        return y.to(dtype)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float()
    if kind == "rmsnorm_plus_one":
        w = 1.0 + w
    return (y * w).to(dtype)


class Norm(nn.Module):
    """RMSNorm (`w * x`), Gemma's RMSNorm (`(1 + w) * x`, weight stored as the offset) or LayerNorm."""

    def __init__(self, dim: int, kind: str, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        init = torch.zeros if kind == "rmsnorm_plus_one" else torch.ones
        self.weight = nn.Parameter(init(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm" and x.dtype == torch.float32 == self.weight.dtype and x.device.type == "cpu":
            # one op, bitwise equal to the formula below in fp32 (CPU decode pays ~5-10 us an op on small rows)
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return norm(x, self.weight, self.bias, self.kind, self.eps)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fill_norm_(self.weight, "weight", self.kind)
        if self.bias is not None:
            fill_norm_(self.bias, "bias", self.kind)


def fill_norm_(p: torch.Tensor, leaf: str, kind: str) -> None:
    """A norm parameter's initial value in place: the bias 0; the weight 1, or 0 where it is stored as the
    offset from 1 (Gemma's rmsnorm_plus_one)."""
    if leaf == "bias" or kind == "rmsnorm_plus_one":
        p.zero_()
    else:
        p.fill_(1.0)


def make_norm(cfg: ModelConfig) -> Norm:
    return Norm(cfg.d_model, cfg.norm_kind, cfg.norm_eps)
