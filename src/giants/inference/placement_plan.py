"""Layer placement's planning (`device_map`): unit sizes, memory budgets, and the plan of units to devices
("auto" = "balanced", "sequential", or a dict as accelerate takes), after accelerate's `infer_auto_device_map`.
The placed model's run time is giants.inference.placement."""

from __future__ import annotations

import os
import re

import torch
from torch import nn

UNIT_ORDER = ("embed", "rel_bias", "layers", "norm", "lm_head")
_NEVER_STREAMED = ("embed", "rel_bias", "norm", "lm_head")
STRATEGIES = ("auto", "balanced", "sequential")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


# ---- sizes and devices ------------------------------------------------------------------------------
def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string like "70GiB", "200GB", "512MiB" (GB = 10^9, GiB = 2^30, as accelerate)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"max_memory: a size must be >= 0 (got {value})")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"max_memory: cannot read size {value!r} (examples: 70GiB, 200GB, 512MiB, 10**9)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def device_name(value: object, what: str, exists: bool = True) -> str:
    """'cuda:N' | 'cpu' | 'disk' for a device_map / max_memory value; `what` names it in the error. exists:
    refuse a GPU this machine does not have."""
    orig = value
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"cuda:{value}"
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("cpu", "disk"):
            return v
        if v == "cuda":
            v = "cuda:0"
        m = re.fullmatch(r"cuda:(\d+)", v)
        if m and not exists:
            return v
        if m:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if int(m.group(1)) >= n:
                raise ValueError(f"{what}: device {orig!r} does not exist ({n} CUDA device{'s' * (n != 1)} here)")
            return v
    raise ValueError(f"{what}: unknown device {orig!r} (a GPU index, 'cuda:N', 'cpu' or 'disk')")


def _nbytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The placeable units of a Transformer in execution order."""
    out: list[tuple[str, nn.Module]] = [("embed", model.embed)]
    if model.rel_bias is not None:
        out.append(("rel_bias", model.rel_bias))
    out += [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    out.append(("norm", model.norm))
    if model.lm_head is not None:
        out.append(("lm_head", model.lm_head))
    return out


def unit_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of every unit (the model may be on the meta device, already cast to its dtype)."""
    return {name: _nbytes(m) for name, m in units(model)}


def _available_cpu() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_max_memory(gpu_fraction: float = 0.9) -> dict[str, int]:
    """Every visible GPU at `gpu_fraction` of its free memory, the CPU at its available RAM."""
    out = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(i)
            out[f"cuda:{i}"] = int(free * gpu_fraction)
    out["cpu"] = _available_cpu()
    return out


def _budgets(max_memory: dict | None, exists: bool = True) -> dict[str, int]:
    if max_memory is None:
        return default_max_memory()
    if not isinstance(max_memory, dict):
        raise ValueError(f"max_memory: expected a dict like {{0: '70GiB', 'cpu': '200GiB'}} (got {max_memory!r})")
    out: dict[str, int] = {}
    for k, v in max_memory.items():
        d = device_name(k, "max_memory", exists)
        if d != "disk":
            out[d] = parse_size(v)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == "cpu", kv[0])))


# ---- planning -----------------------------------------------------------------------------------------
def infer_device_map(model: nn.Module, max_memory: dict | None = None, strategy: str = "auto") -> dict[str, str]:
    """unit -> device for a (meta) model within max_memory (see the module docstring)."""
    return plan_units(unit_sizes(model), _budgets(max_memory), strategy)


def plan_units(sizes: dict[str, int], budgets: dict[str, int], strategy: str = "auto", offload_reserve: int = 2
               ) -> dict[str, str]:
    """The planner on plain numbers: unit sizes (execution order) and device budgets in bytes ('cuda:N' in
    order, 'cpu') -> unit -> device. When any block is streamed, `offload_reserve` of the largest block stay
    free on the main device (the slots)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"device_map: unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)}, or a dict)")
    budgets = dict(budgets)
    gpus = [d for d in budgets if d.startswith("cuda")]
    layers = [n for n in sizes if n.startswith("layers.")]
    biggest = max((sizes[n] for n in layers), default=0)
    if strategy in ("auto", "balanced") and len(gpus) > 1:
        per_gpu = sum(sizes.values()) // len(gpus) + int(1.25 * biggest)
        for g in gpus[:-1]:
            budgets[g] = min(budgets[g], per_gpu)
    plan = _plan(sizes, budgets, gpus)
    main = gpus[0] if gpus else "cpu"
    if any(_streamed(plan[n], main) for n in layers):
        budgets[main] = max(0, budgets.get(main, 0) - offload_reserve * biggest)
        plan = _plan(sizes, budgets, gpus)
    return plan


def _plan(sizes: dict[str, int], budgets: dict[str, int], gpus: list[str]) -> dict[str, str]:
    left = dict(budgets)
    left.setdefault("cpu", 0)
    plan: dict[str, str] = {}
    first = [*gpus, "cpu"]
    head = sizes["norm"] + sizes.get("lm_head", 0)
    lead = sizes["embed"] + sizes.get("rel_bias", 0)
    dev = next((d for d in first if left[d] >= lead), "cpu")
    for n in ("embed", "rel_bias"):
        if n in sizes:
            plan[n] = dev
    left[dev] -= lead
    hdev = next((d for d in reversed(gpus) if left[d] >= head), "cpu")
    left[hdev] -= head
    order = [*gpus, "cpu", "disk"]
    cur = 0
    for n, s in sizes.items():
        if not n.startswith("layers."):
            continue
        while order[cur] != "disk" and left[order[cur]] < s:
            cur += 1
        plan[n] = order[cur]
        if order[cur] != "disk":
            left[order[cur]] -= s
    plan["norm"] = hdev
    if "lm_head" in sizes:
        plan["lm_head"] = hdev
    return {n: plan[n] for n in sizes}


def _streamed(device: str, main: str) -> bool:
    return device == "disk" or (device == "cpu" and main != "cpu")


def resolve_device_map(model: nn.Module, device_map: str | dict, max_memory: dict | None = None
                       ) -> dict[str, str]:
    """A strategy name or an explicit {module name: device} (accelerate's format) -> unit -> device. A name
    covers every unit under it ("" = the whole model, "layers" = every block); the longest name wins."""
    if isinstance(device_map, str):
        return infer_device_map(model, max_memory, device_map)
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map: expected 'auto', 'balanced', 'sequential' or a dict (got {device_map!r})")
    names = [n for n, _ in units(model)]
    valid = {"", "layers", *names}
    if model.rotary is not None:
        valid.add("rotary")
    given: dict[str, str] = {}
    for key, value in device_map.items():
        key = str(key)
        if key not in valid:
            inside = next((n for n in names if key.startswith(n + ".")), None)
            if inside is not None:
                raise ValueError(f"device_map: {key!r} is inside block {inside!r}; placement is per block")
            if key == "lm_head" and model.lm_head is None:
                raise ValueError("device_map: 'lm_head': this model ties its head to the embedding (no lm_head "
                                 "module); place 'embed'")
            shown = ", ".join(names[:3] + ["..."] + names[-2:]) if len(names) > 6 else ", ".join(names)
            raise ValueError(f"device_map: unknown module {key!r} (modules: {shown}; also 'layers' and '')")
        given[key] = device_name(value, f"device_map[{key!r}]")
    plan = {}
    for n in names:
        keys = [k for k in given if k == "" or n == k or n.startswith(k + ".")]
        if not keys:
            missing = [m for m in names if not any(k == "" or m == k or m.startswith(k + ".") for k in given)]
            raise ValueError(f"device_map: no device for {', '.join(missing[:5])}"
                             + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        plan[n] = given[max(keys, key=len)]
    for n in _NEVER_STREAMED:
        if plan.get(n) == "disk":
            raise ValueError(f"device_map[{n!r}]: 'disk' is only for blocks (layers.N); put {n} on a GPU or 'cpu'")
    return plan
