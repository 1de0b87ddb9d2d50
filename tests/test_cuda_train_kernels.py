"""The training kernels on a GPU: the Triton cross-entropy against F.cross_entropy over fp32 logits, eager and
inside torch.compile, gradients included. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from giants.train.losses import causal_lm_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("V,dtype", [(128256, torch.bfloat16), (50257, torch.bfloat16), (1000, torch.float16)])
@pytest.mark.parametrize("compiled", [False, True])
def test_cross_entropy_matches_torch(V, dtype, compiled):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T = 2, 300
    logits = (torch.randn(B, T, V, generator=g, device="cuda") * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g, device="cuda")
    labels[0, :17] = -100
    labels[1, -1] = V - 1

    def ours(x, y):
        return causal_lm_loss(x, y) * 3.0  # an upstream gradient other than 1

    def ref(x, y):
        return F.cross_entropy(x.reshape(-1, V).float(), y.reshape(-1), ignore_index=-100) * 3.0

    fn = torch.compile(ours) if compiled else ours
    loss = fn(logits, labels)
    loss.backward()
    got, logits.grad = logits.grad.clone(), None
    want = ref(logits, labels)
    want.backward()
    assert float((loss - want).abs()) < 1e-5 * float(want.abs())
    assert got.dtype == dtype
    diff = (got.float() - logits.grad.float()).abs()
    # the same fp32 values rounded once to the logits' dtype; exp() may differ in the last fp32 bits
    assert float(diff.max()) <= float(logits.grad.float().abs().max()) * 2.0 ** -7
    assert float(diff.mean()) < 1e-3 * float(logits.grad.float().abs().mean())
    assert torch.equal(got[0, :17], torch.zeros_like(got[0, :17]))
