"""giants: build, verify, analyse, train and serve Llama 3, Gemma 2, Mixtral and gpt-oss from one model."""

from __future__ import annotations

import importlib
from typing import Any

from giants.config import ModelConfig
from giants.presets import PRESETS, get_config, get_preset

__version__ = "0.1.0"

# Heavier entry points load on first use so `import giants` stays quick.
# torch itself loads on first use of the model, so `giants compare` starts in a fraction of a second.
_LAZY = {
    "Transformer": "giants.model",
    "build": "giants.model",
    "load": "giants.checkpoint",
    "save": "giants.checkpoint",
    "load_tokenizer": "giants.tokenizer",
    "Tokenizer": "giants.tokenizer",
    "LLM": "giants.inference",
    "SamplingParams": "giants.inference",
    "BeamSearchParams": "giants.inference",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'giants' has no attribute {name!r}")


__all__ = ["ModelConfig", "PRESETS", "get_config", "get_preset", "__version__", *_LAZY]
