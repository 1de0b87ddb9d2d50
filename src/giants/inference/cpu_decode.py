"""Batch-1 CPU decode through torch.compile (inductor's C++ backend).

One decoding sequence on a CPU is bound by streaming the weights, and eager PyTorch loses twice there.
The one-row GEMVs of oneDNN and MKL stream at about half of what a plain vectorised multiply-reduce
reaches (17 and 11 GB/s against 26-29 GB/s, measured on a 2-core EPYC). And each of the ~40 small ops a
layer costs 5-50 us of dispatch. Compiled, each projection is one fused multiply-reduce over the weight rows,
and the norms, rotary, attention and GLU fuse around them.

A layer is two compiled calls, with the paged-cache write between them, eager:
- `_qkv`: norm, fused QKV projection, rotary.
- `_rest`: attention over the visible slots, output projection, residual, MLP, residual.
Every layer reuses one function of tensors (the weights are arguments, not constants), so each compiles
once for the whole model: ~10-30 s on 2 cores at first use, then served from inductor's on-disk cache.
The number of visible keys is a dynamic dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from giants.model.mlp import gated_activation
from giants.model.norm import norm


def _gemv(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """w: (N, K), x: (K,) -> (N,). Written as a multiply-reduce so inductor streams w once."""
    y = (w * x).sum(-1)
    return y if b is None else y + b


@dataclass
class _Layer:
    attn_norm: tuple[torch.Tensor, torch.Tensor | None]
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    attn_post_norm: tuple[torch.Tensor, torch.Tensor | None] | None
    mlp_norm: tuple[torch.Tensor, torch.Tensor | None]
    gate_up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    mlp_post_norm: tuple[torch.Tensor, torch.Tensor | None] | None
    sinks: torch.Tensor | None


def unsupported_reason(runner) -> str | None:
    """Why the compiled decode cannot run this runner's model, or None when it can."""
    model = runner.model
    if runner.device.type != "cpu":
        return "the compiled decode is for the CPU (CUDA has its own graphs and kernels)"
    if model.rel_bias is not None:
        return "relative position bias (T5) layers are not in the compiled decode"
    if getattr(model, "int8_head", None) is not None:
        return "int8 weights are not in the compiled decode"
    for i, (qkv, mlp) in enumerate(runner.fused):
        layer = model.layers[i]
        if qkv is None or type(layer.attn.o_proj) is not torch.nn.Linear:
            return f"layer {i}: attention projections are not plain linears"
        if mlp[0] != "dense" or type(layer.mlp.down_proj) is not torch.nn.Linear:
            return f"layer {i}: the MLP is not a dense gated MLP of plain linears"
    return None


class CompiledDecode:
    """Runs a step of exactly one decoding sequence (StepInputs.visible set) through compiled layer functions."""

    def __init__(self, runner) -> None:
        why = unsupported_reason(runner)
        if why is not None:
            raise ValueError(f"cpu_compile: {why}")
        self.runner, self.model, self.cfg, self.kv = runner, runner.model, runner.cfg, runner.kv
        nb = lambda n: (n.weight, n.bias) if n is not None else None  # noqa: E731
        lin = lambda m: (m.weight, m.bias)  # noqa: E731
        self.layers = []
        for (qkv, mlp), layer in zip(runner.fused, self.model.layers):
            self.layers.append(_Layer(nb(layer.attn_norm), qkv, lin(layer.attn.o_proj), nb(layer.attn_post_norm),
                                      nb(layer.mlp_norm), (mlp[1], mlp[2]), lin(layer.mlp.down_proj),
                                      nb(layer.mlp_post_norm), layer.attn.sinks))
        # the kernels read the thread count at run time (inductor bakes it in otherwise), so the count
        # giants.inference.cpu_threads sets for each step applies here too
        opts = {"cpp.dynamic_threads": True}
        self._qkv_fn = torch.compile(self._qkv, dynamic=False, options=opts)
        self._rest_fn = torch.compile(self._rest, options=opts)
        self._head_fn = torch.compile(self._head, dynamic=False, options=opts)

    # ---- the compiled pieces (pure functions of tensors; config values are constants) ----------------
    def _qkv(self, x: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor | None, w: torch.Tensor,
             b: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (d_model,) -> q: (H, D), k, v: (Hkv, D)
        cfg = self.cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = _gemv(w, norm(x, nw, nb, cfg.norm_kind, cfg.norm_eps), b)
        qk = qkv[:(H + Hkv) * D].view(H + Hkv, D)
        if cos is not None:
            x1, x2 = qk.chunk(2, dim=-1)
            qk = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return qk[:H], qk[H:], qkv[(H + Hkv) * D:].view(Hkv, D)

    def _rest(self, x: torch.Tensor, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
              slots: torch.Tensor, sinks: torch.Tensor | None, wo: torch.Tensor, bo: torch.Tensor | None,
              pa: tuple | None, mn: tuple, wgu: torch.Tensor, bgu: torch.Tensor | None, wd: torch.Tensor,
              bd: torch.Tensor | None, pm: tuple | None) -> torch.Tensor:
        # x: (d_model,); q: (H, D); pools: (slots, Hkv, D); slots: (S,) the keys this token sees
        cfg = self.cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        k = k_pool.index_select(0, slots)  # (S, Hkv, D)
        v = v_pool.index_select(0, slots)
        acc = torch.promote_types(q.dtype, torch.float32)
        s = torch.einsum("gjd,sgd->gjs", q.view(Hkv, H // Hkv, D), k).to(acc) * cfg.attn_scale  # (Hkv, G, S)
        if cfg.attn_softcap is not None:
            s = cfg.attn_softcap * torch.tanh(s / cfg.attn_softcap)
        if sinks is not None:
            # the sink is an extra logit in each row's softmax denominator whose value is dropped
            sink = sinks.to(acc).view(Hkv, H // Hkv, 1)
            p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
        else:
            p = torch.softmax(s, dim=-1)
        o = torch.einsum("gjs,sgd->gjd", p.to(v.dtype), v).reshape(H * D).to(x.dtype)
        h = _gemv(wo, o, bo)
        if pa is not None:
            h = norm(h, pa[0], pa[1], cfg.norm_kind, cfg.norm_eps)
        x = x + h
        gu = _gemv(wgu, norm(x, mn[0], mn[1], cfg.norm_kind, cfg.norm_eps), bgu)
        F = gu.shape[0] // 2
        h = _gemv(wd, gated_activation(gu[:F], gu[F:], cfg), bd)
        if pm is not None:
            h = norm(h, pm[0], pm[1], cfg.norm_kind, cfg.norm_eps)
        return x + h

    def _head(self, x: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        logits = _gemv(w, norm(x, nw, nb, cfg.norm_kind, cfg.norm_eps), None)
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
        return logits[None]

    # ---- one step ------------------------------------------------------------------------------------
    def __call__(self, inp) -> torch.Tensor:
        """inp: StepInputs of one decoding sequence. Returns its logits (1, vocab)."""
        model, cfg, kv = self.model, self.cfg, self.kv
        x = model.embed.weight[inp.ids[0]]
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        cos = sin = None
        if model.rotary is not None:
            cos, sin = model.rotary(inp.pos[None], x.dtype)  # (1, 1, 1, D/2)
            cos, sin = cos.view(-1), sin.view(-1)
        Hkv, D = cfg.n_kv_heads, cfg.head_dim
        for sv in inp.visible:  # one compiled graph for every count of visible keys
            torch._dynamo.maybe_mark_dynamic(sv, 0)
        for i, L in enumerate(self.layers):
            q, k, v = self._qkv_fn(x, *L.attn_norm, *L.qkv, cos, sin)
            gi = kv.group_of_layer[i]
            g, li = kv.groups[gi], kv.layer_index[i]
            k_pool, v_pool = g.k[li].view(-1, Hkv, D), g.v[li].view(-1, Hkv, D)
            torch._dynamo.maybe_mark_dynamic(k_pool, 0)  # window groups have pools of other sizes
            torch._dynamo.maybe_mark_dynamic(v_pool, 0)
            k_pool.index_copy_(0, inp.slots[gi], k[None].to(k_pool.dtype))
            v_pool.index_copy_(0, inp.slots[gi], v[None].to(v_pool.dtype))
            x = self._rest_fn(x, q, k_pool, v_pool, inp.visible[gi], L.sinks, *L.o, L.attn_post_norm, L.mlp_norm,
                              *L.gate_up, *L.down, L.mlp_post_norm)
        return self._head_fn(x, *self._final())

    def _final(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        n = self.model.norm
        return n.weight, n.bias, self.model.output_weight

