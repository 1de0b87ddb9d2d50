"""LoRA (Hu et al. 2021): frozen W plus a trainable low-rank update (alpha / r) * B @ A.

nn.Linear targets (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, router, lm_head) are
wrapped so the update runs as two thin matmuls; the stacked expert tensors of an MoE (w_gate, w_up,
w_down: (E, out, in)) get one (B_e, A_e) pair per expert through a parametrization. B starts at zero,
so the adapted model starts equal to the base. `merge_lora` folds the updates into the weights and
restores the plain module tree, ready for giants.save.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TENSORS = ("w_gate", "w_up", "w_down")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        # x: (..., in) -> (..., r) -> (..., out)
        return y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.delta().to(self.base.weight.dtype)
        return self.base


class LoRAExperts(nn.Module):
    """Parametrization of a stacked expert tensor W (E, out, in): W + scale * B @ A per expert."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        E, out, inp = weight.shape
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(E, rank, inp, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(E, out, rank, device=weight.device, dtype=weight.dtype))
        for e in range(E):
            nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return w + torch.bmm(self.lora_B, self.lora_A).to(w.dtype) * self.scale


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = DEFAULT_TARGETS,
               dropout: float = 0.0) -> list[str]:
    """Freeze every parameter of `model`, add adapters to the named targets; returns the adapted names."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1 (got {rank})")
    if alpha <= 0:
        raise ValueError(f"lora alpha must be > 0 (got {alpha})")
    if not targets:
        raise ValueError("lora targets: name at least one module (e.g. q_proj v_proj)")
    for p in model.parameters():
        p.requires_grad_(False)
    done: list[str] = []
    wanted = set(targets)
    hit: set[str] = set()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in wanted and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                done.append(f"{name}.{child_name}" if name else child_name)
                hit.add(child_name)
        for tname in EXPERT_TENSORS:
            if tname in wanted and isinstance(getattr(module, tname, None), nn.Parameter):
                w = getattr(module, tname)
                if w.dim() != 3:
                    continue
                parametrize.register_parametrization(module, tname, LoRAExperts(w, rank, alpha), unsafe=True)
                module.parametrizations[tname].original.requires_grad_(False)
                done.append(f"{name}.{tname}")
                hit.add(tname)
    unknown = sorted(wanted - hit)
    if unknown:
        raise ValueError(f"lora targets {unknown} match no nn.Linear module or expert tensor in this model "
                         f"(linear names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj router lm_head; "
                         f"expert tensors: {' '.join(EXPERT_TENSORS)})")
    return done


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """The base model (adapters off): DPO's reference model at no extra memory."""
    mods = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place; the module tree is the plain model again."""
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
        if parametrize.is_parametrized(module):
            for tname in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tname, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
