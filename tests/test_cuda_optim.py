"""MasterAdamW's Triton update on CUDA against torch.optim.AdamW (fused). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from giants.train.optim import MasterAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def _params(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # odd sizes: partial last blocks; one tensor over several blocks
    shapes = [(257, 129), (1000,), (3, 4096, 5), (7,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda")) for s in shapes]


def _groups(ps):
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("cast", [False, True])
def test_triton_update_matches_fused_adamw(cast):
    ref, ours = _params(0), _params(0)
    opt_ref = torch.optim.AdamW(_groups(ref), fused=True, **KW)
    opt = MasterAdamW(_groups(ours), cast=[p for p in ours if p.dim() >= 2] if cast else [], **KW)
    assert opt._triton_ok(*opt.masters)
    g = torch.Generator(device="cuda").manual_seed(1)
    for step in range(8):
        scale = torch.tensor(1.0 + step / 4, device="cuda")
        for a, b in zip(ref, ours):
            grad = torch.randn(a.shape, generator=g, device="cuda").to(b.dtype)
            # separate tensors: fused AdamW writes the unscaled gradient back into a.grad
            a.grad, b.grad = grad.float().clone(), grad
        opt_ref.grad_scale = scale
        opt.grad_scale = scale
        opt_ref.step()
        opt.step()
    torch.cuda.synchronize()
    masters = dict(zip(map(id, opt.model_params), opt.masters))
    for a, b in zip(ref, ours):
        m = masters[id(b)]
        assert m.dtype == torch.float32
        ad = a.detach()
        err = float((m - ad).norm() / ad.norm())
        assert err < 1e-6, err
        if cast and b.dim() >= 2:  # only the matrices were given to `cast`
            assert b.dtype == torch.bfloat16 and torch.equal(b, m.to(torch.bfloat16))
        sa, sb = opt_ref.state[a], opt.state[m]  # keyed by the parameters themselves
        for k in ("exp_avg", "exp_avg_sq"):
            assert float((sb[k] - sa[k]).norm() / sa[k].norm()) < 1e-6


def test_grad_norm_mixed_dtypes():
    from giants.train.optim import grad_norm

    g = torch.Generator(device="cuda").manual_seed(5)
    grads = [torch.randn(s, generator=g, device="cuda").to(dt) for s, dt in
             (((300, 70), torch.bfloat16), ((20001,), torch.float32), ((5,), torch.bfloat16))]
    ref = torch.linalg.vector_norm(torch.stack([x.double().norm() for x in grads]))
    got = grad_norm(grads)
    assert got.dtype == torch.float32
    assert abs(float(got) - float(ref)) / float(ref) < 1e-6
