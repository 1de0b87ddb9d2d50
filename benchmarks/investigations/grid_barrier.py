"""Would a persistent kernel (grid-wide barriers instead of kernel boundaries) make the batch-1 FP8 chain faster?

The FP8 Llama-3.1-8B step spends ~0.5 ms over its bytes at the copy bandwidth, 2-3 us at each of its ~165
kernel boundaries (ramp and tail, under PDL with the first weight tile loaded before the wait). 1.8x of bf16
needs ~0.13 ms of that gone. This times the four weight GEMVs of a Llama-3.1-8B layer (O 4096x4096,
gate|up 28672x4096, down 4096x14336 taking silu(gate) * up, QKV 6144x4096; E4M3 weights, one fp32 scale a
row; each GEMV's input is the previous one's output) over 32 layers with cold weights, three ways:

- `launch`: one kernel a GEMV, one program a row block, PDL, the first tile loaded before the wait (giants'
  batch-1 chain without its norm / rotary / attention epilogues);
- `launch-P`: the same boundaries, P programs a kernel looping over row blocks (separates the cost of fewer
  programs from the cost of the boundary);
- `persistent`: ONE kernel for all 32 layers, P programs, a grid barrier (an atomic counter, volatile spin)
  between GEMVs, the next GEMV's first tile loaded before the barrier.

P = SMs x programs-per-SM; a barrier that waits longer than ~1 s sets an error flag instead of hanging (that
happens only if the P programs are not all resident at once). The modes' outputs are compared bitwise (same
tiles, same order) and, on one layer, each GEMV against torch on its own input.

    python benchmarks/investigations/grid_barrier.py [--per-sm 4,8] [--tiles 2x2048x4,1x4096x8] [--out f.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

import _benchmarks_dir  # noqa: F401 - puts benchmarks/ on sys.path
from bench_decode import copy_bandwidth
from giants.inference.cuda_runner import replay_ms
from giants.inference.kernels.common import _grid_dep, _pdl

SHAPE = (4096, 14336, 6144)  # Llama-3.1-8B: hidden, intermediate, q|k|v rows
SPIN_LIMIT = tl.constexpr(2_000_000)  # ~1 s of spinning: a real wait is under 0.1 ms


@triton.jit
def _x(X, k0, K, GLU_IN: tl.constexpr, BLOCK_K: tl.constexpr):
    """The GEMV's input slice k0:k0+BLOCK_K in fp32; with GLU_IN, X is [gate; up] (2K) and x = silu(g) * u,
    rounded to bf16 as a stored activation would be. .cg: written by other SMs since this kernel began."""
    rk = k0 + tl.arange(0, BLOCK_K)
    if GLU_IN:
        g = tl.load(X + rk, cache_modifier=".cg").to(tl.float32)
        u = tl.load(X + K + rk, cache_modifier=".cg").to(tl.float32)
        return (g * tl.sigmoid(g) * u).to(tl.bfloat16).to(tl.float32)
    return tl.load(X + rk, cache_modifier=".cg").to(tl.float32)


@triton.jit
def _tile(W, K, nb, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(W + rn.to(tl.int64)[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :])


@triton.jit
def _rows(X, W, S, Y, K, nb, w0, GLU_IN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[rows of block nb] = S * (W @ x), the block's first tile w0 already loaded."""
    acc = w0.to(tl.float32) * _x(X, 0, K, GLU_IN, BLOCK_K)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc += _tile(W, K, nb, k0, BLOCK_N, BLOCK_K).to(tl.float32) * _x(X, k0, K, GLU_IN, BLOCK_K)[None, :]
    rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.sum(acc, axis=1) * tl.load(S + rn)
    tl.store(Y + rn, y.to(Y.dtype.element_ty))


@triton.jit
def _phase(X, W, S, Y, N, K, pid, P, w0, GLU_IN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row blocks pid, pid + P, ... of one GEMV (P <= N / BLOCK_N, so every program has a first block)."""
    _rows(X, W, S, Y, K, pid, w0, GLU_IN, BLOCK_N, BLOCK_K)
    for nb in range(pid + P, N // BLOCK_N, P):
        _rows(X, W, S, Y, K, nb, _tile(W, K, nb, 0, BLOCK_N, BLOCK_K), GLU_IN, BLOCK_N, BLOCK_K)


@triton.jit
def _launch_kernel(X, W, S, Y, N, K, GLU_IN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PDL: tl.constexpr):
    pid = tl.program_id(0)
    w0 = _tile(W, K, pid, 0, BLOCK_N, BLOCK_K)  # weights never depend on the previous kernel
    _grid_dep(PDL)
    _phase(X, W, S, Y, N, K, pid, tl.num_programs(0), w0, GLU_IN, BLOCK_N, BLOCK_K)


@triton.jit
def _barrier(C, ERR, target):
    """Wait until C reaches target (every program has arrived). The CTA's stores are ordered before the
    release by the bar.sync; the acquire after the spin orders the loads that follow."""
    tl.debug_barrier()
    tl.atomic_add(C, 1, sem="release", scope="gpu")
    seen = tl.load(C, volatile=True)
    i = 0
    while (seen < target) & (i < SPIN_LIMIT):
        seen = tl.load(C, volatile=True)
        i += 1
        if tl.load(ERR, volatile=True) != 0:  # one barrier timed out: stop waiting at every later one
            i = SPIN_LIMIT
    if seen < target:
        tl.store(ERR, 1)
    tl.atomic_add(C, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _synced_phase(X, W, S, Y, N, K, pid, P, C, ERR, target, GLU_IN: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """One GEMV of the persistent kernel: its first tile loaded, then the grid barrier that ends at `target`
    arrivals (0: none, the very first GEMV), then its rows."""
    w0 = _tile(W, K, pid, 0, BLOCK_N, BLOCK_K)
    if target > 0:
        _barrier(C, ERR, target)
    _phase(X, W, S, Y, N, K, pid, P, w0, GLU_IN, BLOCK_N, BLOCK_K)


@triton.jit
def _persistent_kernel(WO, SO, WGU, SGU, WD, SD, WQ, SQ, YO, YGU, YD, YQ, C, ERR, L, D, F, QKV,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    for layer in range(L):
        li = tl.cast(layer, tl.int64)
        b = 4 * layer  # barriers passed before this layer's first GEMV
        _synced_phase(YQ, WO + li * D * D, SO + layer * D, YO, D, D, pid, P, C, ERR, P * b, False, BLOCK_N, BLOCK_K)
        _synced_phase(YO, WGU + li * 2 * F * D, SGU + layer * 2 * F, YGU, 2 * F, D, pid, P, C, ERR, P * (b + 1),
                      False, BLOCK_N, BLOCK_K)
        _synced_phase(YGU, WD + li * D * F, SD + layer * D, YD, D, F, pid, P, C, ERR, P * (b + 2), True, BLOCK_N,
                      BLOCK_K)
        _synced_phase(YD, WQ + li * QKV * D, SQ + layer * QKV, YQ, QKV, D, pid, P, C, ERR, P * (b + 3), False,
                      BLOCK_N, BLOCK_K)


class Chain:
    """L layers of E4M3 weights (stacked per kind), fp32 row scales and the bf16 activation buffers."""

    def __init__(self, layers: int, device: str, shape: tuple[int, int, int] = SHAPE) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        self.d, self.f, self.qkv = D, F, QKV = shape

        def weights(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            w = torch.empty(layers, n, k, dtype=torch.float8_e4m3fn, device=device)
            for i in range(layers):
                w[i] = torch.randn(n, k, generator=g, device=device).clamp_(-3, 3).to(torch.float8_e4m3fn)
            return w, torch.full((layers, n), k ** -0.5, device=device)

        self.L = layers
        self.wo, self.so = weights(D, D)
        self.wgu, self.sgu = weights(2 * F, D)
        self.wd, self.sd = weights(D, F)
        self.wq, self.sq = weights(QKV, D)
        self.x0 = torch.randn(QKV, generator=g, device=device).to(torch.bfloat16)
        self.yo = torch.empty(D, dtype=torch.bfloat16, device=device)
        self.ygu = torch.empty(2 * F, dtype=torch.bfloat16, device=device)
        self.yd = torch.empty(D, dtype=torch.bfloat16, device=device)
        self.yq = torch.empty(QKV, dtype=torch.bfloat16, device=device)
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        self.err = torch.zeros(1, dtype=torch.int32, device=device)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.wo, self.wgu, self.wd, self.wq, self.so, self.sgu,
                                                          self.sd, self.sq))

    def launches(self, grid: int | None, block_n: int, block_k: int, warps: int) -> None:
        """One kernel a GEMV; grid None = one program a row block."""
        D, F, QKV = self.d, self.f, self.qkv
        self.yq.copy_(self.x0)
        for i in range(self.L):
            for x, w, s, y, n, k, glu in ((self.yq, self.wo[i], self.so[i], self.yo, D, D, False),
                                          (self.yo, self.wgu[i], self.sgu[i], self.ygu, 2 * F, D, False),
                                          (self.ygu, self.wd[i], self.sd[i], self.yd, D, F, True),
                                          (self.yd, self.wq[i], self.sq[i], self.yq, QKV, D, False)):
                g = n // block_n if grid is None else grid
                _launch_kernel[(g,)](x, w, s, y, n, k, GLU_IN=glu, BLOCK_N=block_n, BLOCK_K=block_k,
                                     num_warps=warps, num_stages=3, **_pdl())

    def persistent(self, grid: int, block_n: int, block_k: int, warps: int):
        """The compiled kernel (for its registers and shared memory)."""
        self.yq.copy_(self.x0)
        self.counter.zero_()
        return _persistent_kernel[(grid,)](self.wo, self.so, self.wgu, self.sgu, self.wd, self.sd, self.wq, self.sq,
                                    self.yo, self.ygu, self.yd, self.yq, self.counter, self.err, self.L, self.d,
                                    self.f, self.qkv, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3)

    def check(self) -> float:
        """After a run of a one-layer chain: each GEMV's output against torch on that GEMV's own stored input
        (a chain of random matrices amplifies bf16 rounding, so whole-chain outputs are compared bitwise
        between modes instead), as the largest error over the largest value."""
        assert self.L == 1
        F = self.f
        h = (torch.nn.functional.silu(self.ygu.float()[:F]) * self.ygu.float()[F:]).bfloat16().float()
        errs = []
        for w, s, x, y in ((self.wo[0], self.so[0], self.x0.float()[:self.d], self.yo),
                           (self.wgu[0], self.sgu[0], self.yo.float(), self.ygu), (self.wd[0], self.sd[0], h, self.yd),
                           (self.wq[0], self.sq[0], self.yd.float(), self.yq)):
            want = (w.float() @ x) * s
            errs.append(((y.float() - want).abs().max() / want.abs().max()).item())
        return max(errs)


def captured_ms(fn, reps: int = 10) -> float:
    """GPU ms of one call of fn, captured in a CUDA graph after one eager call (which compiles)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replay_ms(graph, reps)


def max_resident(kernel, warps: int) -> int | None:
    """Programs of a compiled kernel that fit on one Hopper multiprocessor at once (registers, warps, shared
    memory, blocks), or None where the compiled kernel does not say its registers."""
    regs, smem = getattr(kernel, "n_regs", None), getattr(getattr(kernel, "metadata", None), "shared", 0)
    if regs is None:
        return None
    regs_per_block = -(-regs * 32 // 256) * 256 * warps
    fits = [32, 64 // warps, 65536 // max(regs_per_block, 1)]
    if smem:
        fits.append((228 << 10) // (smem + 1024))
    return min(fits)


def smoke() -> None:
    """CPU check under the Triton interpreter (TRITON_INTERPRET=1): small shapes, the persistent kernel with one
    program (more would spin forever: the interpreter runs programs one after another)."""
    c = Chain(1, "cpu", (256, 512, 384))
    outs = []
    for name, fn in (("launch", lambda: c.launches(None, 2, 128, 4)), ("launch-P3", lambda: c.launches(3, 2, 128, 4)),
                     ("persistent-P1", lambda: c.persistent(1, 2, 128, 4))):
        fn()
        outs.append(c.yq.float().clone())
        err = c.check()
        print(f"{name}: rel err vs torch {err:.1e}, equal to launch {torch.equal(outs[-1], outs[0])}, "
              f"barrier timeout {bool(c.err.item())}")
        assert err < 2e-2 and torch.equal(outs[-1], outs[0]) and not c.err.item(), name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--per-sm", default="4,8", help="programs a multiprocessor for launch-P and persistent")
    ap.add_argument("--tiles", default="2x2048x4,4x1024x4,1x2048x8", help="BLOCK_NxBLOCK_Kxwarps, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="CPU check (run with TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        raise SystemExit("grid_barrier.py needs a CUDA GPU, or --smoke under TRITON_INTERPRET=1")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows: list[dict] = []
    small = Chain(1, "cuda")
    chain = Chain(args.layers, "cuda")
    gbs = copy_bandwidth(torch.device("cuda")) / 1e9
    ideal_ms = chain.bytes() / gbs / 1e6
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, copy {gbs:.0f} GB/s; {args.layers} layers, "
          f"{chain.bytes() / 1e9:.2f} GB of weights: {ideal_ms:.3f} ms at the copy bandwidth; "
          f"{4 * args.layers} GEMVs")
    for spec in args.tiles.split(","):
        bn, bk, warps = (int(v) for v in spec.split("x"))
        if any(k % bk for k in (chain.d, chain.f)) or any(n % bn for n in (chain.d, chain.qkv)):
            raise SystemExit(f"tile {spec}: BLOCK_K must divide {chain.d} and {chain.f}, BLOCK_N {chain.d} and "
                             f"{chain.qkv} (the kernels have no masks)")
        tile = dict(block_n=bn, block_k=bk, warps=warps)
        modes = [("launch", None, lambda c, g, t=tile: c.launches(None, **t))]
        for m in (int(v) for v in args.per_sm.split(",")):
            grid = min(sms * m, chain.d // bn)  # every program needs a first row block in every GEMV
            modes.append((f"launch-P{m}", grid, lambda c, g, t=tile: c.launches(g, **t)))
            modes.append((f"persistent-P{m}", grid, lambda c, g, t=tile: c.persistent(g, **t)))
        base = None
        resident = max_resident(small.persistent(1, **tile), warps)
        for name, grid, fn in modes:
            row = {"tile": spec, "mode": name, "grid": grid}
            if name.startswith("persistent") and resident is not None and grid > resident * sms:
                row["error"] = f"not run: {grid} programs, at most {resident} a multiprocessor resident"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            try:
                small.err.zero_()
                fn(small, grid)
                torch.cuda.synchronize()
                err = small.check()
                chain.err.zero_()
                ms = captured_ms(lambda f=fn, g=grid: f(chain, g))
                out = chain.yq.float().clone()
                base = out if base is None else base
                row.update(ms=round(ms, 4), over_ideal_us=round((ms - ideal_ms) * 1e3, 1),
                           per_gemv_over_us=round((ms - ideal_ms) * 1e3 / (4 * args.layers), 2),
                           ref_rel_err=float(f"{err:.2e}"), equal_to_launch=bool(torch.equal(out, base)),
                           barrier_timeout=bool(chain.err.item() or small.err.item()))
            except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit is reported, not fatal
                torch.cuda.synchronize()
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": gbs, "ideal_ms": ideal_ms,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
