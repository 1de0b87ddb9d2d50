"""The two-way HF <-> giants state-dict map, one rule list per family.

HF names are the on-disk checkpoint names (what `save_pretrained` writes and the Hub serves). Every
fused, split, stacked or transposed tensor is handled here and nowhere else; export runs the same
rules backwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from giants.config import ModelConfig

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_ours: Callable[[Tensors], Tensors]
    to_hf: Callable[[Tensors], Tensors]

    @property
    def identity(self) -> bool:
        """One tensor in, the same tensor out (no fusing, splitting or transposing)."""
        return self.to_ours is _same and len(self.ours) == len(self.hf) == 1


def _same(ts: Tensors) -> Tensors:
    return list(ts)


def _one(ours: str, hf: str) -> Rule:
    return Rule((ours,), (hf,), _same, _same)


class MissingTensorError(KeyError):
    pass


def family_rules(cfg: ModelConfig) -> list[Rule]:
    """Every rule for `cfg`, in model order. Behaviour from fields (via the HF family they imply)."""
    mt = cfg.hf_model_type
    rules = [_one("embed.weight", "model.embed_tokens.weight")]
    E = cfg.n_experts
    for i in range(cfg.n_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        rules.append(_one(o + "attn_norm.weight", h + "input_layernorm.weight"))
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules.append(_one(f"{o}attn.{p}.weight", f"{h}self_attn.{p}.weight"))
            if (cfg.attn_out_bias if p == "o_proj" else cfg.attn_qkv_bias):
                rules.append(_one(f"{o}attn.{p}.bias", f"{h}self_attn.{p}.bias"))
        if cfg.attn_sinks:
            rules.append(_one(o + "attn.sinks", h + "self_attn.sinks"))
        if cfg.post_norms:
            rules += [_one(o + "attn_post_norm.weight", h + "post_attention_layernorm.weight"),
                      _one(o + "mlp_norm.weight", h + "pre_feedforward_layernorm.weight"),
                      _one(o + "mlp_post_norm.weight", h + "post_feedforward_layernorm.weight")]
        else:
            rules.append(_one(o + "mlp_norm.weight", h + "post_attention_layernorm.weight"))
        if not cfg.is_moe:
            for p in ("gate_proj", "up_proj", "down_proj"):
                rules.append(_one(f"{o}mlp.{p}.weight", f"{h}mlp.{p}.weight"))
                if cfg.mlp_bias:
                    rules.append(_one(f"{o}mlp.{p}.bias", f"{h}mlp.{p}.bias"))
        elif mt == "mixtral":
            m = h + "block_sparse_moe."
            rules.append(_one(o + "mlp.router.weight", m + "gate.weight"))
            for ours, w in (("w_gate", "w1"), ("w_down", "w2"), ("w_up", "w3")):
                rules.append(Rule(
                    (f"{o}mlp.{ours}",), tuple(f"{m}experts.{e}.{w}.weight" for e in range(E)),
                    lambda ts: [torch.stack(ts)], lambda ts: list(ts[0].unbind(0))))
        elif mt == "gpt_oss":
            m = h + "mlp."
            rules.append(_one(o + "mlp.router.weight", m + "router.weight"))
            rules.append(_one(o + "mlp.router.bias", m + "router.bias"))
            # HF: gate_up_proj (E, D, 2F) with gate/up interleaved on the last axis; ours (E, F, D) each.
            rules.append(Rule(
                (o + "mlp.w_gate", o + "mlp.w_up"), (m + "experts.gate_up_proj",),
                lambda ts: [ts[0][..., 0::2].transpose(1, 2).contiguous(),
                            ts[0][..., 1::2].transpose(1, 2).contiguous()],
                lambda ts: [_interleave(ts[0], ts[1]).transpose(1, 2).contiguous()]))
            rules.append(Rule(
                (o + "mlp.b_gate", o + "mlp.b_up"), (m + "experts.gate_up_proj_bias",),
                lambda ts: [ts[0][..., ::2].contiguous(), ts[0][..., 1::2].contiguous()],
                lambda ts: [_interleave_vec(ts[0], ts[1])]))
            # HF down_proj (E, F, D); ours (E, D, F).
            rules.append(Rule((o + "mlp.w_down",), (m + "experts.down_proj",),
                              lambda ts: [ts[0].transpose(1, 2).contiguous()],
                              lambda ts: [ts[0].transpose(1, 2).contiguous()]))
            rules.append(_one(o + "mlp.b_down", m + "experts.down_proj_bias"))
        else:
            raise ValueError(f"no HF expert layout for model_type {mt!r}")
    rules.append(_one("norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        rules.append(_one("lm_head.weight", "lm_head.weight"))
    return rules


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(E, F, D) x2 -> (E, 2F, D) with rows gate0, up0, gate1, up1, ..."""
    return torch.stack([gate, up], dim=2).flatten(1, 2)


def _interleave_vec(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(E, F) x2 -> (E, 2F) as gate0, up0, gate1, up1, ..."""
    return torch.stack([gate, up], dim=-1).flatten(-2)


def hf_to_giants(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, *, strict: bool = True,
                 source: str = "checkpoint") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our name, tensor) from an HF state dict (may be lazy: only `in` and `[]` are used)."""
    used: set[str] = set()
    for rule in family_rules(cfg):
        missing = [n for n in rule.hf if n not in hf]
        if missing:
            raise MissingTensorError(f"{source}: missing tensor {missing[0]!r}"
                                     + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        used.update(rule.hf)
        yield from zip(rule.ours, rule.to_ours([hf[n] for n in rule.hf]))
    if strict:
        extra = sorted(k for k in hf.keys() if k not in used and not _ignorable(k, cfg))
        if extra:
            raise ValueError(f"{source}: unexpected tensor {extra[0]!r}"
                             + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    # Tied checkpoints sometimes carry a copy of the embedding as lm_head; rotary caches are derived.
    return (cfg.tie_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


def giants_to_hf(ours: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for export; the inverse of `hf_to_giants`."""
    for rule in family_rules(cfg):
        yield from zip(rule.hf, rule.to_hf([ours[n] for n in rule.ours]))


def hf_names(cfg: ModelConfig) -> list[str]:
    return [n for r in family_rules(cfg) for n in r.hf]
