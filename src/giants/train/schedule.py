"""Learning-rate schedules as pure functions of the step (nothing to drift on resume)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup, then cosine from base_lr down to min_lr_ratio * base_lr at total_steps.
    wsd: warmup-stable-decay (MiniCPM, arXiv 2404.06395): linear warmup, constant, then a linear decay
    to the minimum over the last `decay_fraction` of the steps.
    constant: linear warmup, then constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: must be one of {SCHEDULES} (got {schedule!r})")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0 (got {total_steps})")
    if warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}] (got {warmup_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1] (got {min_lr_ratio})")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    min_lr = base_lr * min_lr_ratio
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1] (got {decay_fraction})")
    decay_steps = max(1, round(total_steps * decay_fraction))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return base_lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return base_lr + (min_lr - base_lr) * progress
