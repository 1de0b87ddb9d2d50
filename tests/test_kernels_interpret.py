"""The decode kernels (giants.inference.kernels: norm_rotary, gemv, moe, attention) run on CPU under
TRITON_INTERPRET against torch, so a launch-signature or cross-module import slip fails here, not on a GPU;
tests/test_cuda_kernels.py runs them on a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

INTERPRETED = r'''
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
import torch.nn.functional as F
from giants.inference import kernels as tk


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


torch.manual_seed(0)
x, w, r = torch.randn(3, 64), torch.randn(64), torch.randn(3, 64)
# norm_rotary: residual add + RMSNorm, gated activation
y, res = tk.rmsnorm(x, w, 1e-5, False, residual=r)
s = x + r
close(y, s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
close(res, s)
gu = torch.randn(2, 96)
close(tk.glu(gu, "silu_glu"), F.silu(gu[:, :48]) * gu[:, 48:])
# gemv: batch-1 GEMV, norm + GEMV
W, nw = torch.randn(32, 64), torch.randn(64)
close(tk.gemv(x[:1].contiguous(), W, block_n=8, block_k=32), x[:1] @ W.T)
h, _ = tk.norm_gemv(x[:1].contiguous(), r[:1].contiguous(), nw, 1e-5, False, W, None, block_n=8, block_k=64)
s1 = x[:1] + r[:1]
close(h, (s1 * torch.rsqrt(s1.pow(2).mean(-1, keepdim=True) + 1e-5) * nw) @ W.T)
# moe: expert-indexed GEMV, router top-k
We, rows, ex = torch.randn(4, 16, 64), torch.tensor([0, 1, 2]), torch.tensor([3, 0, 2])
close(tk.expert_gemv(x.contiguous(), rows, ex, We, None, block_n=8, block_k=32),
      torch.stack([We[e] @ x[i] for i, e in zip(rows.tolist(), ex.tolist())]))
logits = torch.randn(3, 8)
_, idx = tk.route_topk(logits, 2, True, True, torch.float32)
assert idx.tolist() == torch.topk(logits, 2).indices.tolist()
# attention: paged decode attention, one and two key splits
B, H, Hkv, D, bs, nb = 2, 4, 2, 16, 4, 8
kc, vc = torch.randn(nb, bs, Hkv, D), torch.randn(nb, bs, Hkv, D)
table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)
lens = torch.tensor([7, 13], dtype=torch.int32)
q = torch.randn(B, H, D)
sinks = torch.randn(H)
counter = torch.zeros(B * Hkv, dtype=torch.int32)
# splits: 1, 2 and 4 (a split with no keys) combined by the reduce kernel or by the last split program
for splits, fused, with_sinks in ((1, False, False), (2, False, False), (2, True, False), (4, True, False),
                                  (4, False, True), (4, True, True)):
    out = torch.empty(B, H, D)
    tk.PagedAttention(n_heads=H, n_kv_heads=Hkv, head_dim=D, block_size=bs, scale=D ** -0.5,
                      sinks=sinks if with_sinks else None)(
        q, kc, vc, table, lens, out, num_splits=splits, counter=counter if fused else None)
    assert counter.eq(0).all()  # the last split leaves its ticket counter zero for the next layer
    for b in range(B):
        L = int(lens[b])
        k = kc[table[b].long()].reshape(-1, Hkv, D)[:L].repeat_interleave(H // Hkv, 1)
        v = vc[table[b].long()].reshape(-1, Hkv, D)[:L].repeat_interleave(H // Hkv, 1)
        s = torch.einsum("hd,lhd->hl", q[b], k) * D ** -0.5
        if with_sinks:  # a per-head logit in the softmax's denominator with no value
            s = torch.cat([s, sinks[:, None]], 1)
        a = torch.softmax(s, -1)[:, :L]
        close(out[b], torch.einsum("hl,lhd->hd", a, v))
assert tk.PDL_ON is False
print("ok")
'''


def test_decode_kernels_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "interp.py"
    path.write_text(INTERPRETED)
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]
