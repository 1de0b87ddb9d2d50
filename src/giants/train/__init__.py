"""Training: data preparation, the training loop (LM, SFT, DPO, LoRA), checkpoints, the arena.

Names load on first use so `giants <any command>` does not import torch through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"TrainConfig": "giants.train.trainer", "Trainer": "giants.train.trainer",
         "TrainingDiverged": "giants.train.config", "train": "giants.train.trainer",
         "prepare": "giants.train.data", "ArenaConfig": "giants.train.arena", "run_arena": "giants.train.arena"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'giants.train' has no attribute {name!r}")


__all__ = list(_LAZY)
