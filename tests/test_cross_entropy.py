"""giants.train.cross_entropy: the two-pass Triton cross-entropy (CUDA bf16/fp16 logits) against
F.cross_entropy, under TRITON_INTERPRET on CPU here; tests/test_cuda_train_kernels.py runs it on a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from giants.train.losses import causal_lm_loss

INTERPRETED = r'''
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, torch.nn.functional as F
from giants.train import cross_entropy as ce

for N, V, dtype in ((7, 5000, torch.bfloat16), (3, 4096, torch.float16), (2, 10, torch.bfloat16)):
    g = torch.Generator().manual_seed(N)
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0] = -100
    labels[-1] = V - 1
    rows = ce._ce_rows_fwd(logits, labels, -100)[0]
    ref = F.cross_entropy(logits.double(), labels, ignore_index=-100, reduction="none")
    assert float((rows.double() - ref).abs().max()) < 1e-5, (N, V, rows, ref)
    w = torch.randn(N, generator=g)
    (rows * w).sum().backward()
    got, logits.grad = logits.grad.clone(), None
    (F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none") * w).sum().backward()
    assert got.dtype == dtype and torch.equal(got[0], torch.zeros_like(got[0]))  # ignored row: no gradient
    # within one ulp of the logits' dtype: the interpreter truncates where the GPU rounds to nearest
    tol = logits.grad.float().abs() * 2.0 ** -7 + 1e-6
    assert bool(((got.float() - logits.grad.float()).abs() <= tol).all()), (N, V)
# the one-kernel loss + gradient (persistent grid: more rows than programs)
for N, V in ((11, 5000), (2, 10)):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(N, V, generator=g) * 3).bfloat16()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = -100
    loss, grad = ce._ce_rows_grad(logits, labels, -100)
    ref = F.cross_entropy(logits.double(), labels, ignore_index=-100, reduction="none")
    assert float((loss.double() - ref).abs().max()) < 1e-5, (N, V)
    x = logits.double().requires_grad_()
    F.cross_entropy(x, labels, ignore_index=-100, reduction="sum").backward()
    assert grad.dtype == torch.bfloat16 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    tol = x.grad.abs() * 2.0 ** -7 + 1e-6
    assert bool(((grad.double() - x.grad).abs() <= tol).all()), (N, V)
    tl_loss, tl_grad = ce.ce_rows_and_grad(logits, labels, -100)  # the torch fallback agrees
    assert float((tl_loss.double() - ref).abs().max()) < 1e-5
    assert bool(((tl_grad.double() - x.grad).abs() <= tol).all())
print("ok")
'''


def test_kernels_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    script = tmp_path / "ce.py"
    script.write_text(INTERPRETED)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]


def test_cpu_logits_take_the_torch_path():
    from giants.train.cross_entropy import triton_ce_ok

    logits = torch.randn(2, 3, 11)
    labels = torch.tensor([[1, 2, -100], [0, 10, 3]])
    assert not triton_ce_ok(logits.reshape(-1, 11), labels.reshape(-1))
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert torch.equal(causal_lm_loss(logits, labels), want)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_the_plain_head(weight_dtype):
    """The head and the loss as one op (torch path on CPU): loss and gradients of the plain bf16 head + fp32
    cross-entropy, with an upstream gradient other than one and ignored rows."""
    from giants.train.cross_entropy import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    N, D, V = 40, 16, 300
    h0 = torch.randn(N, D, generator=g)
    w0 = (torch.randn(V, D, generator=g) * 0.5).to(weight_dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:5] = -100
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    low = w.detach().bfloat16() if weight_dtype == torch.float32 else w.detach()
    loss = linear_cross_entropy(h, w, low, labels, -100)
    (loss * 3.0).backward()
    hr, wr = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    logits = hr.bfloat16() @ wr.bfloat16().t()
    ref = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100)
    (ref * 3.0).backward()
    assert float((loss - ref).abs().detach()) < 1e-5
    assert w.grad.dtype == weight_dtype and h.grad.dtype == torch.float32
    for ours, want in ((h.grad, hr.grad), (w.grad.float(), wr.grad.float())):
        # the same sums, rounded to bf16 at other points: within bf16 rounding of the largest entry
        assert float((ours - want).abs().max()) <= 2.0 ** -7 * float(want.abs().max())
        assert float((ours - want).norm() / want.norm()) < 1e-2
    assert torch.equal(h.grad[:5], torch.zeros_like(h.grad[:5]))  # ignored rows
