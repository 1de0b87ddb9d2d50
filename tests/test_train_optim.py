"""MasterAdamW (giants.train.optim) against torch.optim.AdamW, and the Trainer's master-weights mode on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from giants.train import Trainer
from giants.train.optim import MasterAdamW
from train_utils import assert_resume_bit_exact, first_step_grads, master_cfg

KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def _params(seed: int, shapes=((16, 24), (24,), (8, 3, 5))) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _groups(ps):
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("scale", [None, 2.5])
def test_fp32_params_match_adamw(scale):
    """No cast: the update is torch.optim.AdamW's (single-tensor) in place, clip scale folded in."""
    ref, ours = _params(0), _params(0)
    opt_ref = torch.optim.AdamW(_groups(ref), foreach=False, **KW)
    opt = MasterAdamW(_groups(ours), **KW)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        for group in opt_ref.param_groups + opt.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        for a, b in zip(ref, ours):
            grad = torch.randn(a.shape, generator=g)
            a.grad = grad / scale if scale else grad.clone()
            b.grad = grad.clone()
        opt.grad_scale = torch.tensor(scale) if scale else None
        opt_ref.step()
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in ours)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        assert b.dtype == torch.float32


def test_bf16_params_keep_fp32_masters():
    """Cast parameters become bf16 in the model; their masters follow AdamW's fp32 parameters fed the same
    (bf16) gradients, and the model weight is the master rounded to bf16."""
    ref, ours = _params(2), _params(2)
    opt_ref = torch.optim.AdamW(_groups(ref), foreach=False, **KW)
    cast = [p for p in ours if p.dim() >= 2]
    opt = MasterAdamW(_groups(ours), cast=cast, **KW)
    assert all(p.dtype == torch.bfloat16 for p in cast) and ours[1].dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        for a, b in zip(ref, ours):
            grad = torch.randn(a.shape, generator=g).to(b.dtype)
            a.grad, b.grad = grad.float(), grad
        opt.grad_scale = torch.tensor(1.7)
        for a in ref:
            a.grad /= 1.7
        opt_ref.step()
        opt.step()
        opt.zero_grad()
    masters = dict(zip(map(id, opt.model_params), opt.masters))
    for a, b in zip(ref, ours):
        m = masters[id(b)]
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, a, rtol=1e-6, atol=1e-6)
        assert torch.equal(b, m.to(b.dtype))
    # checkpoint view: the masters inside the model, bf16 back afterwards (from the masters)
    with opt.masters_in_model():
        assert all(p.dtype == torch.float32 for p in ours)
        with torch.no_grad():
            ours[0].mul_(2)  # a load writes into the master
    assert ours[0].dtype == torch.bfloat16
    assert torch.equal(ours[0], (masters[id(ours[0])]).to(torch.bfloat16))
    torch.testing.assert_close(masters[id(ours[0])], 2 * ref[0].detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cast", [False, True])
def test_found_inf_skips_the_step(cast):
    """found_inf != 0 leaves weights, masters and moments as they were; found_inf == 0 is a normal step."""
    ps = _params(0)
    opt = MasterAdamW(_groups(ps), cast=[p for p in ps if p.dim() >= 2] if cast else [], weight_decay=0.1, **KW)
    g = torch.Generator().manual_seed(3)

    def snapshot():
        return [t.clone() for t in ps + opt.masters + [st[k] for st in opt.state.values()
                                                       for k in ("exp_avg", "exp_avg_sq")]]

    for flag in (0.0, 1.0, 0.0):
        for a in ps:
            a.grad = torch.randn(a.shape, generator=g).to(a.dtype)
        before = snapshot()
        opt.found_inf = torch.tensor(flag)
        opt.step()
        same = [torch.equal(x, y) for x, y in zip(before, snapshot())]
        assert all(same) if flag else not any(same[:len(ps)])
    assert all(float(st["step"]) == 3 for st in opt.state.values())  # the count is the host's: it advances


def test_state_dict_round_trip():
    """Moments (fp32) and step counts survive state_dict/load_state_dict; the continued run is identical."""
    def make():
        ps = _params(4)
        return ps, MasterAdamW(_groups(ps), cast=[ps[0], ps[2]], **KW)

    def feed(ps, seed):
        g = torch.Generator().manual_seed(seed)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)

    a, opt_a = make()
    b, opt_b = make()
    for s in range(3):
        feed(a, s)
        opt_a.step()
    sd = copy.deepcopy(opt_a.state_dict())  # (state_dict holds references, as a checkpoint write does not)
    assert all(v["exp_avg"].dtype == torch.float32 for v in sd["state"].values())
    # b: same masters (as a checkpoint load writes them), then the optimizer state
    with opt_b.masters_in_model(), opt_a.masters_in_model(), torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    opt_b.load_state_dict(sd)
    assert all(v["exp_avg"].dtype == torch.float32 for v in opt_b.state.values())
    for s in range(3, 5):
        feed(a, s)
        feed(b, s)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    for x, y in zip(opt_a.masters, opt_b.masters):
        assert torch.equal(x, y)


def test_trainer_master_weights_resume_bit_exact(tmp_path, byte_data):
    """bf16 compute weights, fp32 masters: checkpoints hold the fp32 masters, and a resumed run equals the
    uninterrupted one bit for bit."""
    import giants

    def cfg(out, **kw):
        return master_cfg(out, byte_data, **kw)

    full, resumed = assert_resume_bit_exact(cfg, tmp_path)
    assert isinstance(full.optimizer, MasterAdamW)
    assert full.model.layers[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert full.model.embed.weight.dtype == torch.float32 and full.model.norm.weight.dtype == torch.float32
    saved = giants.load(tmp_path / "full" / "final").state_dict()
    with full.optimizer.masters_in_model():
        live = {k: v.clone() for k, v in full.model.state_dict().items()}
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], live[k]) for k in live)
    assert not torch.equal(live["layers.0.attn.q_proj.weight"],
                           live["layers.0.attn.q_proj.weight"].bfloat16().float())  # masters keep fp32 detail


def test_trainer_master_weights_nan_stops_with_weights_kept(tmp_path, byte_data):
    from train_utils import assert_nan_stop_keeps_masters

    tr = Trainer(master_cfg(tmp_path / "run", byte_data, steps=5, save_final=False))
    tr.run(until=2)
    assert_nan_stop_keeps_masters(tr)


def test_master_weights_config_checks(tmp_path, byte_data):
    with pytest.raises(ValueError, match="master_weights"):
        Trainer(master_cfg(tmp_path / "a", byte_data, precision="fp32"))
    fp32 = Trainer(master_cfg(tmp_path / "b", byte_data, precision="auto", master_weights=None))
    assert isinstance(fp32.optimizer, torch.optim.AdamW)  # CPU fp32: unchanged


def test_accumulate_sums_in_fp32():
    """accumulate() sums the bf16 gradients of cast parameters in fp32 (bitwise autocast's fp32 .grad sums) and
    clears .grad; fp32 parameters keep autograd's own accumulation; zero_grad starts a new sum."""
    ps = _params(5)
    opt = MasterAdamW(_groups(ps), cast=[ps[0], ps[2]], **KW)
    g = torch.Generator().manual_seed(6)
    micro = [[torch.randn(p.shape, generator=g) for p in ps] for _ in range(3)]
    for _ in range(2):
        for gs in micro:
            for p, x in zip(ps, gs):
                x = x.to(p.dtype)
                p.grad = x if p.grad is None else p.grad + x  # autograd's sum (fp32 only: .grad is None for bf16)
            opt.accumulate()
            assert ps[0].grad is None and ps[2].grad is None and ps[1].grad is not None
        for i in (0, 2):
            want = micro[0][i].bfloat16().float()
            for gs in micro[1:]:
                want = want + gs[i].bfloat16().float()
            got = opt.grad_of(ps[i])
            assert got.dtype == torch.float32 and torch.equal(got, want)
        assert [x.dtype for x in opt.grads()] == [torch.float32] * 3
        opt.step()
        opt.zero_grad()
        assert opt.grads() == []


def test_trainer_master_weights_accumulate_like_autocast(tmp_path, byte_data):
    """grad_accum=3 with master weights: the optimizer gets fp32 sums equal bit for bit to what autocast over fp32
    weights accumulates in .grad; the run resumes bit-exactly."""
    # (no clipping: torch's clip_grad_norm_ would scale the reference's .grad in place before the capture)
    ours = Trainer(master_cfg(tmp_path / "m", byte_data, grad_accum=3, grad_clip=0.0))
    ref = Trainer(master_cfg(tmp_path / "f", byte_data, grad_accum=3, grad_clip=0.0, master_weights=False))
    assert isinstance(ours.optimizer, MasterAdamW) and not isinstance(ref.optimizer, MasterAdamW)
    got, want = first_step_grads(ours), first_step_grads(ref)
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == want[n].dtype == torch.float32, n
        assert torch.equal(got[n], want[n]), (n, float((got[n] - want[n]).abs().max()))
    assert_resume_bit_exact(lambda out, **kw: master_cfg(out, byte_data, grad_accum=2, **kw), tmp_path / "r")


def test_resume_across_master_weights_setting(tmp_path, byte_data):
    """A checkpoint holds fp32 weights and fp32 moments either way: a master-weights run resumes without them
    and the other way round, continuing from the same state."""
    a = Trainer(master_cfg(tmp_path / "a", byte_data, save_final=False))
    a.run(until=2)
    with a.optimizer.masters_in_model():
        saved = {k: v.clone() for k, v in a.model.state_dict().items()}
    b = Trainer(master_cfg(tmp_path / "a", byte_data, save_final=False, master_weights=False, resume=True))
    assert isinstance(b.optimizer, torch.optim.AdamW) and b.step == 2
    live = b.model.state_dict()
    assert all(torch.equal(live[k], saved[k]) for k in saved)
    st = next(iter(b.optimizer.state.values()))
    assert st["exp_avg"].dtype == torch.float32 and float(st["step"]) == 2
    b.run()
    c = Trainer(master_cfg(tmp_path / "a", byte_data, save_final=False, resume=True))  # back to master weights
    assert isinstance(c.optimizer, MasterAdamW) and c.step == 4
    with c.optimizer.masters_in_model():
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in c.model.state_dict().items())


INTERPRETED = r'''
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl
from giants.train import optim
from giants.train.optim import MasterAdamW

n = 3000
g = torch.randn(n, generator=torch.Generator().manual_seed(0)).bfloat16()
for skip in (1.0, 0.0):
    res = []
    for triton_path in (True, False):
        p = torch.linspace(-1, 1, n)
        m, v, out = torch.full((n,), 0.1), torch.full((n,), 0.2), torch.zeros(n, dtype=torch.bfloat16)
        kw = dict(lr=1e-2, wd=0.1, beta1=0.9, beta2=0.95, eps=1e-8, step=3)
        if triton_path:
            bc1, bc2 = 1 - 0.9 ** 3, (1 - 0.95 ** 3) ** 0.5
            optim._adamw_kernel[(triton.cdiv(n, optim.BLOCK),)](
                p, g, m, v, out, torch.tensor(2.0), torch.tensor(skip), n, 1e-3, 0.9, 0.95, 1e-8, 1e-2 / bc1, bc2,
                HAS_SCALE=True, HAS_SKIP=True, WEIGHT_DECAY=True, WRITE_OUT=True, BLOCK=optim.BLOCK)
        else:
            MasterAdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]}], use_triton=False)._update(
                p, g, m, v, out, torch.tensor(2.0), skip=torch.tensor(skip), **kw)
        res.append((p, m, v, out))
    for a, b in zip(res[0][:3], res[1][:3]):  # master, moments
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (skip, (a - b).abs().max())
    for p, _, _, out in res:  # the bf16 weight is the master in bf16 (zeros where skipped); the interpreter
        # truncates where the GPU rounds to nearest (tests/test_cuda_optim.py checks the rounding)
        want = torch.zeros_like(p) if skip else p
        assert bool(((out.float() - want).abs() <= want.abs() * 2.0 ** -7).all())
    assert torch.equal(res[0][0], torch.linspace(-1, 1, n)) == (skip == 1.0)
acc = torch.full((n,), 7.0)
for first in (True, False):  # the fp32 sum of bf16 gradients, bitwise torch's
    optim._accumulate_kernel[(triton.cdiv(n, optim.BLOCK),)](acc, g, n, FIRST=first, BLOCK=optim.BLOCK)
assert torch.equal(acc, g.float() + g.float()), "accumulate"
xs = [torch.randn(k, generator=torch.Generator().manual_seed(k)) for k in (5, 32768, 40000, 4097)]
for dt in (torch.float32, torch.bfloat16):
    ys = [x.to(dt) for x in xs]
    t_of, s_of, numel = optim._sumsq_tables(tuple(y.numel() for y in ys), torch.device("cpu"))
    out = torch.empty(t_of.numel())
    optim._sumsq_kernel[(t_of.numel(),)](torch.tensor([y.data_ptr() for y in ys]), t_of, s_of, numel, out,
                                         DTYPE=getattr(tl, optim._TL_DTYPES[dt]), BLOCK=optim.SUMSQ_BLOCK,
                                         PER_PROGRAM=optim.SUMSQ_PER_PROGRAM)
    ref = sum(float(y.double().square().sum()) for y in ys)
    assert abs(float(out.sum()) - ref) / ref < 1e-6, (dt, float(out.sum()), ref)
print("ok")
'''


def test_triton_kernels_under_the_interpreter(tmp_path):
    """The CUDA kernels (AdamW update with clip scale and found_inf, the fp32 gradient sum, the pointer-table sum of
    squares) run on CPU
    under TRITON_INTERPRET and agree with the torch path, so a launch-signature slip fails here, not on a GPU."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = tmp_path / "interp.py"
    script.write_text(INTERPRETED)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]
