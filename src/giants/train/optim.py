"""AdamW over fp32 master weights for a model whose matmul weights are stored in bf16.

Under bf16 autocast every matmul reads bf16(w): autocast casts each fp32 weight to bf16 in the forward
(once a step per weight) and casts each bf16 weight gradient back to fp32 in the backward. `MasterAdamW`
keeps those weights in bf16 in the model itself, so neither cast runs, and holds the fp32 master copy and the
fp32 moments here. One pass per tensor reads the (bf16) gradient, divides by the clip scale, updates master
and moments (torch.optim.AdamW's math: decoupled weight decay, bias correction) and writes the new bf16 weight.
The forward and backward compute exactly what autocast over fp32 weights computes: the same bf16 weights
(round-to-nearest of the master), the same bf16 gradients.

Parameters that stay fp32 in the model (norms, the embedding, anything not given to `cast`) are their own
master: the update runs on them in place, as AdamW would.

`param_groups` hold the fp32 masters, so `state_dict`/`load_state_dict` (moments keyed by position) behave as
torch.optim.AdamW's. `masters_in_model()` puts the masters into the model for the time of a checkpoint write
or load (`giants.save` then writes fp32), and writes the bf16 weights back from the masters on exit.

Gradient accumulation: autocast over fp32 weights sums the micro-batches' gradients in fp32 (each bf16 weight
gradient is cast to fp32, then added to `.grad`). bf16 parameters would get bf16 `.grad` and sum in bf16, so a run
that accumulates calls `accumulate()` after each micro-batch's backward: it moves the bf16 gradients into fp32 sums
held here (the same fp32 additions, in the same order) and clears `.grad`. `grads()` and `step()` read those sums.

On CUDA the update is one Triton kernel launch per tensor; elsewhere (or without Triton) plain torch ops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    _HAS_TRITON = False


if _HAS_TRITON:

    @triton.jit
    def _adamw_kernel(master_ptr, grad_ptr, m_ptr, v_ptr, out_ptr, scale_ptr, skip_ptr, n, lr_wd, beta1, beta2,
                      eps, step_size, bc2_sqrt, HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr,
                      WEIGHT_DECAY: tl.constexpr, WRITE_OUT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if HAS_SKIP:
            # a non-finite step (found_inf != 0) leaves every tensor as it was: no loads, no stores
            n = tl.where(tl.load(skip_ptr) == 0, n, 0)
        mask = offs < n
        p = tl.load(master_ptr + offs, mask=mask)
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        if HAS_SCALE:
            g = tl.div_rn(g, tl.load(scale_ptr))
        if WEIGHT_DECAY:
            p = p - lr_wd * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denom)
        tl.store(master_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if WRITE_OUT:
            # round to nearest even, as torch.Tensor.to does (the master rounded, not truncated)
            tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def _accumulate_kernel(acc_ptr, grad_ptr, n, FIRST: tl.constexpr, BLOCK: tl.constexpr):
        # acc (fp32) = grad, or acc + grad: the fp32 sum autograd forms in an fp32 parameter's .grad
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        if not FIRST:
            g = tl.load(acc_ptr + offs, mask=mask) + g
        tl.store(acc_ptr + offs, g, mask=mask)

    @triton.jit
    def _sumsq_kernel(ptrs_ptr, block_tensor_ptr, block_start_ptr, numel_ptr, out_ptr, DTYPE: tl.constexpr,
                      BLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr):
        # one program per PER_PROGRAM * BLOCK elements of one tensor; tensors are found through a table of their
        # addresses, so one launch covers every gradient of a dtype. (Several blocks a program: the table lookups
        # are dependent loads, paid once per program.)
        pid = tl.program_id(0)
        t = tl.load(block_tensor_ptr + pid)
        start = tl.load(block_start_ptr + pid)
        n = tl.load(numel_ptr + t)
        # the table's addresses are 16-byte aligned (checked on the host) and blocks start at multiples of BLOCK:
        # saying so lets the loads vectorise (without it the pass ran at ~2.4 TB/s on an H200)
        base = tl.multiple_of(tl.load(ptrs_ptr + t).to(tl.pointer_type(DTYPE)), 16)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(PER_PROGRAM):
            offs = tl.multiple_of(start + i * BLOCK, BLOCK) + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc += x * x
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))


# 1024 elements a program, 4 warps: 8.9 ms for 1.24 B parameters on an H200 (3.9 TB/s counting 28 bytes a
# parameter, the device-to-device copy rate); 4096/8 took 9.7 ms, 8192/8 12.3 ms.
BLOCK, NUM_WARPS = 1024, 4


SUMSQ_BLOCK, SUMSQ_PER_PROGRAM = 4096, 8  # 32768 elements a program
_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_block_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _sumsq_tables(sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tensor index, first element) of every program, and the tensors' sizes, on `device`; cached by sizes."""
    key = (sizes, str(device))
    if key not in _block_tables:
        tensor_of, start_of = [], []
        for i, n in enumerate(sizes):
            starts = range(0, n, SUMSQ_BLOCK * SUMSQ_PER_PROGRAM)
            tensor_of += [i] * len(starts)
            start_of += starts
        _block_tables[key] = (torch.tensor(tensor_of, dtype=torch.int32, device=device),
                              torch.tensor(start_of, dtype=torch.int64, device=device),
                              torch.tensor(sizes, dtype=torch.int64, device=device))
    return _block_tables[key]


def _sumsq_triton(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of every element of `grads` (CUDA, contiguous): one launch per dtype, partial sums per
    block of SUMSQ_BLOCK elements, summed in fp32 in a fixed order (deterministic)."""
    parts = []
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, gs in by_dtype.items():
        device = gs[0].device
        tensor_of, start_of, numel = _sumsq_tables(tuple(g.numel() for g in gs), device)
        # the addresses change from step to step (new gradient tensors): a pinned copy queued on the stream
        ptrs = torch.tensor([g.data_ptr() for g in gs], dtype=torch.int64).pin_memory().to(device, non_blocking=True)
        out = torch.empty(tensor_of.numel(), dtype=torch.float32, device=device)
        _sumsq_kernel[(tensor_of.numel(),)](ptrs, tensor_of, start_of, numel, out,
                                            DTYPE=getattr(tl, _TL_DTYPES[dtype]), BLOCK=SUMSQ_BLOCK,
                                            PER_PROGRAM=SUMSQ_PER_PROGRAM, num_warps=8)
        parts.append(out.sum())
    return torch.stack(parts).sum()


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads` (any float dtypes) as an fp32 0-dim tensor, squares summed in fp32.
    On CUDA one Triton launch per dtype reads every gradient once (torch's `_foreach_norm` with an fp32
    result ran one reduction kernel per bf16 tensor: 1.6 ms for 1.24 B parameters on an H200)."""
    if not grads:
        return torch.zeros(())
    if (_HAS_TRITON and all(g.is_cuda and g.is_contiguous() and g.dtype in _TL_DTYPES and g.data_ptr() % 16 == 0
                            for g in grads) and len({g.device for g in grads}) == 1):
        return _sumsq_triton(grads).sqrt()
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))


class MasterAdamW(torch.optim.Optimizer):
    """AdamW whose state (master weights, moments) is fp32 while some model parameters are bf16.

    groups: like torch.optim.AdamW's (dicts with "params" and optional "weight_decay"), holding the model's
    parameters. `cast`: the parameters to store in `compute_dtype` (converted here, in place; the fp32 value
    is kept as the master). `shadow`: fp32 parameters that stay fp32 in the model and also get a `compute_dtype`
    copy, `shadow_of(p)`, which every update rewrites from the new value (the tied embedding's copy for the output
    head; see giants.train.tied_head). Set `grad_scale` (a 0-dim tensor) before `step()` to divide every gradient by it
    as it is read (the gradient-clipping scale); the Trainer clears it after the step. Set `found_inf` (a 0-dim
    fp32 tensor, as torch's fused AdamW takes it) to make the step a no-op on the device when it is nonzero,
    without a host sync. (The step count, kept on the host, still advances: the Trainer stops the run on such a
    step and resumes from the last checkpoint.)
    """

    def __init__(self, groups: Iterable[dict], *, cast: Iterable[torch.Tensor] = (),
                 shadow: Iterable[torch.Tensor] = (), lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, compute_dtype: torch.dtype = torch.bfloat16,
                 use_triton: bool | None = None) -> None:
        groups = [dict(g) for g in groups]
        to_cast = {id(p) for p in cast}
        shadow = list(shadow)
        if any(id(p) in to_cast for p in shadow):
            raise ValueError("MasterAdamW: a parameter cannot be both cast and shadowed")
        self.model_params: list[torch.nn.Parameter] = []
        master_groups = []
        with torch.no_grad():
            for g in groups:
                masters = []
                for p in g["params"]:
                    if p.dtype != torch.float32:
                        raise ValueError(f"MasterAdamW: parameters must start in fp32 (got {p.dtype})")
                    if id(p) in to_cast:
                        master = p.detach().clone(memory_format=torch.contiguous_format)
                        p.data = p.data.to(compute_dtype)
                    else:
                        master = p  # fp32 in the model: its own master, updated in place
                    self.model_params.append(p)
                    masters.append(master)
                master_groups.append({**g, "params": masters})
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(master_groups, defaults)
        self.masters: list[torch.Tensor] = [q for g in self.param_groups for q in g["params"]]
        known = {id(q) for q in self.masters}
        for p in shadow:
            if id(p) not in known:
                raise ValueError("MasterAdamW: a shadowed parameter must be one of the optimised parameters")
        # fp32 parameters that also get a compute_dtype copy, rewritten by every update (`shadow_of`)
        self._shadows: dict[int, torch.Tensor] = {id(p): p.detach().to(compute_dtype) for p in shadow}
        self.grad_scale: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None
        self.use_triton = use_triton
        # fp32 gradient sums of the cast parameters (`accumulate`), kept from step to step; `_live`: the ones
        # holding this step's sum
        self._acc: dict[int, torch.Tensor] = {}
        self._live: set[int] = set()

    # ---- gradients ---------------------------------------------------------------------------------
    def grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient `step()` applies to model parameter p: its fp32 sum after `accumulate()`, else p.grad."""
        return self._acc[id(p)] if id(p) in self._live else p.grad

    def grads(self) -> list[torch.Tensor]:
        return [g for g in map(self.grad_of, self.model_params) if g is not None]

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the cast parameters' compute-dtype gradients into their fp32 sums and clear `.grad` (call after
        every micro-batch's backward, the last included, when accumulating). Parameters that stay fp32 in the
        model keep accumulating in `.grad`, as autograd does."""
        for p, q in self._pairs():
            g = p.grad
            if g is None:
                continue
            acc = self._acc.get(id(p))
            if acc is None:
                acc = self._acc[id(p)] = torch.empty_like(q, memory_format=torch.contiguous_format)
            first = id(p) not in self._live
            if self._triton_ok(acc, g):
                # (one vectorised pass; torch's mixed-dtype add would take its dynamic-casting path)
                n = acc.numel()
                _accumulate_kernel[(triton.cdiv(n, BLOCK),)](acc, g, n, FIRST=first, BLOCK=BLOCK,
                                                             num_warps=NUM_WARPS)
            elif first:
                acc.copy_(g)
            else:
                acc.add_(g)
            self._live.add(id(p))
            p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._live.clear()
        for p in self.model_params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def shadow_of(self, p: torch.Tensor) -> torch.Tensor:
        """The compute-dtype copy of a shadowed parameter (same storage from step to step)."""
        return self._shadows[id(p)]

    # ---- the masters inside the model ---------------------------------------------------------------
    def _pairs(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        return ((p, q) for p, q in zip(self.model_params, self.masters) if p is not q)

    @torch.no_grad()
    def sync_model(self) -> None:
        """Write every bf16 model weight and shadow from its master (round to nearest)."""
        for p, q in self._pairs():
            p.copy_(q)
        for q in self.masters:
            if id(q) in self._shadows:
                self._shadows[id(q)].copy_(q)

    @contextlib.contextmanager
    def masters_in_model(self) -> Iterator[None]:
        """Within: the model's parameters are the fp32 masters (a checkpoint save writes them, a load writes
        into them). On exit the model gets its bf16 weights back, recomputed from the (maybe loaded) masters."""
        pairs = list(self._pairs())
        low = [p.data for p, _ in pairs]
        for p, q in pairs:
            p.data = q
        try:
            yield
        finally:
            for (p, _), d in zip(pairs, low):
                p.data = d
            self.sync_model()

    # ---- the update ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        model_of = {id(q): p for p, q in zip(self.model_params, self.masters)}
        scale, skip = self.grad_scale, self.found_inf
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for q in group["params"]:
                p = model_of[id(q)]
                grad = self.grad_of(p)
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("MasterAdamW does not support sparse gradients")
                st = self.state[q]
                if not st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(q, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(q, memory_format=torch.preserve_format)
                st["step"] += 1
                step = float(st["step"])
                out = p if p is not q else self._shadows.get(id(q))
                self._update(q, grad, st["exp_avg"], st["exp_avg_sq"], out, scale, lr=lr, wd=wd, beta1=beta1,
                             beta2=beta2, eps=eps, step=step, skip=skip)
        return loss

    def _triton_ok(self, *tensors: torch.Tensor | None) -> bool:
        if self.use_triton is False or not _HAS_TRITON:
            return False
        ts = [t for t in tensors if t is not None]
        return all(t.is_cuda and t.is_contiguous() for t in ts)

    def _update(self, master: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor | None, scale: torch.Tensor | None, *, lr: float, wd: float, beta1: float,
                beta2: float, eps: float, step: int | float, skip: torch.Tensor | None = None) -> None:
        bc1 = 1 - beta1 ** step
        bc2_sqrt = math.sqrt(1 - beta2 ** step)
        step_size = lr / bc1
        if self._triton_ok(master, grad, m, v, out, scale):
            n = master.numel()
            _adamw_kernel[(triton.cdiv(n, BLOCK),)](
                master, grad, m, v, out if out is not None else master, scale if scale is not None else master,
                skip if skip is not None else master, n, lr * wd, beta1, beta2, eps, step_size, bc2_sqrt,
                HAS_SCALE=scale is not None, HAS_SKIP=skip is not None, WEIGHT_DECAY=wd != 0,
                WRITE_OUT=out is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
            return
        if skip is not None and bool(skip):  # the torch path reads the flag on the host (free on CPU)
            return
        # torch.optim.AdamW's single-tensor update (foreach=False), in fp32
        g = grad.float() if grad.dtype != torch.float32 else grad
        if scale is not None:
            g = g / scale
        if wd != 0:
            master.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        master.addcdiv_(m, denom, value=-step_size)
        if out is not None:
            out.copy_(master)


def matmul_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters autocast would run in bf16 anyway: nn.Linear weights and biases, and MoE layers'
    stacked expert matrices (cast to bf16 for their grouped GEMMs). Not the embedding (its lookup output
    feeds the fp32 residual stream), norms, sinks or position tables."""
    from giants.model.mlp import MoE

    out: list[torch.nn.Parameter] = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            out += [p for p in (mod.weight, mod.bias) if p is not None]
        elif isinstance(mod, MoE):
            out += [p for p in (mod.w_gate, mod.w_up, mod.w_down) if p is not None]
    return out
