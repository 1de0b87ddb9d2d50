"""Shared pieces of the decode kernels: programmatic dependent launch (PDL), the in-kernel RMSNorm and
gated activations used by several kernels, and the CUDA-graph timing used to pick launch configs."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _np2(n: int) -> int:
    return triton.next_power_of_2(n)


# ---- programmatic dependent launch ------------------------------------------------------------
# On Hopper a kernel launched with PDL is scheduled while the kernel before it drains: its programs
# start and wait at griddepcontrol.wait until the previous kernel's writes are visible, so the launch
# and the ramp overlap the tail of the kernel before. Every kernel here waits before its first load
# and store, so the order of effects is the plain stream's. GIANTS_PDL=0 turns it off, =1 forces it on.
# (Prefetching the first weight tiles into L2 before the wait measured slower: 223 vs 225 tok/s on
# Llama-3.1-8B.)
def _pdl_default() -> bool:
    env = os.environ.get("GIANTS_PDL")
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"GIANTS_PDL must be 0 or 1, got {env!r}")
        return env == "1"
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 9


PDL_ON = _pdl_default()


def set_pdl(on: bool) -> None:
    """Kernels launched (or captured in a CUDA graph) afterwards use PDL or not."""
    global PDL_ON
    PDL_ON = bool(on)


def _pdl() -> dict:
    return {"PDL": 1, "launch_pdl": True} if PDL_ON else {"PDL": 0}


@triton.jit
def _grid_dep(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one's writes."""
    if PDL > 0:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


# ---- in-kernel helpers shared by several kernels ----------------------------------------------
@triton.jit
def _rms_normed(xf, W, cols, m, D, eps, PLUS_ONE: tl.constexpr):
    """RMSNorm of one fp32 row xf (zeros past D) times the weight W (1 + W with PLUS_ONE), in fp32."""
    var = tl.sum(xf * xf, axis=0) / D
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if PLUS_ONE:
        w = w + 1.0
    return (xf * tl.rsqrt(var + eps)) * w


@triton.jit
def _act(g, u, alpha, limit, ACT: tl.constexpr):
    if ACT == 0:  # silu
        y = g * tl.sigmoid(g) * u
    elif ACT == 1:  # gelu, tanh approximation: tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        y = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0)) * u
    else:  # gpt-oss clamped swiglu
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        y = g * tl.sigmoid(alpha * g) * (u + 1.0)
    return y


ACTS = {"silu_glu": 0, "gelu_tanh_glu": 1, "clamped_swiglu": 2}


# ---- config timing (CUDA graphs) -------------------------------------------------------------
def time_ms(fn, reps: int = 20) -> float:
    """GPU milliseconds per call of fn(i), i = 0..reps-1, from a CUDA graph of the reps calls (after one
    untimed call): back-to-back eager launches of a kernel of a few microseconds measure the host's launch
    rate, not the kernel. fn gets the call index so it can rotate over weight copies: a weight re-read
    while still in L2 would time faster than the cold read a decode step makes."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        graph.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / (3 * reps)


def cold_copies(w: torch.Tensor, min_bytes: int = 256 << 20) -> list[torch.Tensor]:
    """w and enough clones that cycling through them reads more than the L2 cache holds."""
    n = max(1, -(-min_bytes // (w.numel() * w.element_size())))
    return [w] + [w.clone() for _ in range(n - 1)]


def pick_config_timed(fn, configs: list[dict], reps: int = 20) -> tuple[dict, float]:
    """(fastest of `configs` for fn(i, **config), its milliseconds per call); configs that fail to compile
    are skipped."""
    best, best_t = configs[0], float("inf")
    for c in configs:
        try:
            t = time_ms(lambda i, c=c: fn(i, **c), reps)
        except Exception:  # noqa: BLE001 - a config that does not compile for this shape is skipped
            torch.cuda.synchronize()
            continue
        if t < best_t:
            best, best_t = c, t
    return best, best_t
