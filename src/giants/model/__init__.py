from giants.model.cache import SlidingKVCache, StaticKVCache
from giants.model.transformer import Block, Transformer, build

__all__ = ["Block", "SlidingKVCache", "StaticKVCache", "Transformer", "build"]
