"""Expert parallelism for the MoE blocks, applied from outside the model (torchtitan's ExpertParallel, on the
one MoE module of giants.model.mlp).

`apply_ep(model, ep_mesh)` shards every MoE block's experts on dim 0 over the EP ranks (DTensor Shard(0): rank j
holds experts [j*E/ep, (j+1)*E/ep)) and swaps the module's class for `ExpertParallelMoE`, whose forward is the
single-process one with two all-to-alls around the expert compute:

    route (replicated router, the module's own `route`) -> sort rows by expert (stable, as MoE.forward)
    -> all-to-all of the per-expert counts -> all-to-all of the rows (autograd) to the ranks holding their experts
    -> regroup expert-major -> grouped_linear / gated_activation on the local experts -> undo the regroup
    -> all-to-all back (autograd) -> weight by the router and index_add into the tokens (as MoE.forward)

The rows, weights and summation order of each token are those of MoE.forward, so an EP run equals one process
on the same tokens (fp32 to rounding). Parameter names do not change (the class swap keeps the module in place),
so checkpoints and the split tables in giants.parallel.layout still apply.

Gradient scale. A rank's expert weights receive, through the all-to-all's backward, the gradient of EVERY EP
rank's local loss, i.e. the SUM over the EP group. The rest of the model follows the data-parallel convention
"each rank's loss is its local mean; gradients are averaged over the data-parallel ranks". To put the experts on
the same footing, the forward multiplies their gradient by 1/grad_divide (default: the EP size), so averaging the
expert gradients over the remaining data-parallel ranks (FSDP over dp_shard_mod_ep and dp_replicate with its
default mean, or nothing when ep == dp) gives the gradient of the global mean. A plan that instead sets an FSDP
gradient divide factor of the whole dp degree on the experts (torchtitan) must pass grad_divide=1.

Router losses. The load-balancing loss is a product of two means over tokens, so the mean over ranks of per-rank
losses is not the loss of the global batch. `router_losses_global` all-reduces the per-expert counts and
probability sums (and the z-loss sums) over the data-parallel group, so every rank's value is the global batch's,
with a gradient that averaged over the group is the global loss's gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from giants.model.mlp import MoE, gated_activation, grouped_linear
from giants.train.losses import RouterLosses

EXPERT_PARAMS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g * ctx.scale, None


def _local(p: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """The rank's experts of an expert parameter (its local shard when a DTensor), gradient scaled."""
    if p is None:
        return None
    t = p.to_local() if isinstance(p, DTensor) else p
    return _ScaleGrad.apply(t, scale) if scale != 1.0 else t


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


class ExpertParallelMoE(MoE):
    """MoE with its experts split over an expert-parallel group (installed by `apply_ep`; not built directly)."""

    ep_group: dist.ProcessGroup
    ep_size: int
    ep_rank: int
    ep_grad_scale: float

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, D) -> out (B, T, D), router logits (B*T, E); the same steps as MoE.forward around the experts
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, idx = self.route(x)
        N, K = idx.shape
        E, ep = self.cfg.n_experts, self.ep_size
        E_l = E // ep
        flat = idx.reshape(-1)  # (N*K,)
        order = torch.argsort(flat, stable=True)
        token_of_row = order // K
        counts = torch.bincount(flat, minlength=E)  # rows per expert, experts of rank j contiguous
        xs = x[token_of_row]  # (N*K, D), grouped by expert, hence by destination rank

        # ---- dispatch: counts first (no grad), then the rows (autograd all-to-all) ----
        with torch.no_grad():
            recv = torch.empty_like(counts)
            dist.all_to_all_single(recv, counts, group=self.ep_group)
            R = recv.view(ep, E_l)  # R[i, l]: rows from rank i for my local expert l
            send_splits = counts.view(ep, E_l).sum(1).tolist()
            recv_splits = R.sum(1).tolist()
            # received rows are ordered (source rank, local expert); regroup expert-major (local expert, source
            # rank): within an expert the rows of rank 0 come first, as in the single process's sorted order
            starts = _exclusive_cumsum(R.reshape(-1)).view(ep, E_l).t().reshape(-1)
            lengths = R.t().reshape(-1)
            M = int(lengths.sum())
            seg_first = _exclusive_cumsum(lengths)
            perm = (torch.repeat_interleave(starts - seg_first, lengths, output_size=M)
                    + torch.arange(M, device=x.device))
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(M, device=x.device)
            local_counts = R.sum(0)  # (E_l,)
            offsets = torch.cumsum(local_counts, 0).to(torch.int32)
            expert_of_row = torch.repeat_interleave(torch.arange(E_l, device=x.device), local_counts, output_size=M)
        xr = all_to_all_single_autograd(xs, recv_splits, send_splits, self.ep_group)
        xr = xr[perm]

        # ---- the local experts (MoE.forward's expert compute) ----
        s = self.ep_grad_scale
        w_gate, w_up, w_down = _local(self.w_gate, s), _local(self.w_up, s), _local(self.w_down, s)
        b_gate, b_up, b_down = _local(self.b_gate, s), _local(self.b_up, s), _local(self.b_down, s)
        g = grouped_linear(xr, w_gate, local_counts, offsets, b_gate, expert_of_row)
        u = grouped_linear(xr, w_up, local_counts, offsets, b_up, expert_of_row)
        h = gated_activation(g, u, self.cfg)
        y = grouped_linear(h, w_down, local_counts, offsets, b_down, expert_of_row)
        if M == 0:
            # no rows for my experts: keep the graph connected (the combine's backward is a collective every rank
            # must join) and give the local experts zero gradients
            params = [t for t in (w_gate, w_up, w_down, b_gate, b_up, b_down) if t is not None]
            y = y + 0.0 * (xr.sum() + sum(t.sum() for t in params))

        # ---- combine: back to the source ranks in the order they were sent, then MoE.forward's weighting ----
        y = all_to_all_single_autograd(y[inv], send_splits, recv_splits, self.ep_group)
        y = y * weights.reshape(-1)[order, None]
        # MoE.forward's index_add, into a tensor of the output's shape (not a view: FSDP hooks the unit's outputs)
        out = torch.zeros(shape, dtype=x.dtype, device=x.device)
        out.view(-1, shape[-1]).index_add_(0, token_of_row, y.to(x.dtype))
        return out, logits


def _group_of(group: dist.ProcessGroup | DeviceMesh | None) -> dist.ProcessGroup | None:
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            group = group._flatten()
        return group.get_group()
    return group


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh, *, grad_divide: float | None = None) -> int:
    """Expert parallelism over the 1-D `ep_mesh` for every MoE module of `model` (a Transformer or a pipeline
    stage part): the expert weights and biases become DTensors Shard(0) on `ep_mesh`, the router stays as it is
    (replicated), and the module's forward dispatches tokens by all-to-all. `grad_divide` scales the experts'
    gradients by 1/grad_divide (default the EP size; see the module docstring). Returns the number of MoE
    modules converted (0 for a mesh of one rank: nothing changes). Call before FSDP (the order of
    giants.parallel.plan: TP -> EP -> AC/compile -> FSDP)."""
    if ep_mesh.ndim != 1:
        raise ValueError(f"apply_ep: the EP mesh must be 1-D, got dims {ep_mesh.mesh_dim_names}")
    ep = ep_mesh.size()
    if ep == 1:
        return 0
    group = ep_mesh.get_group()
    n = 0
    for mod in model.modules():
        if not isinstance(mod, MoE) or isinstance(mod, ExpertParallelMoE):
            continue
        E = mod.cfg.n_experts
        if E % ep:
            raise ValueError(f"apply_ep: --ep {ep} does not divide n_experts={E}")
        for name in EXPERT_PARAMS:
            p = getattr(mod, name)
            if p is None or isinstance(p, DTensor):
                continue
            mod.register_parameter(name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)]),
                                                      requires_grad=p.requires_grad))
        mod.__class__ = ExpertParallelMoE
        mod.ep_group, mod.ep_size, mod.ep_rank = group, ep, ep_mesh.get_local_rank()
        mod.ep_grad_scale = 1.0 / (ep if grad_divide is None else grad_divide)
        n += 1
    return n


def router_losses_global(router_logits: list[torch.Tensor], top_k: int,
                         group: dist.ProcessGroup | DeviceMesh | None = None,
                         token_mask: torch.Tensor | None = None) -> RouterLosses:
    """giants.train.losses.router_losses over the tokens of every rank of the data-parallel `group` (the ranks
    holding different tokens: dp_replicate x dp_shard, EP included; not TP or PP peers).

    One all-reduce (per call, all layers together) sums each layer's per-expert top-k hits, per-expert probability
    sums, token count and z-loss sum. The returned values equal those of one process on the concatenated batch on
    every rank; the gradient is that of a surrogate, linear in this rank's probabilities, whose mean over the group
    is the global loss, so gradients averaged over the group (the data-parallel convention) are the global loss's.
    Matches `router_losses` when the group has one rank (or group is None and no process group is initialised)."""
    if not router_logits:
        raise ValueError("router_losses_global: no router logits (is this a mixture-of-experts model?)")
    pg = _group_of(group)
    world = dist.get_world_size(pg) if dist.is_initialized() else 1
    E = router_logits[0].shape[-1]
    hits, psum, zsum, counts = [], [], [], []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        sel = torch.topk(probs, top_k, dim=-1).indices
        hit = F.one_hot(sel, E).sum(1).float()  # (N, E)
        z = torch.logsumexp(logits.float(), dim=-1).square()  # (N,)
        if token_mask is None:
            m = None
            counts.append(torch.tensor(float(probs.shape[0]), device=probs.device))
        else:
            m = token_mask.reshape(-1).to(probs.dtype)
            hit, probs, z = hit * m[:, None], probs * m[:, None], z * m
            counts.append(m.sum())
        hits.append(hit.sum(0))
        psum.append(probs.sum(0))
        zsum.append(z.sum())
    H, S, Z, n = torch.stack(hits), torch.stack(psum), torch.stack(zsum), torch.stack(counts)  # (L,E),(L,E),(L,),(L,)
    stats = torch.cat([H, S.detach(), Z.detach()[:, None], n[:, None]], dim=1)  # (L, 2E+2)
    if world > 1:
        stats = stats.clone()
        dist.all_reduce(stats, group=pg)
    Hg, Sg, Zg, ng = stats[:, :E], stats[:, E:2 * E], stats[:, 2 * E], stats[:, 2 * E + 1].clamp_min(1.0)
    f = Hg / ng[:, None]  # (L, E) share of tokens routing to each expert, global
    aux_value = E * (f * Sg / ng[:, None]).sum(1)  # (L,)
    aux_local = E * (f * S).sum(1) * world / ng  # mean over the group = the global loss; carries the gradient
    z_value = Zg / ng
    z_local = Z * world / ng
    aux = aux_value + (aux_local - aux_local.detach())
    z = z_value + (z_local - z_local.detach())
    util = (f / top_k).detach()
    return RouterLosses(aux.mean(), z.mean(), aux_value.detach(), z_value.detach(), util)
