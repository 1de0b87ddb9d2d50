"""giants: build, verify, analyse, train and serve Llama 3, Gemma 2, Mixtral and gpt-oss from one model."""

from giants.config import ModelConfig
from giants.model import Transformer, build
from giants.presets import PRESETS, get_config, get_preset

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "Transformer", "build", "get_config", "get_preset", "__version__"]
