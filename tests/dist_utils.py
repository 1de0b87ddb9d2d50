"""Run a function on N gloo ranks (CPU) and collect each rank's return value; a rank that raises or hangs
fails the test with the rank named. Workers are new processes forked from a fork server that has only imported
torch and giants (no process group, no test state), so `fn` must be importable."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        out = fn(rank, world, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - reported to the parent with the rank
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_PRELOAD = ["torch", "torch.distributed", "giants"]


def _context() -> Any:
    """Processes forked from a fork server that has imported torch and giants once (the session's first run_ranks
    starts it): each rank then starts in a fraction of a second instead of importing them itself (seconds a rank,
    four ranks sharing the CPU). Nothing else is shared: the server never initialises a process group."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """fn(rank, world, *args) on `world` gloo processes; returns the per-rank results in rank order."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world)) - set(results))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, status, out = queue.get(timeout=min(left, 5.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    codes = [procs[r].exitcode for r in dead]
                    raise RuntimeError(f"rank(s) {dead} died (exit codes {codes})") from None
                continue
            if status == "ok":
                results[rank] = out
            else:
                errors.append(f"rank {rank} failed:\n{out}")
                break
        if errors:
            raise RuntimeError("\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
