"""Sizing from a ModelConfig alone: parameters, FLOPs, KV cache, weights, memory, GPU fits, roofline speed.

Nothing here allocates or needs torch (except `giants.analysis.measure`, which checks the predictions on
a real model). See docs/analysis.md for the conventions.
"""

from giants.analysis.flops import forward_flops_per_token, prefill_flops, training_flops_per_token
from giants.analysis.hardware import GPUS, get_gpu
from giants.analysis.memory import kv_cache_bytes, serving_memory, training_memory, weight_bytes
from giants.analysis.params import ParamCount, count_params
from giants.analysis.perf import FitError, decode, fit, prefill_seconds, training_gpu_days

__all__ = ["GPUS", "FitError", "ParamCount", "count_params", "decode", "fit", "forward_flops_per_token",
           "get_gpu", "kv_cache_bytes", "prefill_flops", "prefill_seconds", "serving_memory",
           "training_flops_per_token", "training_gpu_days", "training_memory", "weight_bytes"]
