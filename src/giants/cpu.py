"""Intra-op threads for one-off bulk work (a checkpoint's dequantization and copies) on a machine others share.

torch's OpenMP threads spin at every operation's barrier for a partner the kernel has descheduled, so when other
processes hold the cores, two threads run an elementwise pass several times slower than one (dequantizing
SmolLM2's GGUF: 1.0 s on one thread, 5-19 s on two, with the 2-core box's load average at 5-7). A bulk phase has
no steady rhythm to measure (the decode governor, giants.inference.cpu_threads, measures its steps), so here the
count comes from the load average: the cores not already busy, at least one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def idle_cores() -> int:
    """CPUs this process may use, less the 1-minute load average of everything else (our own running thread
    excluded); at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus
    return max(1, min(cpus, int(cpus - max(0.0, load - 1.0) + 0.5)))


_outer: list[int] = []  # the thread counts bulk_threads blocks lowered, outermost first


def outer_threads() -> int:
    """torch's thread count outside any bulk_threads block (what an engine built inside one should govern)."""
    import torch

    return _outer[0] if _outer else torch.get_num_threads()


@contextlib.contextmanager
def bulk_threads() -> Iterator[int]:
    """torch's thread count lowered to the idle cores for the block (never raised; OMP_NUM_THREADS respected)."""
    import torch

    before = torch.get_num_threads()
    n = before if os.environ.get("OMP_NUM_THREADS") else min(before, idle_cores())
    _outer.append(before)
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        _outer.pop()
        if n != before:
            torch.set_num_threads(before)
