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


@pytest.mark.parametrize("N,V", [(8192, 128256), (1000, 50257), (3, 1000)])
def test_loss_and_gradient_kernel_matches_torch(N, V, monkeypatch):
    """The one-kernel loss + gradient (persistent grid: more rows than programs, and fewer)."""
    from giants.train import cross_entropy as ce

    g = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(N, V, generator=g, device="cuda") * 4).bfloat16()
    labels = torch.randint(0, V, (N,), generator=g, device="cuda")
    labels[::7] = -100
    for per_sm in (1, 2, 4):
        monkeypatch.setattr(ce, "GRAD_PROGRAMS_PER_SM", per_sm)
        loss, grad = ce.ce_rows_and_grad(logits, labels, -100)
        x = logits.float().requires_grad_()
        ref = F.cross_entropy(x, labels, ignore_index=-100, reduction="none")
        ref.sum().backward()
        assert float((loss - ref).abs().max()) < 1e-4
        assert grad.dtype == torch.bfloat16
        diff = (grad.float() - x.grad).abs()
        assert float(diff.max()) <= float(x.grad.abs().max()) * 2.0 ** -7
        assert torch.equal(grad[::7], torch.zeros_like(grad[::7]))
