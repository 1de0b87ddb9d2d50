"""The tied output head for master-weight training (giants.train.tied_head): the head reads the optimizer's bf16
copy of the embedding, its weight gradient is fp32, and the lookup's gradient is scattered in after the backward.
On CPU here (the Trainer uses it on CUDA; tests/test_cuda_optim.py runs it there)."""

from __future__ import annotations

import pytest
import torch

from giants.train import TrainConfig, Trainer
from giants.train import trainer as trainer_mod
from giants.train.optim import MasterAdamW
from giants.train.tied_head import scatter_embedding_grad, tied_logits
from train_utils import assert_resume_bit_exact, first_step_grads, master_cfg


def test_tied_logits_forward_and_gradients():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(50, 16, generator=g, requires_grad=True)
    h = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    low = W.detach().bfloat16()
    out = tied_logits(h, W, low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(h, W)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 7, 50)
    assert torch.equal(out, ref)  # the same bf16 operands, the same matmul
    gy = torch.randn(out.shape, generator=g)
    out.backward(gy)
    # the gradients of bf16(h) @ bf16(W).T for the upstream gradient rounded to bf16, in float64
    gy64 = gy.bfloat16().double().reshape(-1, 50)
    h64, w64 = h.detach().bfloat16().double().reshape(-1, 16), low.double()
    assert W.grad.dtype == torch.float32
    torch.testing.assert_close(W.grad.double(), gy64.t() @ h64, rtol=1e-6, atol=1e-6)  # fp32, not bf16-rounded
    torch.testing.assert_close(h.grad.double().reshape(-1, 16), gy64 @ w64, rtol=1e-2, atol=1e-2)


def test_scatter_embedding_grad_is_the_lookup_backward():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(10, 4, generator=g, requires_grad=True)
    ids = torch.tensor([[1, 3, 3], [9, 1, 1]])  # repeated ids accumulate
    gy = torch.randn(2, 3, 4, generator=g)
    torch.nn.functional.embedding(ids, W).backward(gy)
    ref = W.grad.clone()
    W.grad = None
    emb = torch.nn.functional.embedding(ids, W.detach()).requires_grad_(True)
    emb.backward(gy)
    scatter_embedding_grad(W, ids, emb)  # no head gradient yet: created
    torch.testing.assert_close(W.grad, ref)
    base = torch.randn(10, 4, generator=g)
    W.grad = base.clone()
    scatter_embedding_grad(W, ids, emb)  # added to the head's
    torch.testing.assert_close(W.grad, base + ref)
    with pytest.raises(RuntimeError, match="no gradient"):
        scatter_embedding_grad(W, ids, torch.zeros(2, 3, 4))


def test_master_adamw_shadow_follows_the_master():
    g = torch.Generator().manual_seed(2)
    emb = torch.nn.Parameter(torch.randn(12, 8, generator=g))
    lin = torch.nn.Parameter(torch.randn(8, 8, generator=g))
    opt = MasterAdamW([{"params": [emb, lin]}], cast=[lin], shadow=[emb], lr=1e-2)
    low = opt.shadow_of(emb)
    assert emb.dtype == torch.float32 and low.dtype == torch.bfloat16 and torch.equal(low, emb.detach().bfloat16())
    for _ in range(3):
        emb.grad = torch.randn(emb.shape, generator=g)
        lin.grad = torch.randn(lin.shape, generator=g).bfloat16()
        opt.step()
        opt.zero_grad()
        assert opt.shadow_of(emb) is low and torch.equal(low, emb.detach().bfloat16())
    with opt.masters_in_model(), torch.no_grad():
        emb.mul_(2)  # as a checkpoint load writes it
    assert torch.equal(low, emb.detach().bfloat16())
    other = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="both cast and shadowed"):
        MasterAdamW([{"params": [other]}], cast=[other], shadow=[other])
    with pytest.raises(ValueError, match="one of the optimised"):
        MasterAdamW([{"params": [other]}], shadow=[emb])


def _cfg(out, data, preset="tiny-llama", **kw) -> TrainConfig:
    kw.setdefault("overrides", {"vocab_size": 320, "n_layers": 2, "tie_embeddings": True})
    return master_cfg(out, data, preset=preset, **kw)


def _micro_grads(tr: Trainer) -> dict[str, torch.Tensor]:
    """One micro-batch's gradients, through the trainer's own forward and backward."""
    loss, info, _ = tr._next_micro()
    loss.backward()
    if "lookup" in info:
        scatter_embedding_grad(*info.pop("lookup"))
    return {n: p.grad.float().clone() for n, p in tr.model.named_parameters()}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma2"])
def test_trainer_tied_head_gradients_match_the_plain_head(tmp_path, byte_data, monkeypatch, preset):
    """The shadowed tied head gives the gradients of the plain autocast head (softcap and embedding scale
    included for Gemma 2); only the head's part of the embedding gradient differs, by its bf16 rounding."""
    plain = Trainer(_cfg(tmp_path / "plain", byte_data, preset))
    assert isinstance(plain.optimizer, MasterAdamW) and not plain.optimizer._shadows
    monkeypatch.setattr(trainer_mod, "TIED_HEAD_DEVICES", ("cuda", "cpu"))
    tied = Trainer(_cfg(tmp_path / "tied", byte_data, preset))
    w = tied.model.embed.weight
    assert w.dtype == torch.float32 and tied.optimizer.shadow_of(w).dtype == torch.bfloat16
    ref, ours = _micro_grads(plain), _micro_grads(tied)
    assert ref.keys() == ours.keys()
    for n in ref:
        tol = dict(rtol=2e-2, atol=2e-4) if n == "embed.weight" else dict(rtol=0, atol=0)
        torch.testing.assert_close(ours[n], ref[n], **tol, msg=n)
    assert not torch.equal(ours["embed.weight"], ref["embed.weight"])  # the head's part is not rounded to bf16


def test_trainer_tied_head_with_gradient_accumulation(tmp_path, byte_data, monkeypatch):
    """grad_accum=2: the lookup rows of both micro-batches land in the head's fp32 gradient, which autograd sums
    over the micro-batches, while the bf16 weights' gradients are summed by MasterAdamW.accumulate."""
    kw = dict(grad_accum=2, grad_clip=0.0)
    ref = first_step_grads(Trainer(_cfg(tmp_path / "plain", byte_data, **kw)))
    monkeypatch.setattr(trainer_mod, "TIED_HEAD_DEVICES", ("cuda", "cpu"))
    tied = Trainer(_cfg(tmp_path / "tied", byte_data, **kw))
    assert tied.tied_head is not None
    ours = first_step_grads(tied)
    assert ref.keys() == ours.keys()
    for n in ref:
        tol = dict(rtol=2e-2, atol=2e-4) if n == "embed.weight" else dict(rtol=0, atol=0)
        torch.testing.assert_close(ours[n], ref[n], **tol, msg=n)


@pytest.mark.parametrize("tied", [True, False])
def test_trainer_fused_head_and_loss_gradients(tmp_path, byte_data, monkeypatch, tied):
    """The head and the loss as one op (giants.train.cross_entropy.linear_cross_entropy), for the tied head and for
    a bf16 lm_head under master weights: the plain path's loss and gradients, to bf16 rounding."""
    over = {"vocab_size": 320, "n_layers": 2, "tie_embeddings": tied}
    plain = Trainer(_cfg(tmp_path / "plain", byte_data, overrides=over))
    assert plain._fused_head(None) is None
    monkeypatch.setattr(trainer_mod, "TIED_HEAD_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(trainer_mod, "FUSED_HEAD_CE_DEVICES", ("cuda", "cpu"))
    fused = Trainer(_cfg(tmp_path / "fused", byte_data, overrides=over))
    head_lowp = fused.optimizer.shadow_of(fused.model.embed.weight) if tied else None
    w, low = fused._fused_head(head_lowp)
    assert w is (fused.model.embed.weight if tied else fused.model.lm_head.weight) and low.dtype == torch.bfloat16
    ref, ours = _micro_grads(plain), _micro_grads(fused)
    for n in ref:
        a, b = ours[n], ref[n]
        assert float((a - b).norm()) <= 1e-2 * float(b.norm()) + 1e-7, n
    loss_ref = plain._next_micro()[0]
    loss = fused._next_micro()[0]
    assert float(loss.detach()) == pytest.approx(float(loss_ref.detach()), rel=1e-3)


def test_trainer_tied_head_resume_bit_exact(tmp_path, byte_data, monkeypatch):
    monkeypatch.setattr(trainer_mod, "TIED_HEAD_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(trainer_mod, "FUSED_HEAD_CE_DEVICES", ("cuda", "cpu"))
    full, resumed = assert_resume_bit_exact(lambda out, **kw: _cfg(out, byte_data, **kw), tmp_path)
    w = full.model.embed.weight
    assert torch.equal(full.optimizer.shadow_of(w), w.detach().bfloat16())
    assert torch.equal(resumed.optimizer.shadow_of(resumed.model.embed.weight), full.optimizer.shadow_of(w))
