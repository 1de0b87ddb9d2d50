"""Rank functions for tests/test_parallel_tp_fsdp.py (spawned by tests/dist_utils.run_ranks, so module level).

Every rank trains the single-process reference itself (same seed, same global batch), then the parallel layout on
its share of the batch, and reports the largest relative differences (losses every step; gradients at the last
step; parameters after it) per family and layout. The test asserts on them, naming what differs."""

from __future__ import annotations

from typing import Any

import torch

FAMILIES = ("tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss", "tiny-gpt-oss-described")
VOCAB, BATCH, SEQ, STEPS = 512, 4, 16, 5
AUX_COEF, Z_COEF = 0.02, 0.001
# layout name -> (ParallelDims.infer keywords, parallelize keywords)
LAYOUTS: dict[int, dict[str, tuple[dict[str, int], dict[str, Any]]]] = {
    2: {
        "fsdp": (dict(), dict()),
        "tp": (dict(tp=2), dict()),
        "tp_nosp": (dict(tp=2), dict(sequence_parallel=False, loss_parallel=False)),
    },
    4: {
        "fsdp": (dict(), dict()),
        "tp": (dict(tp=4), dict()),
        "hsdp": (dict(dp_replicate=2), dict()),
        "fsdp_tp_ac": (dict(tp=2), dict(activation_checkpointing=True)),
        "hsdp_tp": (dict(dp_replicate=2, tp=2), dict(reshard_after_forward=False)),
    },
}
# layouts beyond the list run on the families that exercise the most (test time): a tied head and soft-caps,
# MoE with sinks and biases
EXTRA_LAYOUTS = {"hsdp_tp": ("tiny-gemma2", "tiny-gpt-oss")}


def layout_keys(world: int, families: tuple[str, ...] = FAMILIES) -> list[str]:
    return [f"{fam}/{lay}" for fam in families for lay in LAYOUTS[world] if fam in EXTRA_LAYOUTS.get(lay, families)]


def tiny_config(name: str, tp: int = 1) -> Any:
    """The tiny twin with a 512-token vocabulary and at most 2 layers (speed: tiny-gemma2's 4 alternate a sliding-
    window and a global layer, which 2 keep); for tp=4 the twins with 2 KV heads get 8 query / 4 KV heads (GQA
    kept, every head count divisible by 4)."""
    import giants

    cfg = giants.get_config(name).replace(vocab_size=VOCAB)
    cfg = cfg.replace(n_layers=min(cfg.n_layers, 2))
    if cfg.n_kv_heads % tp:
        cfg = cfg.replace(n_heads=2 * tp, n_kv_heads=tp)
    return cfg


def batches(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches (inputs, shifted targets); some targets ignored (-100), unevenly over the rows, so
    data-parallel ranks hold different token counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
        y[0, : 3 + step] = -100
        y[2, -2:] = -100
        out.append((x, y))
    return out


def _loss_terms(model: Any, x: torch.Tensor, y: torch.Tensor, cfg: Any, aux: bool) -> tuple[torch.Tensor, ...]:
    from giants.parallel.loss import cross_entropy
    from giants.train.losses import router_losses

    if aux:
        logits, router_logits = model(x, output_router_logits=True)
        rl = router_losses(router_logits, cfg.experts_per_token)
        extra = AUX_COEF * rl.aux_loss + Z_COEF * rl.z_loss
    else:
        logits, extra = model(x), None
    return cross_entropy(logits, y, reduction="sum"), extra


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # eps 1e-5, not 1e-8: Adam's update g / (sqrt(v) + eps) is ~sign(g) for |g| >> eps, so a gradient that is tiny
    # and known only to fp32 summation-order noise (Gemma 2's zero-initialised norm offsets: first-step gradients
    # agree to 1.5e-7, yet parameters then differed by 2.4e-5 with eps 1e-8) would flip its parameter's whole step;
    # a larger eps keeps the comparison about the parallel plan, not about Adam's conditioning near g = 0.
    # lr 1e-4: how far one fp32 process's own step-5 gradients are from fp64 grows with the step size (Gemma 2's
    # k_proj, measured: 1.1e-5 at lr 1e-3, 2.9e-6 at 3e-4, 1.6e-6 at 1e-4); any other summation order (a parallel
    # plan) lands that far away too, so 1e-5 is only a fair bound where the problem's own floor is well below it.
    return torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-5, weight_decay=0.1, foreach=True, fused=False)


def reference(cfg: Any, data: list, aux: bool) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, whole batch: per-step losses, the last step's gradients, the parameters after it."""
    import giants

    model = giants.build(cfg, seed=0)
    opt = _optimizer(model)
    losses = []
    grads: dict[str, torch.Tensor] = {}
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        ce_sum, extra = _loss_terms(model, x, y, cfg, aux)
        loss = ce_sum / (y != -100).sum()
        if extra is not None:
            loss = loss + extra
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, grads, params


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def parallel_run(cfg: Any, data: list, world: int, dims_kw: dict, plan_kw: dict, aux: bool
                 ) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """The same training on `world` ranks with the layout: per-step global losses, last gradients and parameters
    (gathered whole), and any parameter whose tensor-parallel placement differs from tp_split."""
    import giants
    from giants.parallel import ParallelDims
    from giants.parallel.loss import data_parallel_loss, token_count
    from giants.parallel.mesh import build_mesh, dp_coords, mesh_dim
    from giants.parallel.plan import parallelize
    from giants.parallel.tensor import check_tp_placements

    dims = ParallelDims.infer(world, **dims_kw)
    mesh = build_mesh(dims, "cpu")
    model = giants.build(cfg, seed=0)
    parallelize(model, dims, mesh, **plan_kw)
    bad: list[str] = []
    if dims.tp > 1:
        try:
            check_tp_placements(model)
        except ValueError as e:
            bad.append(str(e))
    opt = _optimizer(model)
    dp_rank, dp_size = dp_coords(mesh)
    dp_mesh = mesh_dim(mesh, "dp")
    rows = BATCH // dp_size
    losses = []
    grads: dict[str, torch.Tensor] = {}
    for step, (x, y) in enumerate(data):
        xs, ys = x[dp_rank * rows:(dp_rank + 1) * rows], y[dp_rank * rows:(dp_rank + 1) * rows]
        opt.zero_grad(set_to_none=True)
        ce_sum, extra = _loss_terms(model, xs, ys, cfg, aux)
        loss, logged = data_parallel_loss(ce_sum, token_count(ys, dp_mesh=dp_mesh), dp_mesh)
        if extra is not None:  # router losses: only without data parallelism (every rank sees every token)
            assert dp_size == 1
            loss, logged = loss + extra, logged + extra.detach()
        loss.backward()
        losses.append(logged.item())
        if step == len(data) - 1:  # only the last step's gradients are compared (gathering whole is a collective)
            grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
        opt.step()
    params = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    return losses, grads, params, bad


def compare_layouts(rank: int, world: int, families: tuple[str, ...] = FAMILIES) -> dict[str, dict[str, Any]]:
    """For every family and every layout of this world size: the worst relative loss difference over the steps,
    the worst parameter-gradient and parameter differences (with the parameter's name) and placement errors."""
    import torch.distributed as dist

    data = batches()
    out: dict[str, dict[str, Any]] = {}
    runs = []
    for fam in families:
        for layout, (dims_kw, plan_kw) in LAYOUTS[world].items():
            if fam not in EXTRA_LAYOUTS.get(layout, families):
                continue
            tp = dims_kw.get("tp", 1)
            cfg = tiny_config(fam, tp)
            # router losses are a product of two means over tokens: one process's value equals the parallel one only
            # when every rank sees every token (tensor parallel alone)
            aux = cfg.is_moe and world == tp
            runs.append((fam, layout, dims_kw, plan_kw, cfg, aux))
    # the references are deterministic (one seed, one thread, the same data), so rather than every rank training
    # each of them, each rank trains every world-th one and all_gather_object hands them to every rank
    todo = {(repr(cfg), aux): (cfg, aux) for _, _, _, _, cfg, aux in runs}  # each distinct reference once
    mine = {k: reference(cfg, data, aux) for i, (k, (cfg, aux)) in enumerate(todo.items()) if i % world == rank}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    refs = {k: v for g in gathered for k, v in g.items()}
    for fam, layout, dims_kw, plan_kw, cfg, aux in runs:
        ref_losses, ref_grads, ref_params = refs[(repr(cfg), aux)]
        losses, grads, params, bad = parallel_run(cfg, data, world, dims_kw, plan_kw, aux)
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        g_err = max((_rel(grads[n], ref_grads[n]), n) for n in ref_grads)
        p_err = max((_rel(params[n], ref_params[n]), n) for n in ref_params)
        out[f"{fam}/{layout}"] = dict(loss=loss_err, grad=g_err, param=p_err, placement=bad,
                                      losses=losses, ref_losses=ref_losses)
    return out


def world_checks(rank: int, world: int) -> dict[str, Any]:
    """Everything one spawn of `world` ranks checks: the layouts, the vocab-parallel loss, (world 4) the mesh."""
    out: dict[str, Any] = {"layouts": compare_layouts(rank, world), "vocab_loss": vocab_parallel_loss(rank, world)}
    if world == 4:
        out["mesh"] = mesh_names(rank, world)
    if world == 2:
        out["misc"] = misc_checks(rank, world)
        out["shutdown"] = shutdown_checks(rank, world)  # last: it ends the process group
    return out


def shutdown_checks(rank: int, world: int) -> dict[str, Any]:
    """The orderly shutdown waits for every rank (rank 1 arrives a second late), then no group is left."""
    import time

    import torch.distributed as dist

    from giants.parallel.mesh import shutdown_distributed

    if rank == 1:
        time.sleep(1.0)
    t0 = time.monotonic()
    shutdown_distributed(orderly=True)
    return {"waited_s": time.monotonic() - t0, "initialized_after": dist.is_initialized()}


def misc_checks(rank: int, world: int) -> dict[str, Any]:
    """init_distributed on a running group; a sequence length sequence parallelism cannot split is refused."""
    import giants
    from giants.parallel import ParallelDims
    from giants.parallel.mesh import build_mesh, init_distributed
    from giants.parallel.plan import parallelize

    info = init_distributed(device_type="cpu")
    out: dict[str, Any] = {"info": (info.rank, info.world_size, info.local_rank, str(info.device))}
    dims = ParallelDims.infer(world, tp=world)
    model = parallelize(giants.build(tiny_config("tiny-llama"), seed=0), dims, build_mesh(dims, "cpu"))
    try:
        model(torch.zeros(1, SEQ - 1, dtype=torch.long))
        out["odd_len"] = None
    except ValueError as e:
        out["odd_len"] = str(e)
    return out


def mesh_names(rank: int, world: int) -> dict[str, Any]:
    """build_mesh's named dims and their sizes for an EP layout and a TP x HSDP layout."""
    from giants.parallel import ParallelDims
    from giants.parallel.mesh import build_mesh, dp_coords, fsdp_mesh, mesh_dim

    out: dict[str, Any] = {}
    for label, kw in (("ep", dict(ep=2)), ("hsdp_tp", dict(dp_replicate=2, tp=2))):
        dims = ParallelDims.infer(world, **kw)
        mesh = build_mesh(dims, "cpu")
        sizes = {}
        for n in ("pp", "dp_replicate", "dp_shard", "dp_shard_mod_ep", "ep", "tp", "dp"):
            m = mesh_dim(mesh, n)
            sizes[n] = None if m is None else m.size()
        f = fsdp_mesh(mesh)
        out[label] = dict(names=mesh.mesh_dim_names, sizes=sizes, dp=dp_coords(mesh),
                          fsdp=None if f is None else (f.mesh_dim_names, tuple(f.shape)))
    return out


def vocab_parallel_loss(rank: int, world: int) -> dict[str, float]:
    """cross_entropy on Shard(-1) DTensor logits (mean / sum / none) against the plain computation: values and the
    logits' gradient, with the backward run outside any loss_parallel context."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from giants.parallel.loss import cross_entropy

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 8 * world, generator=g)
    y = torch.randint(0, 8 * world, (3, 5), generator=g)
    y[1, :2] = -100
    out = {}
    for reduction in ("mean", "sum", "none"):
        ref_in = logits.clone().requires_grad_(True)
        ref = F.cross_entropy(ref_in.flatten(0, 1), y.flatten(), reduction="none").view(3, 5)
        ref = {"mean": ref.sum() / (y != -100).sum(), "sum": ref.sum(), "none": ref}[reduction]
        w = torch.rand(ref.shape, generator=g)
        (ref * w).sum().backward()
        leaf = logits.chunk(world, dim=2)[rank].clone().requires_grad_(True)  # this rank's vocabulary shard
        d = DTensor.from_local(leaf, mesh, [Shard(2)])
        got = cross_entropy(d, y, reduction=reduction)
        (got * w).sum().backward()
        out[reduction] = max(_rel(got.detach(), ref.detach()), _rel(leaf.grad, ref_in.grad.chunk(world, dim=2)[rank]))
        out[f"{reduction}_type"] = type(got).__name__
    return out
