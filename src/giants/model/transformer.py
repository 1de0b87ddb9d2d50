"""The one decoder. Every family is this module with a different ModelConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from giants.config import ModelConfig
from giants.model.attention import Attention
from giants.model.cache import KVCache, SlidingKVCache, StaticKVCache
from giants.model.mlp import GatedMLP, MoE
from giants.model.norm import Norm, fill_norm_, make_norm
from giants.model.positions import RelativeBias, Rotary


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.attn_post_norm = make_norm(cfg) if cfg.post_norms else None
        self.mlp_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe else GatedMLP(cfg)
        self.mlp_post_norm = make_norm(cfg) if cfg.post_norms else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope, cache=None, rel_bias=None,
                causal_no_cache: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.attn(self.attn_norm(x), positions, rope, cache, rel_bias, causal_no_cache)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        router_logits = None
        if isinstance(h, tuple):
            h, router_logits = h
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + h, router_logits


class Transformer(nn.Module):
    """forward(input_ids (B, T), positions (B, T) | None, cache | None) -> logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        self.rel_bias = RelativeBias(cfg) if cfg.position == "t5_bias" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ---- weights ------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) matrices, zero biases and sinks, identity norms (init_parameter, in
        named_parameters order: one random stream, so the order is part of the result)."""
        for name, p in self.named_parameters():
            if p.is_meta or "norm" in _owner_leaf(name)[0]:
                continue  # norms: Norm.reset_parameters below (each knows its own kind)
            init_parameter(name, p, self.config, generator)
        for m in self.modules():
            if isinstance(m, Norm):
                m.reset_parameters()

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Transformer:
        """Allocate a meta-built model on `device` (weights uninitialised) and rebuild buffers."""
        self.to_empty(device=device)
        if dtype is not None:
            self.to(dtype)
        if self.rotary is not None:
            self.rotary.reset_buffers()
        return self

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # ---- caches ------------------------------------------------------------
    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[KVCache]:
        """One cache per layer: a ring of `window` slots for sliding layers, else `max_len` slots."""
        cfg = self.config
        if max_len > cfg.max_context:
            raise ValueError(f"make_cache: max_len={max_len} exceeds max_context={cfg.max_context}")
        p = self.embed.weight
        dtype, device = dtype or p.dtype, device or p.device
        caches: list[KVCache] = []
        for w in cfg.windows:
            if w and w < max_len:
                caches.append(SlidingKVCache(batch, cfg.n_kv_heads, w, cfg.head_dim, dtype, device))
            else:
                caches.append(StaticKVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device))
        return caches

    # ---- forward -----------------------------------------------------------
    def check_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"input_ids: token id {hi if hi >= cfg.vocab_size else lo} outside "
                                 f"[0, vocab_size={cfg.vocab_size})")
            if int(positions.max()) >= cfg.max_context:
                raise ValueError(f"sequence position {int(positions.max())} is beyond "
                                 f"max_context={cfg.max_context}")
        if positions.shape != input_ids.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} != input_ids {tuple(input_ids.shape)}")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, *, output_router_logits: bool = False,
                check: bool = True, return_hidden: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, inputs_embeds: torch.Tensor | None = None):
        """rope: the rotary tables (cos, sin), each (B or 1, 1, T, head_dim/2), for `positions`, when the caller
        keeps them (a trainer computes them once, outside torch.compile); computed here when None.
        inputs_embeds: (B, T, d_model), the embedding rows of input_ids when the caller looked them up (a trainer
        that adds the lookup's gradient itself); the embedding scale still applies."""
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if check:
            self.check_inputs(input_ids, positions)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, model has {len(self.layers)}")
        if rope is None and self.rotary is not None:
            rope = self.rotary(positions, self.embed.weight.dtype)  # the lookup's output dtype is the table's
        if inputs_embeds is None:
            x = self.embed(input_ids)
        elif inputs_embeds.shape != (B, T, self.config.d_model):
            raise ValueError(f"inputs_embeds shape {tuple(inputs_embeds.shape)} != {(B, T, self.config.d_model)}")
        else:
            x = inputs_embeds
        if self.config.embed_scale is not None:
            # Gemma rounds the normaliser to the activation dtype before multiplying.
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        router_logits = []
        for i, layer in enumerate(self.layers):
            c = cache[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, rl = torch.utils.checkpoint.checkpoint(layer, x, positions, rope, c, self.rel_bias, cache is None,
                                                          use_reentrant=False)
            else:
                x, rl = layer(x, positions, rope, c, self.rel_bias, cache is None)
            if rl is not None:
                router_logits.append(rl)
        x = self.norm(x)
        if return_hidden:
            return (x, router_logits) if output_router_logits else x
        logits = self.logits(x)
        if output_router_logits:
            return logits, router_logits
        return logits

    def logits(self, hidden: torch.Tensor, project=None) -> torch.Tensor:
        """project: hidden -> raw logits in place of the plain head matmul (a trainer's own head op)."""
        logits = torch.nn.functional.linear(hidden, self.output_weight) if project is None else project(hidden)
        cap = self.config.final_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits


def _owner_leaf(name: str) -> tuple[str, str]:
    parts = name.split(".")
    return (parts[-2] if len(parts) > 1 else ""), parts[-1]


@torch.no_grad()
def init_parameter(name: str, p: torch.Tensor, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
    """Transformer.init_weights' rule for the parameter `name`, filling `p` (its full shape) in place.
    Output projections get std / sqrt(2 * n_layers) (GPT-2) so deep residual streams start at unit scale.
    Norm parameters take Norm.reset_parameters' values (every norm is make_norm(cfg): cfg.norm_kind).
    Random draws come from `generator` (the device's default one when None): called over a model's
    named_parameters in order on one stream, the values are init_weights' bit for bit, which is how
    giants.parallel.init gives each rank its slice of the one-device weights."""
    owner, leaf = _owner_leaf(name)
    if "norm" in owner:
        fill_norm_(p, leaf, cfg.norm_kind)
        return
    std = cfg.init_std
    if leaf in ("bias", "b_gate", "b_up", "b_down", "sinks") or owner == "rel_bias":
        p.zero_()
    elif leaf == "w_down" or owner in ("o_proj", "down_proj"):
        p.normal_(0.0, std / math.sqrt(2 * cfg.n_layers), generator=generator)
    else:
        p.normal_(0.0, std, generator=generator)


def build(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
          seed: int | None = None) -> Transformer:
    """Build a model; on "meta" nothing is allocated (the 120B presets take milliseconds)."""
    if str(device) == "meta":
        with torch.device("meta"):
            return Transformer(config)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config)
    return model.to(dtype) if dtype is not None else model
