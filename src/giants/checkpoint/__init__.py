"""Checkpoints in and out: HF safetensors directories, GGUF files, gpt-oss MXFP4, known models."""

from __future__ import annotations

import importlib
from typing import Any

from giants.checkpoint.errors import CheckpointError, DownloadError
from giants.checkpoint.hub import KNOWN_MODELS, cache_dir, download

_LAZY = {"load": "giants.checkpoint.loading", "save": "giants.checkpoint.saving",
         "inspect": "giants.checkpoint.inspection", "load_config": "giants.checkpoint.loading"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'giants.checkpoint' has no attribute {name!r}")


__all__ = ["CheckpointError", "DownloadError", "KNOWN_MODELS", "cache_dir", "download", *_LAZY]
