"""Sharded training checkpoints through torch.distributed.checkpoint (written under scale-out)."""

from __future__ import annotations

from pathlib import Path

SHARDS = "dcp"  # the DCP directory inside checkpoints/step_*/


def is_sharded(path: Path) -> bool:
    """Whether checkpoint `path` holds DCP shards (written under scale-out) rather than one device's files."""
    return (Path(path) / SHARDS / ".metadata").is_file()
