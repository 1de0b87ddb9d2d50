"""One engine step through the model: a flat batch of tokens from many sequences over the paged cache.

The step's N tokens (decode tokens and prefill chunks of different sequences) go through every
projection and MLP as one (N, d_model) matrix. Attention reads each sequence's blocks: decode tokens
of all sequences in one batched call, each prefill chunk on its own. The model's own modules do the
work (norms, projections, rotary, `attend` with `attention_mask`, relative bias, MoE), so soft-caps,
sinks, windows and T5 bias behave exactly as in `Transformer.forward`.

Legend: N tokens in the step, B sequences, H / Hkv heads, D head dim, bs block size, nb blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from giants.inference.fp8 import FP8MoE
from giants.inference.fp8 import fuse as _fuse_fp8
from giants.inference.kv_cache import KVCacheManager, SeqBlocks
from giants.inference.mxfp4 import MXFP4MoE
from giants.model.attention import attend, attention_mask
from giants.model.mlp import MoE, gated_activation
from giants.model.positions import apply_rotary
from giants.model.transformer import Transformer


@dataclass
class Chunk:
    """Tokens [start, start + len(token_ids)) of one sequence, computed this step."""

    blocks: SeqBlocks
    start: int
    token_ids: list[int]
    sample: bool  # the chunk ends at the sequence's last known token: its logits are needed
    # logits of the chunk's last n_logits tokens when sampled (speculative verification: the last accepted
    # token + the drafts, giants.inference.spec_decode); 1 otherwise
    n_logits: int = 1


def verify_rows(chunks: list[Chunk]) -> list[Chunk]:
    """Speculative verification chunks ([last token, d_1 .. d_k], n_logits == its length) as one 1-token decode
    row each, sharing the sequence's blocks. Row j attends to the keys up to its own position, which the rows before
    it wrote earlier in the same layer, so the rows are causal among themselves and the step is a plain decode step
    (batched decode attention; on the GPU, the CUDA graphs). A chunk that also carries prompt tokens keeps the step
    as it is (the chunked-prefill path computes it)."""
    if all(c.n_logits == 1 for c in chunks) or any(1 < c.n_logits != len(c.token_ids) for c in chunks):
        return chunks
    out = []
    for c in chunks:
        if c.n_logits == 1:
            out.append(c)
        else:
            out.extend(Chunk(c.blocks, c.start + j, [t], True) for j, t in enumerate(c.token_ids))
    return out


@dataclass
class AttnRows:
    """Attention inputs for a set of sequences in one group: gathered block ids and key positions."""

    table: torch.Tensor  # (B, nb) block ids, -1 = none
    k_pos: torch.Tensor  # (B, nb * bs) absolute key positions, -1 = masked


class StepInputs:
    def __init__(self, kv: KVCacheManager, chunks: list[Chunk], device: torch.device) -> None:
        bs = kv.block_size
        ids, pos, starts = [], [], []
        for c in chunks:
            starts.append(len(ids))
            ids.extend(c.token_ids)
            pos.extend(range(c.start, c.start + len(c.token_ids)))
        self.n_tokens = len(ids)
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.pos = torch.tensor(pos, dtype=torch.long, device=device)
        # slot of every new token in each group's pool (flat index over num_blocks * bs)
        self.slots = []
        for gi in range(len(kv.groups)):
            s = []
            for c in chunks:
                t = c.blocks.tables[gi]
                s.extend(t[p // bs] * bs + p % bs for p in range(c.start, c.start + len(c.token_ids)))
            self.slots.append(torch.tensor(s, dtype=torch.long, device=device))
        self.decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        self.prefill = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        self.starts = starts
        self.chunks = chunks
        self.decode_rows = torch.tensor([starts[i] for i in self.decode], dtype=torch.long, device=device)
        self.attn_decode = [self._rows(kv, gi, self.decode, device) for gi in range(len(kv.groups))]
        # one decoding sequence: the slots of the keys it sees, per group (its attention then needs no mask)
        self.visible = None
        if self.n_tokens == 1 and self.decode:
            self.visible = []
            for g, meta in zip(kv.groups, self.attn_decode):
                allowed = attention_mask(self.pos[None], meta.k_pos, g.window)[0, 0]  # (nb * bs,)
                slots = meta.table.clamp(min=0)[0, :, None] * bs + torch.arange(bs, device=device)
                self.visible.append(slots.flatten()[allowed])
        self.attn_prefill = [[self._rows(kv, gi, [i], device) for gi in range(len(kv.groups))]
                             for i in self.prefill]
        self.sample_rows = torch.tensor([r for i, c in enumerate(chunks) if c.sample
                                         for r in range(starts[i] + len(c.token_ids) - c.n_logits,
                                                        starts[i] + len(c.token_ids))],
                                        dtype=torch.long, device=device)

    def _rows(self, kv: KVCacheManager, gi: int, which: list[int], device: torch.device) -> AttnRows | None:
        if not which:
            return None
        g, bs = kv.groups[gi], kv.block_size
        firsts, tables = [], []
        for i in which:
            c = self.chunks[i]
            first = kv.first_needed_block(g, c.start)
            end = c.start + len(c.token_ids)
            firsts.append(first)
            tables.append(c.blocks.tables[gi][first:-(-end // bs)])
        nb = max(len(t) for t in tables)
        table = torch.full((len(which), nb), -1, dtype=torch.long)
        for r, t in enumerate(tables):
            table[r, :len(t)] = torch.tensor(t, dtype=torch.long)
        first = torch.tensor(firsts, dtype=torch.long)
        k_pos = ((first[:, None] + torch.arange(nb)) * bs)[:, :, None] + torch.arange(bs)  # (B, nb, bs)
        end = torch.tensor([self.chunks[i].start + len(self.chunks[i].token_ids) for i in which])
        valid = (table >= 0)[:, :, None] & (k_pos < end[:, None, None])
        k_pos = torch.where(valid, k_pos, -1).reshape(len(which), nb * bs)
        return AttnRows(table.to(device), k_pos.to(device))


def _plain(*mods) -> bool:
    return all(type(m) is torch.nn.Linear for m in mods)


def _fuse_rows(mods: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum out, in) weight for several linears sharing an input; the modules become views into it."""
    w = torch.cat([m.weight.data for m in mods])
    b = torch.cat([m.bias.data for m in mods]) if mods[0].bias is not None else None
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight.data = w[start:start + n]
        if b is not None:
            m.bias.data = b[start:start + n]
        start += n
    return w, b


def _fuse_experts(moe: MoE) -> tuple[torch.Tensor, torch.Tensor | None]:
    F_ = moe.w_gate.shape[1]
    w = torch.cat([moe.w_gate.data, moe.w_up.data], dim=1)  # (E, 2F, D)
    moe.w_gate.data, moe.w_up.data = w[:, :F_], w[:, F_:]
    b = None
    if moe.b_gate is not None:
        b = torch.cat([moe.b_gate.data, moe.b_up.data], dim=1)
        moe.b_gate.data, moe.b_up.data = b[:, :F_], b[:, F_:]
    return w, b


class ModelRunner:
    """Runs steps of a giants Transformer against a KVCacheManager (any device, any dtype)."""

    def __init__(self, model: Transformer, kv: KVCacheManager) -> None:
        self.model, self.kv, self.cfg = model, kv, model.config
        self.device = kv.device
        # Q/K/V and gate/up as one matmul each: fewer, larger products (the modules become views).
        self.fused = []
        self.placement = getattr(model, "placement", None)  # device_map (giants.inference.placement)
        if self.placement is not None:
            self.placement.check_runner(self, kv)
        with torch.no_grad():
            for i, layer in enumerate(model.layers):
                if self.placement is not None and self.placement.streamed[i]:
                    self.fused.append(None)  # streamed block: its fused views come with it (placement.fused)
                    continue
                a = layer.attn
                qkv = _fuse_rows([a.q_proj, a.k_proj, a.v_proj]) if _plain(a.q_proj, a.k_proj, a.v_proj) \
                    else _fuse_fp8([a.q_proj, a.k_proj, a.v_proj])  # FP8 linears: one FP8Weight (inference.fp8)
                if isinstance(layer.mlp, MoE):
                    mlp = ("moe",) + _fuse_experts(layer.mlp)
                elif isinstance(layer.mlp, MXFP4MoE):
                    mlp = ("mxfp4",)
                elif isinstance(layer.mlp, FP8MoE):
                    mlp = ("fp8moe",)
                elif _plain(layer.mlp.gate_proj, layer.mlp.up_proj):
                    mlp = ("dense",) + _fuse_rows([layer.mlp.gate_proj, layer.mlp.up_proj])
                elif (gu := _fuse_fp8([layer.mlp.gate_proj, layer.mlp.up_proj])) is not None:
                    mlp = ("dense",) + gu
                else:
                    mlp = ("modules",)
                self.fused.append((qkv, mlp))
        self.packed: dict[int, torch.Tensor] = {}
        self.compiled = None  # CompiledDecode, when cpu_compile is on

    def compile_decode(self) -> None:
        """CPU: steps of one decoding sequence go through torch.compile'd layer functions (see cpu_decode)."""
        from giants.inference.cpu_decode import CompiledDecode

        if self.placement is not None:
            raise ValueError("cpu_compile: not for a model placed with device_map")
        self.compiled = CompiledDecode(self)

    def pack_for_onednn(self) -> None:
        """CPU fp32: keep a oneDNN-packed copy of every projection and the head. MKL's single-row sgemv
        streams ~16 GB/s on AMD CPUs, oneDNN's packed linear ~40 GB/s; costs a second copy of the weights."""
        model = self.model
        ws = [model.output_weight]
        for fused, layer in zip(self.fused, model.layers):
            if fused is None:  # a streamed block (device_map) is never packed
                continue
            qkv, mlp = fused
            if qkv is not None:
                ws.append(qkv[0])
            if type(layer.attn.o_proj) is torch.nn.Linear:
                ws.append(layer.attn.o_proj.weight)
            if mlp[0] == "dense":
                ws += [mlp[1], layer.mlp.down_proj.weight]
        with torch.no_grad():
            for w in ws:
                # a placed model (device_map) may keep some weights on a GPU; FP8 weights are not tensors
                if isinstance(w, torch.Tensor) and w.device.type == "cpu":
                    self.packed[w.data_ptr()] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)

    def _lin(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        packed = self.packed.get(w.data_ptr()) if self.packed else None
        if packed is None:
            return F.linear(x, w, b)
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")

    def _attention(self, layer: int, q: torch.Tensor, inp: StepInputs) -> torch.Tensor:
        """q: (N, H, D) -> (N, H, D) reading keys/values from the paged pool."""
        kv, cfg = self.kv, self.cfg
        gi = kv.group_of_layer[layer]
        g = kv.groups[gi]
        li = kv.layer_index[layer]
        k_pool, v_pool = g.k[li], g.v[li]
        attn_mod = self.model.layers[layer].attn
        if self.model.rel_bias is None and inp.visible is not None:
            return self._attention_one(q, k_pool, v_pool, attn_mod, inp.visible[gi])
        out = torch.empty_like(q)
        batches = []
        if inp.decode:
            batches.append((inp.decode_rows[:, None], inp.attn_decode[gi]))
        for j, i in enumerate(inp.prefill):
            c = inp.chunks[i]
            rows = torch.arange(inp.starts[i], inp.starts[i] + len(c.token_ids), device=q.device)[None]
            batches.append((rows, inp.attn_prefill[j][gi]))
        for rows, meta in batches:
            B, T = rows.shape
            qb = q[rows].transpose(1, 2).contiguous()  # (B, H, T, D)
            idx = meta.table.clamp(min=0)
            kb = k_pool[idx].flatten(1, 2).transpose(1, 2)  # (B, Hkv, nb*bs, D)
            vb = v_pool[idx].flatten(1, 2).transpose(1, 2)
            q_pos = inp.pos[rows]
            allowed = attention_mask(q_pos, meta.k_pos, g.window)
            bias = self.model.rel_bias(q_pos, meta.k_pos) if self.model.rel_bias is not None else None
            o = attend(qb, kb, vb, allowed, scale=cfg.attn_scale, softcap=cfg.attn_softcap, sinks=attn_mod.sinks,
                       bias=bias)
            out[rows] = o.transpose(1, 2).to(out.dtype)
        return out

    def _attention_one(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, attn_mod,
                       sv: torch.Tensor) -> torch.Tensor:
        """One decoding sequence: gathers exactly the keys it sees (slots sv), so no mask and no per-layer
        index maths. q: (1, H, D) -> (1, H, D)."""
        cfg = self.cfg
        Hkv, D = cfg.n_kv_heads, cfg.head_dim
        k = k_pool.view(-1, Hkv, D).index_select(0, sv).transpose(0, 1)[None]  # (1, Hkv, L, D)
        v = v_pool.view(-1, Hkv, D).index_select(0, sv).transpose(0, 1)[None]
        qb = q.transpose(0, 1)[None]  # (1, H, 1, D)
        if cfg.attn_softcap is None and attn_mod.sinks is None:
            o = F.scaled_dot_product_attention(qb, k, v, scale=cfg.attn_scale, enable_gqa=Hkv != cfg.n_heads)
        else:
            ones = torch.ones(1, 1, sv.shape[0], dtype=torch.bool, device=q.device)
            o = attend(qb, k, v, ones, scale=cfg.attn_scale, softcap=cfg.attn_softcap, sinks=attn_mod.sinks)
        return o[0].transpose(0, 1).to(q.dtype)

    supports_ahead = True  # execute() takes decode input ids as a device tensor (see Engine.async_decode)

    def can_run_ahead(self, chunks: list[Chunk]) -> bool:
        return True

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk], ids: torch.Tensor | None = None) -> torch.Tensor:
        """Runs the chunks; returns logits (n_sampled, vocab) in chunk order for chunks with sample=True (n_logits
        rows each).
        ids: (len(chunks),) the decode chunks' input tokens on the device, in place of their token_ids."""
        if ids is not None:
            chunks = [Chunk(c.blocks, c.start, [t], c.sample) for c, t in zip(chunks, ids.tolist())]
        inp = StepInputs(self.kv, verify_rows(chunks), self.device)
        if self.compiled is not None and inp.visible is not None:
            return self.compiled(inp)
        model, cfg, kv = self.model, self.cfg, self.kv
        N = inp.n_tokens
        x = self._embed(inp.ids)
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        rope = model.rotary(inp.pos[None], x.dtype) if model.rotary is not None else None  # (1, 1, N, D/2)
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        for i, layer in enumerate(model.layers):
            if self.placement is not None:  # streams the block in, moves x / rope / inputs to its device
                x, rope, inp = self.placement.enter(i, x, rope, inp)
            attn = layer.attn
            h = layer.attn_norm(x)
            qkv_w, mlp_w = self.fused[i] or self.placement.fused(i, layer)
            if qkv_w is not None:
                qkv = self._lin(h, *qkv_w)
                q = qkv[:, :H * D].view(N, H, D)
                k = qkv[:, H * D:(H + Hkv) * D].view(N, Hkv, D)
                v = qkv[:, (H + Hkv) * D:].view(N, Hkv, D)
            else:
                q = attn.q_proj(h).view(N, H, D)
                k = attn.k_proj(h).view(N, Hkv, D)
                v = attn.v_proj(h).view(N, Hkv, D)
            if rope is not None and qkv_w is not None:  # q and k rotated in one pass over their rows
                qk = apply_rotary(qkv[:, :(H + Hkv) * D].view(N, H + Hkv, D).transpose(0, 1)[None], *rope)[0]
                q, k = qk[:H].transpose(0, 1), qk[H:].transpose(0, 1)
            elif rope is not None:
                q = apply_rotary(q.transpose(0, 1)[None], *rope)[0].transpose(0, 1)
                k = apply_rotary(k.transpose(0, 1)[None], *rope)[0].transpose(0, 1)
            gi = kv.group_of_layer[i]
            g, li = kv.groups[gi], kv.layer_index[i]
            g.k[li].view(-1, Hkv, D).index_copy_(0, inp.slots[gi], k.to(g.k[li].dtype))
            g.v[li].view(-1, Hkv, D).index_copy_(0, inp.slots[gi], v.to(g.v[li].dtype))
            o = self._attention(i, q, inp)
            h = self._lin(o.reshape(N, H * D), attn.o_proj.weight, attn.o_proj.bias) \
                if type(attn.o_proj) is torch.nn.Linear else attn.o_proj(o.reshape(N, H * D))
            h = self._reduce(h)
            if layer.attn_post_norm is not None:
                h = layer.attn_post_norm(h)
            x = x + h
            h = layer.mlp_norm(x)
            if mlp_w[0] == "dense":
                gu = self._lin(h, mlp_w[1], mlp_w[2])
                Fd = gu.shape[-1] // 2
                h = self._lin(gated_activation(gu[:, :Fd], gu[:, Fd:], cfg), layer.mlp.down_proj.weight,
                              layer.mlp.down_proj.bias)
            else:
                h = layer.mlp(h[None])
                h = (h[0] if isinstance(h, tuple) else h)[0]
            h = self._reduce(h)
            if layer.mlp_post_norm is not None:
                h = layer.mlp_post_norm(h)
            x = x + h
        return self._gather_vocab(self._head(model.norm(x[inp.sample_rows])))

    # Tensor parallelism (giants.inference.tp_runner) overrides these four; one process: plain modules.
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(ids)

    def _reduce(self, h: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a row-parallel output (o_proj, down_proj)."""
        return h

    def _gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        model, cfg = self.model, self.cfg
        head = getattr(model, "int8_head", None)
        if head is None and not self.packed:
            return model.logits(x)
        logits = head(x) if head is not None else self._lin(x, model.output_weight, None)
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
        return logits
