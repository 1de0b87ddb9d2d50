"""CPU decode on a busy machine: the intra-op thread count that steps fastest right now.

Why a batch-1 decode collapses when other processes hold the cores: every projection of a decode step is an
OpenMP parallel region of all intra-op threads, ~150 of them a token for SmolLM2-135M, each ending in a barrier.
libgomp's threads spin-wait at that barrier (300,000 spins before they sleep) for a partner thread the kernel
has descheduled, so each region costs a scheduler time slice instead of ~50 us, and the spinning burns the very
core the partner needs. oneDNN's packed single-row linear (the default fp32 path, `ModelRunner.pack_for_onednn`)
splits each projection across all threads and fell hardest. Measured on the 2-core box with other jobs running
(load average 7-12): 2 threads 0.5-1.0 tok/s (oneDNN packed), 1.3-3.1 (plain `F.linear`), transformers
1.5-2.2; 1 thread 6-10 tok/s for all three; `OMP_WAIT_POLICY=PASSIVE` brings 2 threads to the 1-thread rate.

`ThreadGovernor` picks the count by measuring, so a quiet machine keeps every core: it times decode-only engine
steps at the current count and, once its first `window` steps are timed and then every `interval` seconds of
decoding (at once when steps turn 1.5x slower than at the last decision), runs `probe` steps at half (or, below
the maximum, double) the count, keeping whichever stepped faster by 10%. A probe step no faster than the current
median ends its probe at once, and a probe that loses doubles the interval (1 s -> 30 s): on an idle 2-core box
probing costs ~2% of a 64-token generate, and well under 1% once the count has settled.

The count applies only while the engine steps: each step sets it and puts the caller's count back afterwards, so
other torch work in the process (transformers in the same benchmark, say) keeps its own.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def parse_threads(threads: int | str | None) -> int | None:
    """None / "auto" -> None (the governor decides); a positive int (or its string) -> that count."""
    if threads is None or threads == "auto":
        return None
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise ValueError(f"threads: a positive number of CPU threads or 'auto' (got {threads!r})") from None
    if n < 1:
        raise ValueError(f"threads: must be >= 1 (got {n})")
    return n


class ThreadGovernor:
    """Chooses torch's intra-op thread count for engine steps from measured decode step times."""

    def __init__(self, max_threads: int | None = None, *, fixed: bool = False, window: int = 4, probe: int = 3,
                 first_interval: float = 1.0, max_interval: float = 30.0,
                 clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 get_threads: Callable[[], int] = torch.get_num_threads) -> None:
        self.max = max(1, max_threads or get_threads())
        self.cur = self.max
        self.fixed = fixed  # a count the user chose: set for each step, never probed
        self.window, self.probe_steps = window, probe
        self.first_interval, self.max_interval = first_interval, max_interval
        self.interval = first_interval
        self.clock, self._set, self._get = clock, set_threads, get_threads
        self.key: Any = None
        self.samples: list[float] = []  # seconds per step at `cur`, this key
        self.ref: float | None = None  # median step at the last decision
        self.next_probe: float | None = None
        self.probe_to: int | None = None
        self.probe_samples: list[float] = []
        self.base = 0.0
        self.direction = -1
        self.history: list[tuple[float, int]] = [(clock(), self.cur)]  # (when, threads) at each change

    @property
    def threads(self) -> int:
        """The count the next step runs with."""
        return self.probe_to if self.probe_to is not None else self.cur

    def run(self, fn: Callable[[], Any], key: Any) -> Any:
        """One engine step under the governed count. key: the step's shape when it is a decode-only step (its
        number of sequences), else None (prefill steps are not timed)."""
        n = self.threads
        prev = self._get()
        if prev != n:
            self._set(n)
        try:
            t0 = self.clock()
            out = fn()
            dt = self.clock() - t0
        finally:
            if prev != n:
                self._set(prev)
        if key is not None:
            self.observe(key, dt)
        return out

    def observe(self, key: Any, dt: float) -> None:
        if self.fixed:
            return
        now = self.clock()
        if key != self.key:  # another batch shape: its steps take another time; start over
            self.key, self.samples, self.ref = key, [], None
            if self.probe_to is not None:
                self.probe_to = None
                self.next_probe = now + self.interval
            return
        if self.probe_to is None:
            self.samples = (self.samples + [dt])[-self.window:]
            if self.next_probe is None:  # the first probe as soon as the window is full: a short run benefits too
                self.next_probe = now
            if len(self.samples) < self.window or self.max == 1:
                return
            med = statistics.median(self.samples)
            slower = self.ref is not None and med > 1.5 * self.ref
            if now >= self.next_probe or slower:
                target = self._target()
                if target is not None:
                    self.base, self.probe_to, self.probe_samples = med, target, []
            return
        self.probe_samples.append(dt)
        # A probe step no faster than the current median ends the probe at once: on an idle machine one thread
        # loses every time (~1.5x slower), so a probe costs half a step; under contention the winner is 3-10x
        # faster, far from this line.
        if dt > self.base or len(self.probe_samples) >= self.probe_steps:
            m = statistics.median(self.probe_samples)
            if m < 0.9 * self.base:
                self.cur = self.probe_to
                self.samples, self.ref, self.interval = self.probe_samples[-self.window:], m, self.first_interval
                self.history.append((now, self.cur))
            else:
                self.ref, self.interval = self.base, min(2 * self.interval, self.max_interval)
                self.direction = -self.direction
            self.probe_to = None
            self.next_probe = now + self.interval

    def _target(self) -> int | None:
        for _ in range(2):
            t = max(1, self.cur // 2) if self.direction < 0 else min(self.max, self.cur * 2)
            if t != self.cur:
                return t
            self.direction = -self.direction
        return None


def decode_key(engine) -> int | None:
    """The number of sequences when the engine's next step can only be decode steps (nothing waiting, every
    running sequence past its prompt), else None."""
    if engine.waiting or not engine.running:
        return None
    if any(seq.num_computed < len(seq) - 1 for seq in engine.running):
        return None
    return len(engine.running)


def configure(engine, threads: int | None) -> ThreadGovernor | None:
    """CPU engines: a fixed count (threads=N), or the governor when neither `threads` nor OMP_NUM_THREADS
    fixes one. Wraps engine.step on the instance; returns the governor (None when nothing is governed)."""
    if engine.device.type != "cpu":
        return None
    if threads is not None:
        gov = ThreadGovernor(threads, fixed=True)
    elif os.environ.get("OMP_NUM_THREADS"):
        return None
    else:
        from giants.cpu import idle_cores, outer_threads

        gov = ThreadGovernor(outer_threads())  # built inside bulk_threads (giants generate): the count outside it
        if gov.max == 1:
            return None
        # the first steps (the prompt's prefill among them) start from the cores the load average leaves idle;
        # the probes correct it from there
        gov.cur = min(gov.max, idle_cores())
        gov.history = [(gov.history[0][0], gov.cur)]
    step = engine.step

    def governed_step():
        return gov.run(step, decode_key(engine))

    engine.step = governed_step
    engine.thread_governor = gov
    return gov
