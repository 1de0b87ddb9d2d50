"""Streamed blocks' storage (giants.inference.placement): one flat byte buffer per block, the same layout in
its store (pinned host memory or a memory-mapped file) and in the slot on the execution device, so a block
streams in as one copy; the ModelRunner's fused Q/K/V and gate/up weights are single regions of it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

_ALIGN = 256


@dataclasses.dataclass
class Region:
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    members: list[tuple[nn.Module, str, bool, int, int, int]]  # (owner, attr, is_param, dim, start, length)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


def _plain(*mods: nn.Module) -> bool:
    return all(type(m) is nn.Linear for m in mods)


def _groups(block: nn.Module) -> list[tuple[list[tuple[nn.Module, str]], int, str]]:
    """The block's tensors as (members, cat dim, tag): the ModelRunner's fused Q/K/V and gate/up come out as
    one region each, so streamed blocks run the same products as resident ones."""
    from giants.model.mlp import MoE

    groups = []
    a = block.attn
    if _plain(a.q_proj, a.k_proj, a.v_proj):
        groups.append(([(m, "weight") for m in (a.q_proj, a.k_proj, a.v_proj)], 0, "qkv_w"))
        if a.q_proj.bias is not None:
            groups.append(([(m, "bias") for m in (a.q_proj, a.k_proj, a.v_proj)], 0, "qkv_b"))
    mlp = block.mlp
    if isinstance(mlp, MoE):
        groups.append(([(mlp, "w_gate"), (mlp, "w_up")], 1, "moe_w"))
        if mlp.b_gate is not None:
            groups.append(([(mlp, "b_gate"), (mlp, "b_up")], 1, "moe_b"))
    elif hasattr(mlp, "gate_proj") and _plain(mlp.gate_proj, mlp.up_proj):
        groups.append(([(mlp.gate_proj, "weight"), (mlp.up_proj, "weight")], 0, "dense_w"))
        if mlp.gate_proj.bias is not None:
            groups.append(([(mlp.gate_proj, "bias"), (mlp.up_proj, "bias")], 0, "dense_b"))
    grouped = {(id(m), attr) for members, _, _ in groups for m, attr in members}
    for mod in block.modules():
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None and (id(mod), attr) not in grouped:
                groups.append(([(mod, attr)], 0, ""))
    return groups


class Layout:
    """Where each tensor of a streamed block sits in its flat byte buffer."""

    def __init__(self, block: nn.Module) -> None:
        self.regions: list[Region] = []
        self.tags: dict[str, Region] = {}
        off = 0
        for members, dim, tag in _groups(block):
            ts = [getattr(m, a) for m, a in members]
            shape = list(ts[0].shape)
            shape[dim] = sum(t.shape[dim] for t in ts)
            nbytes = ts[0].element_size() * int(torch.Size(shape).numel())
            mem, start = [], 0
            for (m, a), t in zip(members, ts):
                mem.append((m, a, a in m._parameters, dim, start, t.shape[dim]))
                start += t.shape[dim]
            r = Region(off, nbytes, tuple(shape), ts[0].dtype, mem)
            self.regions.append(r)
            if tag:
                self.tags[tag] = r
            off += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes = max(off, _ALIGN)

    def point(self, flat: torch.Tensor, replace: bool = False) -> None:
        """Make the block's tensors views into `flat` (replace=True: new Parameter objects, from meta)."""
        for r in self.regions:
            region = r.view(flat)
            for m, a, is_param, dim, start, length in r.members:
                v = region.narrow(dim, start, length)
                if not is_param:
                    m._buffers[a] = v
                elif replace:
                    m._parameters[a] = nn.Parameter(v, requires_grad=False)
                else:
                    m._parameters[a].data = v

    def fill_from_module(self, flat: torch.Tensor) -> None:
        """Copy the block's current tensor values into `flat` (placing an already built model)."""
        for r in self.regions:
            region = r.view(flat)
            for m, a, _, dim, start, length in r.members:
                region.narrow(dim, start, length).copy_(getattr(m, a))

    def fused(self, flat: torch.Tensor, block: nn.Module) -> tuple:
        """The ModelRunner's (qkv, mlp) tuple for this block, as views into `flat`."""
        from giants.inference.mxfp4 import MXFP4MoE

        t = {k: r.view(flat) for k, r in self.tags.items()}
        qkv = (t["qkv_w"], t.get("qkv_b")) if "qkv_w" in t else None
        if "moe_w" in t:
            mlp = ("moe", t["moe_w"], t.get("moe_b"))
        elif isinstance(block.mlp, MXFP4MoE):
            mlp = ("mxfp4",)
        elif "dense_w" in t:
            mlp = ("dense", t["dense_w"], t.get("dense_b"))
        else:
            mlp = ("modules",)
        return qkv, mlp


class Pinned:
    """A host buffer page-locked in place with cudaHostRegister, at its exact size (the caching pinned allocator
    behind pin_memory=True rounds every allocation up to a power of two: 2 GiB for a 1.7 GB Llama-70B block)."""

    def __init__(self, nbytes: int) -> None:
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.registered = int(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)) == 0
        if not self.registered:  # fall back to the caching allocator's pinned memory
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def __del__(self) -> None:
        if getattr(self, "registered", False):
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
