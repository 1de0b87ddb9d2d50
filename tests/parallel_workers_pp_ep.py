"""Rank functions for tests/test_parallel_pp_ep.py (spawned by tests/dist_utils.run_ranks, so module-level).

Every case trains a tiny twin for STEPS steps both ways on each rank: the parallel layout on the rank's share
of the global batch, and the single-process reference on the whole global batch (same seed, same data), then
reports the worst relative error of the per-step losses and of the last step's gradients (every parameter the
rank holds, compared with the reference parameter of the same name; DTensor gradients compared whole)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

import giants
from giants.parallel.layout import ParallelDims
from giants.train.losses import causal_lm_loss, router_losses

STEPS = 5
VOCAB = 512  # the twins' 49,152-row vocabulary cut down: same code paths, a fraction of the CPU time
SEQ = 16
AUX, ZC = 0.02, 1e-3  # router-loss coefficients used on the MoE twins


def twin(name: str, n_layers: int | None = None) -> giants.ModelConfig:
    cfg = giants.get_config(name).replace(vocab_size=VOCAB)
    return cfg.replace(n_layers=n_layers) if n_layers else cfg


def batch(global_batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (global_batch, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def make_opt(params: list[torch.nn.Parameter], opt: str) -> torch.optim.Optimizer:
    # DTensor and plain parameters in separate groups (foreach kernels do not mix them)
    groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                          [p for p in params if not isinstance(p, DTensor)]) if g]
    if opt == "sgd":
        return torch.optim.SGD([{"params": g} for g in groups], lr=0.05)
    return torch.optim.AdamW([{"params": g} for g in groups], lr=1e-3, weight_decay=0.01, foreach=True)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


_REFS: dict[str, dict[str, Any]] = {}  # cases that share a reference (gpipe and 1f1b on one twin) train it once


def reference(cfg: giants.ModelConfig, global_batch: int, opt: str, router: bool = False,
              micro: int = 1) -> dict[str, Any]:
    """Single process on the global batch: per-step losses and the first and last steps' gradients. micro > 1
    splits each step into that many equal micro-batches with the loss divided by it (gradient accumulation).
    Memoized per process (deterministic, and only read afterwards)."""
    key = repr((cfg, global_batch, opt, router, micro))
    if key not in _REFS:
        _REFS[key] = _reference(cfg, global_batch, opt, router, micro)
    return _REFS[key]


def share_references(rank: int, world: int, args: list[tuple]) -> None:
    """Every rank would train the same references (deterministic: one seed, one thread, same data): instead each
    rank trains every world-th of them and all_gather_object hands each one to every rank, into the memo."""
    todo = list({repr(a): a for a in args}.items())
    mine = {key: _reference(*a) for i, (key, a) in enumerate(todo) if i % world == rank and key not in _REFS}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    for refs in gathered:
        _REFS.update(refs)


def _reference(cfg: giants.ModelConfig, global_batch: int, opt: str, router: bool, micro: int) -> dict[str, Any]:
    model = giants.build(cfg, seed=0)
    optim = make_opt(list(model.parameters()), opt)
    losses: list[float] = []
    grads: list[dict[str, torch.Tensor]] = []
    for step in range(STEPS):
        optim.zero_grad(set_to_none=True)
        ids, labels = batch(global_batch, step)
        total = 0.0
        for x, y in zip(ids.chunk(micro), labels.chunk(micro)):
            if router:
                logits, rl = model(x, output_router_logits=True)
                r = router_losses(rl, cfg.experts_per_token)
                loss = causal_lm_loss(logits, y) + AUX * r.aux_loss + ZC * r.z_loss
            else:
                loss = causal_lm_loss(model(x), y)
            (loss / micro).backward()
            total += float(loss.detach()) / micro
        losses.append(total)
        if step in (0, STEPS - 1):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        optim.step()
    return {"losses": losses, "first": grads[0], "last": grads[-1]}


def compare(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Worst relative errors: per-step losses, first-step and last-step gradients (norm of the difference over
    the norm of the reference, per parameter)."""
    out: dict[str, Any] = {"loss_err": max(abs(a - b) / abs(b) for a, b in zip(run["losses"], ref["losses"]))}
    for key in ("first", "last"):
        err, worst = 0.0, ""
        for name, g in run[key]:
            e = rel(g, ref[key][name])
            if e > err:
                err, worst = e, name
        out[f"{key}_grad_err"], out[f"{key}_worst"] = err, worst
    out["n_grads"] = len(run["last"])
    return out


def _avg_grads(params: list[torch.nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """The data-parallel mean of each gradient (DDP's all-reduce; DTensor gradients through their local shard)."""
    n = dist.get_world_size(group)
    if n == 1:
        return
    for p in params:
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(local, group=group)
        local.div_(n)


# ---- pipeline parallel ---------------------------------------------------------------------------------------

def _pp_ref_args(case: dict[str, Any], pp: int, world: int) -> dict[str, tuple]:
    """The references a PP case compares with: name -> reference() arguments."""
    cfg = twin(case["model"], case.get("n_layers"))
    dp = world // pp
    n_mb, opt = case.get("microbatches", 4), case.get("opt", "sgd")
    global_batch = case.get("local_batch", 4) * dp
    router = bool(case.get("router"))
    refs = {"accum": (cfg, global_batch, opt, router, n_mb * dp)}
    if not router:  # router losses are per micro-batch in a pipeline (as with gradient accumulation)
        refs["full"] = (cfg, global_batch, opt, False, 1)
    return refs


def _pp_case(case: dict[str, Any], pp: int) -> dict[str, Any]:
    """pp pipeline ranks; the rest of the world is dp_shard, parallelised by the plan (giants.parallel.plan:
    FSDP, and EP over dp_shard when the case says ep) on each stage part."""
    from giants.parallel.mesh import build_mesh, dp_coords
    from giants.parallel.pipeline import moe_router_loss_fn, pipeline_model

    cfg = twin(case["model"], case.get("n_layers"))
    dp = dist.get_world_size() // pp
    dims = ParallelDims(pp=pp, dp_shard=dp, pp_schedule=case["schedule"], ep=dp if case.get("ep") else 1)
    mesh = build_mesh(dims, "cpu")
    n_mb, opt = case.get("microbatches", 4), case.get("opt", "sgd")
    local_batch = case.get("local_batch", 4)
    router = bool(case.get("router"))
    refs = {name: reference(*args) for name, args in _pp_ref_args(case, pp, dist.get_world_size()).items()}

    model = giants.build(cfg, seed=0)
    parallelize = None
    if dp > 1:
        from giants.parallel.plan import parallelize as plan

        def parallelize(part: torch.nn.Module) -> None:
            plan(part, dims, mesh)
    aux_fn = moe_router_loss_fn(cfg, AUX, ZC) if router else None
    parts = pipeline_model(model, dims, mesh["pp"], causal_lm_loss, n_mb, parallelize_fn=parallelize,
                           aux_loss_fn=aux_fn)
    params = [p for part in parts.model_parts for p in part.parameters()]
    optim = make_opt(params, opt)
    d, _ = dp_coords(mesh)
    run: dict[str, Any] = {"losses": []}
    for step in range(STEPS):
        optim.zero_grad(set_to_none=True)
        ids, labels = batch(local_batch * dp, step)
        ids, labels = ids[d * local_batch:(d + 1) * local_batch], labels[d * local_batch:(d + 1) * local_batch]
        loss = parts.step(ids, labels)
        if dp > 1:
            dist.all_reduce(loss, group=mesh._giants_flat["dp"].get_group())
            loss = loss / dp
        run["losses"].append(float(loss))
        if step in (0, STEPS - 1):
            run["first" if step == 0 else "last"] = [(n, full(p.grad).clone()) for part in parts.model_parts
                                                      for n, p in part.named_parameters()]
        optim.step()
    out = {k: compare(run, r) for k, r in refs.items()}
    out["stages"] = [s.stage_index for s in parts.stages]
    out["layers"] = [list(part.layer_ids) for part in parts.model_parts]
    out["dtensor_params"] = sum(isinstance(p, DTensor) for p in params)
    return out


def pp_worker(rank: int, world: int, pp: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PP (pp = world), or PP x FSDP / PP x EP x FSDP (pp x dp_shard = world) through the plan."""
    out = []
    for case in cases:
        r = _pp_case(case, pp)
        r["case"] = case
        out.append(r)
    return out


# ---- expert parallel -----------------------------------------------------------------------------------------

def _ep_ref_args(case: dict[str, Any], world: int) -> tuple:
    """The reference an EP case compares with (router losses over the global batch): reference() arguments."""
    return twin(case["model"]), case.get("local_batch", 2) * world, case.get("opt", "sgd"), True, 1


def _ep_case(case: dict[str, Any], mesh: DeviceMesh) -> dict[str, Any]:
    from giants.parallel.expert import apply_ep, router_losses_global

    cfg = twin(case["model"])
    opt = case.get("opt", "sgd")
    world = dist.get_world_size()
    local_batch = case.get("local_batch", 2)
    ref = reference(*_ep_ref_args(case, world))

    model = giants.build(cfg, seed=0)
    plan = bool(case.get("plan"))
    if plan:  # the whole plan: EP over "ep", FSDP over dp_shard (router, dense) and dp_shard_mod_ep (experts)
        from giants.parallel.mesh import build_mesh
        from giants.parallel.plan import parallelize

        dims = ParallelDims(dp_shard=world, ep=case["ep"])
        mesh = build_mesh(dims, "cpu")
        parallelize(model, dims, mesh)
        dp_group = mesh._giants_flat["dp"].get_group()
    else:  # apply_ep alone; DDP-style gradient means below
        n = apply_ep(model, mesh["ep"])
        assert n == cfg.n_layers, n
        dp_group = dist.group.WORLD
    params = list(model.parameters())
    dense = [p for p in params if not isinstance(p, DTensor)]
    experts = [p for p in params if isinstance(p, DTensor)]
    optim = make_opt(params, opt)
    r = dist.get_rank()
    mod_group = None if plan else mesh["dp_shard_mod_ep"].get_group()
    run: dict[str, Any] = {"losses": []}
    for step in range(STEPS):
        optim.zero_grad(set_to_none=True)
        ids, labels = batch(local_batch * world, step)
        x, y = ids[r * local_batch:(r + 1) * local_batch], labels[r * local_batch:(r + 1) * local_batch]
        logits, rl = model(x, output_router_logits=True)
        g = router_losses_global(rl, cfg.experts_per_token, dp_group)
        loss = causal_lm_loss(logits, y) + AUX * g.aux_loss + ZC * g.z_loss
        loss.backward()
        if not plan:
            _avg_grads(dense, None)  # everything outside the experts: the mean over all data-parallel ranks
            _avg_grads(experts, mod_group)  # experts: summed over the EP group by the all-to-all, scaled 1/ep
        value = loss.detach().clone()
        dist.all_reduce(value)
        run["losses"].append(float(value) / world)
        if step in (0, STEPS - 1):
            run["first" if step == 0 else "last"] = [(nm, full(p.grad).clone()) for nm, p in model.named_parameters()]
        optim.step()
    return {"full": compare(run, ref)}


def ep_worker(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    meshes: dict[int, DeviceMesh] = {}
    for case in cases:
        ep = case["ep"]
        if ep not in meshes:
            meshes[ep] = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp_shard_mod_ep", "ep"))
        r = _ep_case(case, meshes[ep])
        r["case"] = case
        out.append(r)
    return out


def forward_equal_worker(rank: int, world: int, names: list[str]) -> dict[str, float]:
    """EP forward (outputs and router logits) against one process on the same tokens: max abs difference."""
    from giants.parallel.expert import apply_ep

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    out = {}
    for name in names:
        cfg = twin(name)
        ref, model = giants.build(cfg, seed=0), giants.build(cfg, seed=0)
        apply_ep(model, mesh)
        ids, _ = batch(2 * world, 0)
        with torch.no_grad():
            want, want_rl = ref(ids, output_router_logits=True)
            got, got_rl = model(ids[2 * rank:2 * rank + 2], output_router_logits=True)
        n = 2 * SEQ
        out[name] = max(float((got - want[2 * rank:2 * rank + 2]).abs().max()),
                        max(float((a - b[rank * n:(rank + 1) * n]).abs().max()) for a, b in zip(got_rl, want_rl)))
    return out


def all_workers(rank: int, world: int, jobs: list[tuple[str, tuple]]) -> list[Any]:
    """Several workers in one spawn (one process group): [(name, args), ...] -> their results, in order."""
    fns = {"pp": pp_worker, "ep": ep_worker, "forward": forward_equal_worker}
    refs: list[tuple] = []
    for name, args in jobs:
        if name == "pp":
            refs += [a for case in args[1] for a in _pp_ref_args(case, args[0], world).values()]
        elif name == "ep":
            refs += [_ep_ref_args(case, world) for case in args[0]]
    share_references(rank, world, refs)
    return [fns[name](rank, world, *args) for name, args in jobs]

