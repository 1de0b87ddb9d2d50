"""Training: data preparation, the training loop (LM, SFT, DPO, LoRA), checkpoints, the arena."""

from __future__ import annotations

from giants.train.trainer import TrainConfig, Trainer, TrainingDiverged, train

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "train"]
