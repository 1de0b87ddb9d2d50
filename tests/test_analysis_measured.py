"""Predicted == measured on the tiny twins: KV-cache bytes vs real caches, FLOPs vs FlopCounterMode.

FlopCounterMode convention (which giants.analysis.flops follows): 2*M*K*N per matmul, bias adds free;
SDPA = q.k + p.v over the full score matrix handed to the kernel (it ignores is_causal). On CPU it has
no formula for SDPA's CPU flash kernel or torch._grouped_mm, so `flop_counter()` registers both.
"""

from __future__ import annotations

import pytest
import torch

import giants
from giants.analysis.flops import (
    attention_pair_flops,
    forward_flops_per_token,
    prefill_flops,
    training_flops_per_token,
)
from giants.analysis.measure import flop_counter, split_counts
from giants.analysis.memory import kv_cache_bytes, kv_cache_bytes_per_layer
from giants.model.attention import attention_mask
from giants.presets import get_config

from conftest import ALL_TINY

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def models():
    return {name: giants.build(get_config(name), seed=0).eval() for name in ALL_TINY}


# ---- KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_TINY)
@pytest.mark.parametrize("context", [8, 16, 17, 100, 2048])
def test_kv_bytes_equal_allocated_caches(models, name, context):
    model = models[name]
    for dtype, tdt in TORCH_DTYPES.items():
        for batch in (1, 3):
            cache = model.make_cache(batch, context, dtype=tdt)
            real = [c.k.nbytes + c.v.nbytes for c in cache]
            assert kv_cache_bytes_per_layer(model.config, context, batch, dtype) == real, (dtype, batch)
            assert kv_cache_bytes(model.config, context, batch, dtype) == sum(real)


def test_sliding_layers_stop_growing_at_their_window():
    cfg = get_config("tiny-mixtral")  # every layer slides (window 16)
    assert kv_cache_bytes(cfg, 16) == kv_cache_bytes(cfg, 2048)
    mha = cfg.replace(n_kv_heads=cfg.n_heads, layer_windows=())
    gqa = cfg.replace(layer_windows=())
    assert kv_cache_bytes(mha, 2048) == kv_cache_bytes(gqa, 2048) * cfg.n_heads // cfg.n_kv_heads


# ---- FLOPs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_TINY)
def test_prefill_flops_equal_flop_counter(models, name):
    """No cache: the model hands SDPA the full T x T matrix, so the 'dense' count is the exact match."""
    model = models[name]
    cfg = model.config
    batch, T = 2, 24
    ids = torch.randint(0, cfg.vocab_size, (batch, T))
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(ids)
    measured = split_counts(counter)
    predicted = prefill_flops(cfg, T, batch, attention="dense")
    assert measured == {"matmul": predicted.matmul, "attention": predicted.attention}
    assert counter.get_total_flops() == predicted.total


@pytest.mark.parametrize("name", ALL_TINY)
def test_decode_flops_within_2_percent(models, name):
    """One token at position c-1 with a filled cache attends to min(c, window) keys per layer. The ring
    cache of a sliding layer also hands the kernel its one evicted (masked) slot: off by one key."""
    model = models[name]
    cfg = model.config
    c = 160
    cache = model.make_cache(1, c)
    ids = torch.randint(0, cfg.vocab_size, (1, c))
    pos = torch.arange(c)[None]
    counter = flop_counter()
    with torch.no_grad():
        model(ids[:, :-1], pos[:, :-1], cache)
        with counter:
            model(ids[:, -1:], pos[:, -1:], cache)
    measured = split_counts(counter)
    predicted = forward_flops_per_token(cfg, c)
    assert measured["matmul"] == predicted.matmul
    assert abs(counter.get_total_flops() - predicted.total) <= 0.02 * predicted.total
    ring_layers = sum(1 for w in cfg.windows if w and w < c)
    assert measured["attention"] == predicted.attention + ring_layers * attention_pair_flops(cfg)


@pytest.mark.parametrize("name", ALL_TINY)
def test_training_flops_are_three_forwards(name):
    """Forward + backward under FlopCounterMode: matmuls exactly 3x forward; in total within 2% of the
    3x-forward convention (SDPA's backward also recomputes the scores: 3.5x on attention alone)."""
    cfg = get_config(name)
    model = giants.build(cfg, seed=0)
    batch, T = 2, 8
    ids = torch.randint(0, cfg.vocab_size, (batch, T))
    counter = flop_counter()
    with counter:
        model(ids).float().logsumexp(-1).mean().backward()
    measured = split_counts(counter)
    predicted = prefill_flops(cfg, T, batch, attention="dense").scale(3)
    assert measured["matmul"] == predicted.matmul
    assert abs(counter.get_total_flops() - predicted.total) <= 0.02 * predicted.total


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-mixtral", "tiny-llama"])
@pytest.mark.parametrize("T", [5, 16, 40])
def test_causal_count_is_the_models_own_mask(name, T):
    """`causal` prefill counts exactly the (query, key) pairs the model's attention mask allows."""
    cfg = get_config(name)
    pos = torch.arange(T)[None]
    allowed = sum(int(attention_mask(pos, pos, w).sum()) for w in cfg.windows)
    assert prefill_flops(cfg, T).attention == attention_pair_flops(cfg) * allowed


def test_decode_sums_to_causal_prefill():
    cfg = get_config("tiny-gpt-oss")
    T = 50
    assert sum(forward_flops_per_token(cfg, t).total for t in range(1, T + 1)) == prefill_flops(cfg, T).total
    assert training_flops_per_token(cfg, T) == 3 * prefill_flops(cfg, T).total // T


def test_flops_reject_bad_sizes():
    cfg = get_config("tiny-llama")
    with pytest.raises(ValueError, match="context"):
        forward_flops_per_token(cfg, 0)
    with pytest.raises(ValueError, match="attention"):
        prefill_flops(cfg, 4, attention="sparse")
