"""The T5 relative-bias table: the same forward as `weight[bucket]`, and a gradient that is the same bit for bit
run after run with several CPU threads (the indexing backward adds with racing atomics there)."""

from __future__ import annotations

import pytest
import torch

from giants.model.positions import RelativeBias, bias_lookup, t5_relative_bucket
from giants.presets import get_config


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _bias(B: int = 4, T: int = 512):
    cfg = get_config("tiny-gpt-oss-described")
    rb = RelativeBias(cfg)
    with torch.no_grad():
        rb.weight.normal_()
    pos = torch.arange(T)[None].expand(B, T)
    return rb, pos


def test_forward_matches_the_indexing_formula():
    rb, pos = _bias(B=2, T=96)
    k_pos = torch.cat([pos, pos + 96], dim=1)  # keys past the queries too (the far buckets, clamped)
    q_pos = pos + 40
    bucket = t5_relative_bucket(k_pos[:, None, :] - q_pos[:, :, None], rb.num_buckets, rb.max_distance)
    old = rb.weight[bucket].permute(0, 3, 1, 2)
    assert torch.equal(rb(q_pos, k_pos), old)
    with torch.no_grad():
        assert torch.equal(rb(q_pos, k_pos), old)
    for dtype in (torch.bfloat16, torch.float16):
        w = rb.weight.detach().to(dtype)
        assert torch.equal(bias_lookup(w, bucket), w[bucket])


def test_gradient_is_bitwise_deterministic_with_threads(two_threads):
    """With 2 threads the old backward (index_put_ accumulate: parallel atomic adds) differed in the last bits
    from one run to the next at this size (>= 32768 elements); the gradient must now be identical every time
    and equal the indexing formula's up to rounding."""
    rb, pos = _bias()
    g = torch.randn(pos.shape[0], rb.weight.shape[1], pos.shape[1], pos.shape[1])
    grads = []
    for _ in range(6):
        rb.weight.grad = None
        rb(pos, pos).backward(g)
        grads.append(rb.weight.grad.clone())
    assert all(torch.equal(grads[0], x) for x in grads[1:])
    bucket = t5_relative_bucket(pos[:, None, :] - pos[:, :, None], rb.num_buckets, rb.max_distance)
    ref = torch.zeros_like(rb.weight, dtype=torch.float64).index_put_(
        (bucket.reshape(-1),), g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).double(), accumulate=True)
    torch.testing.assert_close(grads[0].double(), ref, rtol=1e-3, atol=1e-2)  # fp32 sums of ~10^5 terms


def test_model_backward_is_deterministic(two_threads):
    """The whole tiny-gpt-oss-described twin's gradients, twice: equal bit for bit (the table's included)."""
    from giants.model import Transformer

    cfg = get_config("tiny-gpt-oss-described").replace(vocab_size=320)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.rel_bias.weight.normal_()
    ids = torch.randint(0, 320, (4, 256))
    grads = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        assert all(torch.equal(grads[0][n], other[n]) for n in other)
