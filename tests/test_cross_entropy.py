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
