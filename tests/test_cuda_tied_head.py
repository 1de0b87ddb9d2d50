"""The tied head (giants.train.tied_head) on CUDA: the fp32 weight-gradient GEMM, and the Trainer's tied path and
fused head + loss (compiled and eager) against the plain autocast head. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from giants.train import TrainConfig, Trainer
from giants.train import trainer as trainer_mod
from giants.train.tied_head import scatter_embedding_grad, tied_logits
from train_utils import random_ids_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_tied_logits_cuda_fp32_weight_gradient():
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(1000, 64, generator=g, device="cuda", requires_grad=True)
    h = torch.randn(2, 300, 64, generator=g, device="cuda", requires_grad=True)
    low = W.detach().bfloat16()
    out = tied_logits(h, W, low)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(h, W)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    gy = torch.randn(out.shape, generator=g, device="cuda")
    out.backward(gy)
    gy64 = gy.bfloat16().double().reshape(-1, 1000)
    h64 = h.detach().bfloat16().double().reshape(-1, 64)
    assert W.grad.dtype == torch.float32
    exact = gy64.t() @ h64
    err = (W.grad.double() - exact).abs().max()
    # fp32 sums (cuBLAS may split the reduction): far inside the bf16 rounding the plain head's gradient gets
    assert err <= 1e-5 * exact.abs().max(), err
    assert err <= 0.01 * (exact.float().bfloat16().double() - exact).abs().max()


@pytest.mark.parametrize("tied,fused", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("compile", [False, True])
def test_trainer_tied_head_cuda_matches_plain(tmp_path, monkeypatch, compile, tied, fused):
    """The Trainer's tied head (bf16 copy, fp32 weight gradient) and fused head + loss against the plain autocast
    head and Triton cross-entropy: same loss, gradients to bf16 rounding."""
    data = random_ids_dataset(tmp_path)

    def trainer(out):
        return Trainer(TrainConfig(out=str(tmp_path / out), preset="tiny-llama", data=str(data),
                                   tokenizer="bytes", steps=4, seq_len=64, batch_size=2, lr=3e-3, progress=False,
                                   eval_every=0, ckpt_every=0, save_final=False, checkpoint_at_end=False,
                                   device="cuda", compile=compile,
                                   overrides={"vocab_size": 320, "tie_embeddings": tied}))

    def grads(tr):
        loss, info, _ = tr._next_micro()
        loss.backward()
        if "lookup" in info:
            scatter_embedding_grad(*info.pop("lookup"))
        return {n: p.grad.float().clone() for n, p in tr.model.named_parameters()}

    monkeypatch.setattr(trainer_mod, "FUSED_HEAD_CE_DEVICES", ("cuda",) if fused else ())
    fast = trainer("fast")
    assert (fast.tied_head is fast.model.embed.weight) if tied else fast.tied_head is None
    assert (fast._linear_ce is not None) == fused
    monkeypatch.setattr(trainer_mod, "TIED_HEAD_DEVICES", ())
    monkeypatch.setattr(trainer_mod, "FUSED_HEAD_CE_DEVICES", ())
    plain = trainer("plain")
    assert plain.tied_head is None and plain._linear_ce is None
    ours, ref = grads(fast), grads(plain)
    for n in ref:
        a, b = ours[n], ref[n]
        assert float((a - b).norm()) <= 1e-2 * float(b.norm()) + 1e-7, n
    # and training runs: the shadow follows the master
    fast.run()
    plain.run()
    for x, y in zip(fast.history, plain.history):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-2)
    if tied:
        w = fast.model.embed.weight
        assert torch.equal(fast.optimizer.shadow_of(w), w.detach().bfloat16())
