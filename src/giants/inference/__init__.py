"""Inference: SamplingParams, the continuous-batching Engine over a paged KV cache, and LLM on top."""

from __future__ import annotations

from giants.inference.outputs import CompletionOutput, RequestMetrics, RequestOutput
from giants.inference.params import SamplingParams


def __getattr__(name: str):
    if name == "LLM":
        from giants.inference.llm import LLM

        return LLM
    if name == "BeamSearchParams":
        from giants.inference.beam_search import BeamSearchParams

        return BeamSearchParams
    if name == "Engine":
        from giants.inference.engine import Engine

        return Engine
    raise AttributeError(f"module 'giants.inference' has no attribute {name!r}")


__all__ = ["LLM", "Engine", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "RequestMetrics"]
