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
        err = float((m.detach() - ad).norm() / ad.norm())
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


def test_triton_found_inf_skips_the_step():
    ps = _params(0)
    opt = MasterAdamW(_groups(ps), cast=[p for p in ps if p.dim() >= 2], **KW)
    assert opt._triton_ok(*opt.masters)
    g = torch.Generator(device="cuda").manual_seed(2)

    def snapshot():
        return [t.clone() for t in ps + opt.masters + [st[k] for st in opt.state.values()
                                                       for k in ("exp_avg", "exp_avg_sq")]]

    for flag in (0.0, 1.0, 0.0):
        for a in ps:
            a.grad = torch.randn(a.shape, generator=g, device="cuda").to(a.dtype)
        before = snapshot()
        opt.found_inf = torch.tensor(flag, device="cuda")
        opt.step()
        same = [torch.equal(x, y) for x, y in zip(before, snapshot())]
        assert all(same) if flag else not any(same[:len(ps)])


def test_grad_norm_many_tensors_one_launch_per_dtype():
    """Sizes around the block (4096 elements) and a program's share (32768), several programs, three dtypes;
    deterministic."""
    from giants.train import optim

    g = torch.Generator(device="cuda").manual_seed(7)
    sizes = [1, 4095, 4097, 32767, 32768, 32769, 3 * 32768 + 5, 100_000, 7]
    dts = [torch.bfloat16, torch.float32, torch.float16]
    grads = [torch.randn(n, generator=g, device="cuda").to(dts[i % 3]) for i, n in enumerate(sizes)]
    ref = torch.stack([x.double().square().sum() for x in grads]).sum().sqrt()
    a, b = optim.grad_norm(grads), optim.grad_norm(grads)
    assert torch.equal(a, b)
    assert abs(float(a) - float(ref)) / float(ref) < 1e-6
    # a non-finite gradient gives a non-finite norm (the trainer's divergence check reads it)
    grads[3][5] = float("nan")
    assert not torch.isfinite(optim.grad_norm(grads))


def test_trainer_on_cuda_pipelined_and_nan(tmp_path):
    """On CUDA the loop queues step k+1 before reading step k back: its losses equal those of train_step()
    called step by step, and a NaN stops the run with the weights of the last good step."""
    from giants.train import TrainConfig, Trainer
    from train_utils import random_ids_dataset

    data = random_ids_dataset(tmp_path)

    def cfg(out, **kw):
        base = dict(out=str(tmp_path / out), preset="tiny-llama", data=str(data), tokenizer="bytes",
                    steps=6, seq_len=64, batch_size=2, lr=3e-3, progress=False, eval_every=0, ckpt_every=2,
                    save_final=False, device="cuda", overrides={"vocab_size": 320})
        base.update(kw)
        return TrainConfig(**base)

    piped = Trainer(cfg("a", steps=4, ckpt_every=0, checkpoint_at_end=False))
    assert isinstance(piped.optimizer, MasterAdamW)
    piped.run()
    stepped = Trainer(cfg("b", steps=4, ckpt_every=0, checkpoint_at_end=False))
    rows = [stepped.train_step() for _ in range(4)]
    for x, y in zip(piped.history, rows):
        assert x["step"] == y["step"] and x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5, abs=1e-6)

    from train_utils import assert_nan_stop_keeps_masters

    tr = Trainer(cfg("c"))
    tr.run(until=2)
    assert_nan_stop_keeps_masters(tr)
    assert tr.last_checkpoint.name.endswith("2")


@pytest.mark.parametrize("compile", [False, True])
def test_trainer_on_cuda_grad_accum_master_weights(tmp_path, compile):
    """grad_accum=3 under master weights on CUDA (tied head, Triton norm and update over the fp32 sums): the
    optimizer applies what autocast over fp32 weights accumulates in .grad, and the losses follow that run's."""
    from giants.train import TrainConfig, Trainer
    from train_utils import first_step_grads, random_ids_dataset

    data = random_ids_dataset(tmp_path)

    def trainer(out, **kw):
        return Trainer(TrainConfig(out=str(tmp_path / out), preset="tiny-llama", data=str(data), tokenizer="bytes",
                                   steps=4, seq_len=64, batch_size=2, grad_accum=3, lr=3e-3, progress=False,
                                   eval_every=0, ckpt_every=0, save_final=False, checkpoint_at_end=False,
                                   device="cuda", compile=compile, grad_clip=0.0,
                                   overrides={"vocab_size": 320, "tie_embeddings": True}, **kw))

    ours, ref = trainer("m"), trainer("f", master_weights=False)
    assert isinstance(ours.optimizer, MasterAdamW) and ours.tied_head is not None
    got, want = first_step_grads(ours), first_step_grads(ref)
    for n in want:
        a, b = got[n], want[n]
        assert a.dtype == torch.float32
        # the tied head's weight gradient is an fp32 GEMM output (autocast's is bf16): to bf16 rounding there
        tol = 1e-2 if n == "embed.weight" else 1e-5
        assert float((a - b).norm()) <= tol * float(b.norm()) + 1e-7, n
    ours.run()
    ref.run()
    for x, y in zip(ours.history, ref.history):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-2)
    assert ours.history[-1]["train_loss"] < ours.history[0]["train_loss"]
