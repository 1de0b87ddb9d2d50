"""Int8 weight-only linears for CPU decode: per-output-channel symmetric scales, activations stay fp32/bf16.

A decode step on a CPU streams every weight once, so a quarter of the bytes (int8 vs fp32) is most of
the win; `torch._weight_int8pack_mm` dequantizes inside the matmul.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (for code that reads .weight; the matmul never builds it)."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = torch._weight_int8pack_mm(x2, self.qweight, self.scale.to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], -1)


def int8_weights(model: nn.Module) -> nn.Module:
    """Replace the projections of every block (attention and dense MLP) and the output head by Int8Linear,
    in place. The head (tied or not) is kept beside the model as `model.int8_head`."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("weights='int8': the int8 weight-only mode runs on the CPU")
    for layer in model.layers:
        for owner in (layer.attn, layer.mlp):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                mod = getattr(owner, name, None)
                if isinstance(mod, nn.Linear):
                    setattr(owner, name, Int8Linear(mod.weight, mod.bias))
    model.int8_head = Int8Linear(model.output_weight, None)
    return model
