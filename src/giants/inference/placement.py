"""Layer placement (`device_map`): whole blocks on GPUs in order, the rest in host memory or on disk, streamed.

A plan maps the model's units (`embed`, `rel_bias`, `layers.0` ... `layers.{L-1}`, `norm`, `lm_head`) to a
device: a GPU (`0`, `"cuda:1"`), `"cpu"` or `"disk"`. The model is built on the meta device and each unit is
allocated where the plan puts it, so loading writes every weight straight to its placement.

Execution. The main device is the first GPU of the plan (else the CPU). A unit on a GPU runs there; activations
move between devices at unit boundaries. A block placed on `"cpu"` while the plan has a GPU, or on `"disk"`, is
*streamed*: its weights live in a store (one flat pinned host buffer per block, or a file in `offload_folder`
memory-mapped), and before the block runs its bytes are copied in one transfer into one of two slot buffers on
the main device (non-blocking, on a side CUDA stream); the next streamed block is prefetched into the other slot
while this one computes, and a slot that already holds the block is reused. After the block, its parameters
point at the store again. On a CPU-only machine `"disk"` blocks take the same path (store -> slot copy), so the
CPU tests exercise the streaming code. `embed`, `rel_bias`, `norm` and `lm_head` are never streamed: on `"cpu"`
they run on the CPU. The rotary tables live on the main device.

Planning (`giants.inference.placement_plan`; `"auto"` = `"balanced"`, `"sequential"`), after accelerate's
`infer_auto_device_map`: budgets from `max_memory` (a GPU's default is 90% of its free memory, the CPU's the
available RAM); the embedding goes on the first device, the final norm and head on the last GPU with room for them,
then the blocks fill the GPUs in order, then the CPU (offloaded), then the disk. When blocks are streamed, room for
two of the largest block (the slots) is kept on the main device. `"balanced"` with several GPUs caps every GPU but
the last at model size / GPUs + 1.25 blocks, as accelerate's `get_balanced_memory` does; `"sequential"` fills GPU 0
first.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from giants.inference.offload import Layout, Pinned
from giants.inference.placement_plan import (  # noqa: F401 - the planning API, importable from here as before
    _NEVER_STREAMED,
    STRATEGIES,
    UNIT_ORDER,
    _available_cpu,
    _budgets,
    _streamed,
    default_max_memory,
    device_name,
    infer_device_map,
    parse_size,
    plan_units,
    resolve_device_map,
    unit_sizes,
    units,
)


# ---- the placed model at run time ---------------------------------------------------------------------
class Placement:
    """A model's plan plus the streaming machinery; attached as `model.placement` by `dispatch`/`materialize`."""

    def __init__(self, model: nn.Module, plan: dict[str, str], offload_folder: str | os.PathLike | None = None
                 ) -> None:
        self.plan = dict(plan)
        gpus = sorted({d for d in plan.values() if d.startswith("cuda")}, key=lambda d: int(d.split(":")[1]))
        self.main = torch.device(gpus[0] if gpus else "cpu")
        self.cuda = self.main.type == "cuda"
        main = str(self.main)
        n = len(model.layers)
        self.streamed = [_streamed(plan[f"layers.{i}"], main) for i in range(n)]
        # where each unit runs: streamed blocks on the main device; embed / norm / head on "cpu" run on the CPU
        self.devices = {u: (self.main if u.startswith("layers.") and _streamed(d, main) else torch.device(d))
                        for u, d in plan.items()}
        if any(d == "disk" for d in plan.values()) and offload_folder is None:
            disk = [u for u, d in plan.items() if d == "disk"]
            raise ValueError(f"device_map: {len(disk)} block(s) ({disk[0]} ...) are placed on 'disk': pass "
                             "offload_folder= (a directory for their weights), or give max_memory['cpu'] more room")
        self.folder = Path(offload_folder) if offload_folder is not None else None
        self.layouts: dict[int, Layout] = {}
        self.stores: dict[int, torch.Tensor] = {}
        self.order = [i for i in range(n) if self.streamed[i]]
        self.slots: list[torch.Tensor] = []
        self.holder = [-1, -1]  # block whose bytes each slot holds (or is receiving)
        self.current = -1  # slot of the streamed block last streamed in
        self.active = -1  # streamed block whose parameters point at a slot now
        self.head_device = self.devices.get("lm_head", self.devices["embed"])
        self._hooks: list = []
        self._pinned: list[Pinned] = []

    # ---- describing --------------------------------------------------------------------------------------
    @property
    def trivial(self) -> bool:
        """Everything resident on one device: the model is an ordinary one on that device."""
        return not self.order and len({str(d) for d in self.devices.values()}) == 1

    def layer_device(self, i: int) -> torch.device:
        return self.devices[f"layers.{i}"]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for i in range(len(self.streamed)):
            d = self.plan[f"layers.{i}"]
            key = f"{d} (streamed to {self.main})" if self.streamed[i] else d
            counts[key] = counts.get(key, 0) + 1
        parts = [f"{k}: {v} block{'s' * (v != 1)}" for k, v in counts.items()]
        return f"embed on {self.plan['embed']}, " + ", ".join(parts) + f", norm/head on {self.plan['norm']}"

    # ---- building --------------------------------------------------------------------------------------
    def _new_store(self, i: int, nbytes: int) -> torch.Tensor:
        if self.plan[f"layers.{i}"] == "disk":
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"layers.{i}.bin"
            if path.exists():
                path.unlink()
            return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
        if not self.cuda:
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = Pinned(nbytes)
        self._pinned.append(buf)
        return buf.tensor

    def build(self, model: nn.Module, from_meta: bool) -> None:
        """Allocate every unit at its placement. from_meta: the model is on the meta device (weights are
        written afterwards); else its current weights are copied to their places."""
        for name, mod in units(model):
            if name.startswith("layers.") and self.streamed[int(name.split(".")[1])]:
                i = int(name.split(".")[1])
                layout = Layout(mod)
                store = self._new_store(i, layout.nbytes)
                if not from_meta:
                    layout.fill_from_module(store)
                layout.point(store, replace=True)
                self.layouts[i], self.stores[i] = layout, store
            elif from_meta:
                mod.to_empty(device=self.devices[name])
            else:
                mod.to(self.devices[name])
        if model.rotary is not None:
            if from_meta:
                model.rotary.to_empty(device=self.main)
                model.rotary.reset_buffers()
            else:
                model.rotary.to(self.main)
        if self.order:
            size = max(lay.nbytes for lay in self.layouts.values())
            self.slots = [torch.empty(size, dtype=torch.uint8, device=self.main) for _ in range(2)]
            if self.cuda:
                self.copy_stream = torch.cuda.Stream(self.main)
                self.ready = [torch.cuda.Event() for _ in range(2)]
                self.done = [torch.cuda.Event() for _ in range(2)]

    # ---- streaming -------------------------------------------------------------------------------------
    def _load(self, i: int, slot: int) -> None:
        """Copy block i's bytes into `slot` (on the side stream on CUDA, once the slot's last user is done)."""
        n = self.layouts[i].nbytes
        self.holder[slot] = i
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.done[slot])
                self.slots[slot][:n].copy_(self.stores[i], non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        else:
            self.slots[slot][:n].copy_(self.stores[i])

    def stream_in(self, i: int) -> None:
        """Block i's weights on the main device (a no-op for resident blocks); prefetches the next one. The
        block streamed in before (if still in) is streamed out first."""
        if self.active == i:
            return
        if self.active >= 0:
            self.stream_out(self.active)
        if not self.streamed[i]:
            return
        self.active = i
        slot = self.holder.index(i) if i in self.holder else -1
        if slot < 0:
            slot = 1 - self.current if self.current >= 0 else 0
            self._load(i, slot)
        if self.cuda:
            torch.cuda.current_stream(self.main).wait_event(self.ready[slot])
        self.layouts[i].point(self.slots[slot])
        self.current = slot
        nxt = self.order[(self.order.index(i) + 1) % len(self.order)]
        if nxt not in self.holder:
            self._load(nxt, 1 - slot)

    def stream_out(self, i: int) -> None:
        """After block i ran: its parameters point at the store again; the slot may be overwritten."""
        if not self.streamed[i] or self.active != i:
            return
        self.active = -1
        if self.cuda:
            self.done[self.current].record(torch.cuda.current_stream(self.main))
        self.layouts[i].point(self.stores[i])

    def fused(self, i: int, block: nn.Module) -> tuple:
        """The ModelRunner's fused (qkv, mlp) tuple of a streamed block while it is streamed in."""
        return self.layouts[i].fused(self.slots[self.current], block)

    def enter(self, i: int, x: torch.Tensor, rope, inp):
        """Runner: before layer i, its weights in place and (x, rope, step inputs) on its device."""
        self.stream_in(i)
        dev = self.layer_device(i)
        return _move(x, dev), _move(rope, dev), inputs_on(inp, dev)

    # ---- hooks (Transformer.forward) ---------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        for i, layer in enumerate(model.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._block_pre(i)))
            self._hooks.append(layer.register_forward_hook(self._block_post(i)))
        self._hooks.append(model.embed.register_forward_pre_hook(_to_module_device(self.devices["embed"])))
        self._hooks.append(model.norm.register_forward_pre_hook(self._norm_pre))
        self._hooks.append(model.norm.register_forward_hook(lambda m, a, out: out.to(self.head_device)))
        out_device = self.devices["embed"]
        if self.head_device != out_device:  # logits come back where the ids came from
            logits = model.logits
            model.logits = lambda hidden, project=None: logits(hidden, project).to(out_device)
        for mod, dev in ((model.rotary, self.main), (model.rel_bias, self.devices.get("rel_bias"))):
            if mod is not None:
                self._hooks.append(mod.register_forward_pre_hook(_follow_input(dev), with_kwargs=True))
                self._hooks.append(mod.register_forward_hook(_return_to_input(), with_kwargs=True))
        model.placement = self

    def _norm_pre(self, module, args):
        if self.active >= 0:  # the last streamed block is done (the runner calls no block forward)
            self.stream_out(self.active)
        return _move(args, self.devices["norm"])

    def check_runner(self, runner, kv) -> None:
        """A runner over this model: only the generic ModelRunner runs placed models. KV pools move to their
        layer's device."""
        from giants.inference.runner import ModelRunner

        if type(runner) is not ModelRunner:
            raise ValueError(f"{type(runner).__name__} cannot run a model placed with device_map ({self.summary()}):"
                             " CUDA graphs and tensor parallelism need every weight resident on its GPU. The generic "
                             "ModelRunner runs it (LLM/Engine with use_cuda_graphs=False).")
        for g in kv.groups:
            for li, layer in enumerate(g.layers):
                dev = self.layer_device(layer)
                if g.k[li].device != dev:
                    g.k[li], g.v[li] = g.k[li].to(dev), g.v[li].to(dev)

    def _block_pre(self, i: int):
        def hook(module, args):
            self.stream_in(i)
            return _move(args, self.layer_device(i))
        return hook

    def _block_post(self, i: int):
        def hook(module, args, out):
            self.stream_out(i)
        return hook


def _move(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _move(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj)})
    return obj


def inputs_on(inp, device: torch.device):
    """A runner's StepInputs with its tensors on `device` (made once per step and device)."""
    if inp.ids.device == device:
        return inp
    cache = inp.__dict__.setdefault("_on_device", {str(inp.ids.device): inp})
    key = str(device)
    if key not in cache:
        new = object.__new__(type(inp))
        for k, v in inp.__dict__.items():
            new.__dict__[k] = v if k in ("chunks", "_on_device") else _move(v, device)
        cache[key] = new
    return cache[key]


def _to_module_device(device: torch.device):
    def hook(module, args):
        return _move(args, device)
    return hook


_INPUT_DEVICE = "_placement_input_device"


def _follow_input(device: torch.device):
    def hook(module, args, kwargs):
        src = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        module.__dict__[_INPUT_DEVICE] = src
        return _move(args, device), kwargs
    return hook


def _return_to_input():
    def hook(module, args, kwargs, out):
        src = module.__dict__.pop(_INPUT_DEVICE, None)
        return _move(out, src) if src is not None else out
    return hook


# ---- entry points -------------------------------------------------------------------------------------
def materialize(model: nn.Module, device_map: str | dict, max_memory: dict | None = None,
                offload_folder: str | os.PathLike | None = None) -> nn.Module:
    """Allocate a meta-built model (already cast to its dtype) at the placement `device_map` gives; weights
    uninitialised (a loader writes them next, each straight to its place)."""
    plan = resolve_device_map(model, device_map, max_memory)
    pl = Placement(model, plan, offload_folder)
    pl.build(model, from_meta=True)
    if not pl.trivial:
        pl.attach(model)
    return model


def dispatch(model: nn.Module, device_map: str | dict, max_memory: dict | None = None,
             offload_folder: str | os.PathLike | None = None) -> nn.Module:
    """Place an already built model (its weights move to their placement; streamed blocks into stores)."""
    if getattr(model, "placement", None) is not None:
        raise ValueError("dispatch: this model is placed already")
    plan = resolve_device_map(model, device_map, max_memory)
    pl = Placement(model, plan, offload_folder)
    with torch.no_grad():
        pl.build(model, from_meta=False)
    if not pl.trivial:
        pl.attach(model)
    return model


@torch.no_grad()
def init_random(model: nn.Module, seed: int, device: torch.device) -> None:
    """Transformer.init_weights for a placed model: each tensor drawn on `device` (the generator's, as an
    unplaced model built there would) in the same order, then copied to its place, so the values equal the
    unplaced model's bit for bit."""
    pl = getattr(model, "placement", None)
    if pl is None:
        model.init_weights(generator=torch.Generator(device=device).manual_seed(seed))
        return
    from giants.model.transformer import init_parameter

    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=p.dtype, device=device)
        init_parameter(name, t, model.config, gen)
        p.copy_(t)


def serving_max_memory(util: float = 0.9, kv_fraction: float = 0.1) -> dict[str, int]:
    """Default weight budgets for an engine: on each GPU `util` of its memory, less what is in use, less
    `kv_fraction` of it kept for the KV cache and activations; the CPU at its available RAM."""
    out = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out[f"cuda:{i}"] = max(0, int(util * total - (total - free) - kv_fraction * total))
    out["cpu"] = _available_cpu()
    return out


def resolve_placed_model(model, dtype: torch.dtype | None, device: torch.device, seed: int, device_map: str | dict,
                         max_memory: dict | None, offload_folder, *, quantization: str | None = None,
                         weights: str | None = None, util: float = 0.9, use_cuda_graphs: bool = True):
    """LLM(device_map=...): (model, tokenizer or None, the engine's device, use_cuda_graphs) for a Transformer, a
    checkpoint path / known name, or a preset (random weights drawn as an unplaced LLM on `device` would)."""
    from giants.inference.llm import _default_tokenizer, _known_names
    from giants.model.transformer import Transformer, build
    from giants.presets import PRESETS

    if quantization is not None or weights is not None:
        raise ValueError("device_map: not combined with quantization= or weights= yet")
    if max_memory is None:
        max_memory = serving_max_memory(util)
    tok = None
    if isinstance(model, Transformer):
        if dtype is not None:
            model = model.to(dtype)
        m = dispatch(model.eval(), device_map, max_memory, offload_folder)
    elif isinstance(model, str) and (os.path.exists(model) or model in _known_names()):
        import giants

        m = giants.load(model, dtype=dtype, device_map=device_map, max_memory=max_memory,
                        offload_folder=offload_folder)
        try:
            tok = giants.load_tokenizer(model)
        except (ImportError, ValueError, FileNotFoundError, AttributeError):
            tok = None
    elif isinstance(model, str) and model in PRESETS:
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        m = materialize(build(PRESETS[model].config, device="meta").to(dtype), device_map, max_memory,
                        offload_folder)
        init_random(m, seed, device)
        tok = _default_tokenizer(m)
    else:
        raise ValueError(f"model: {model!r} is not a Transformer, a checkpoint or a preset name")
    m = m.eval()
    pl = getattr(m, "placement", None)
    if pl is None:  # everything resident on one device: an ordinary model
        return m, tok, m.embed.weight.device, use_cuda_graphs
    if use_cuda_graphs and pl.cuda:
        warnings.warn(f"device_map: {pl.summary()}; CUDA graphs are off for a placed model (the generic runner "
                      "runs it: every step streams the offloaded blocks)", stacklevel=3)
    return m, tok, m.embed.weight.device, False


def parse_max_memory_arg(text: str) -> dict:
    """`--max-memory 0=70GiB,1=70GiB,cpu=200GiB` (or a JSON object) -> {0: "70GiB", ..., "cpu": "200GiB"}."""
    import json

    text = text.strip()
    if text.startswith("{"):
        raw = json.loads(text)
    else:
        raw = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"--max-memory: expected DEVICE=SIZE items like 0=70GiB,cpu=200GiB (got {part!r})")
            raw[key.strip()] = value.strip()
    out = {(int(k) if str(k).isdigit() else k): v for k, v in raw.items()}
    _budgets(out, exists=False)  # every device and size readable (the GPUs are checked where the model loads)
    return out


def parse_device_map_arg(text: str) -> str | dict:
    """`--device-map auto|balanced|sequential`, a JSON object {"embed": 0, ...} or @file.json."""
    import json

    text = text.strip()
    if text in STRATEGIES:
        return text
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"--device-map: {', '.join(STRATEGIES)}, a JSON object or @file.json (got {text!r:.60})"
                         ) from None
    if not isinstance(value, dict):
        raise ValueError("--device-map: the JSON must be an object {module name: device}")
    return value
