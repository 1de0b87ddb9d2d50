"""MoE router losses and DPO against reference formulas; LR schedules; router balance under the losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from giants.presets import get_config
from giants.train.losses import (
    balance_score,
    dpo_loss,
    load_balancing_loss,
    router_losses,
    router_z_loss,
    sequence_logprobs,
)
from giants.train.schedule import lr_at


def _reference_lb(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Switch Transformer eq. 4-6 as Mixtral applies it: E * sum_i f_i * P_i, f_i = share of tokens whose
    top-k contains expert i, P_i = mean router probability of expert i (written out with loops)."""
    N, E = logits.shape
    probs = torch.softmax(logits.double(), -1)
    top = torch.topk(probs, k, -1).indices
    total = 0.0
    for i in range(E):
        f_i = sum(1.0 for t in range(N) if i in top[t].tolist()) / N
        P_i = float(probs[:, i].mean())
        total += f_i * P_i
    return torch.tensor(E * total, dtype=torch.float64)


@pytest.mark.parametrize("E,k", [(8, 2), (8, 4), (4, 1)])
def test_load_balancing_equals_formula_and_transformers(E, k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(64, E) * 2
    ours, util = load_balancing_loss(logits, k)
    torch.testing.assert_close(ours.double(), _reference_lb(logits, k), rtol=1e-6, atol=1e-6)
    hf = load_balancing_loss_func((logits,), num_experts=E, top_k=k)
    torch.testing.assert_close(ours, hf.float(), rtol=1e-6, atol=1e-6)
    assert util.shape == (E,) and math.isclose(float(util.sum()), 1.0, rel_tol=1e-6)


def test_load_balancing_uniform_router_gives_k_and_mask_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    # A uniform router: P_i = 1/E; f_i sums to K. Ties in top-k are broken the same for every token, so use
    # per-token permutations of near-uniform logits to spread the picks evenly.
    E, k = 8, 2
    logits = torch.stack([torch.roll(torch.arange(E, dtype=torch.float32) * 1e-4, s) for s in range(E)] * 4)
    loss, util = load_balancing_loss(logits, k)
    assert abs(float(loss) - k) < 1e-3
    torch.testing.assert_close(util, torch.full((E,), 1 / E))
    # padding mask: transformers takes a (B, T) attention mask for the same (B*T, E) logits
    B, T = 2, 16
    logits = torch.randn(B * T, E)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 10:] = 0
    ours, _ = load_balancing_loss(logits, k, mask.reshape(-1).bool())
    hf = load_balancing_loss_func((logits,), num_experts=E, top_k=k, attention_mask=mask)
    torch.testing.assert_close(ours, hf.float(), rtol=1e-6, atol=1e-6)


def test_z_loss_formula_and_layer_average():
    layers = [torch.randn(32, 8) * 3 for _ in range(3)]
    z = [torch.stack([torch.log(torch.exp(row.double()).sum()) ** 2 for row in x]).mean() for x in layers]
    for x, ref in zip(layers, z):
        torch.testing.assert_close(router_z_loss(x).double(), ref, rtol=1e-6, atol=1e-6)
    rl = router_losses(layers, top_k=2)
    torch.testing.assert_close(rl.z_loss.double(), torch.stack(z).mean(), rtol=1e-6, atol=1e-6)
    aux = torch.stack([load_balancing_loss(x, 2)[0] for x in layers])
    torch.testing.assert_close(rl.aux_loss, aux.mean())
    torch.testing.assert_close(rl.per_layer_aux, aux)
    assert rl.utilisation.shape == (3, 8)
    # gradients reach the router logits through P (aux) and the logsumexp (z)
    x = torch.randn(16, 8, requires_grad=True)
    (load_balancing_loss(x, 2)[0] + router_z_loss(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_balance_score_bounds():
    assert float(balance_score(torch.full((8,), 1 / 8))) == pytest.approx(1.0)
    assert float(balance_score(torch.tensor([1.0] + [0.0] * 7))) == pytest.approx(0.0, abs=1e-6)


def test_router_losses_even_out_a_skewed_router():
    """A MoE layer whose router sends nearly every token to expert 0: trained on the load-balancing loss
    and the z-loss alone, its expert utilisation evens out."""
    from giants.model.mlp import MoE

    cfg = get_config("tiny-mixtral")
    torch.manual_seed(0)

    def skewed() -> MoE:
        moe = MoE(cfg)
        with torch.no_grad():
            for p in (moe.w_gate, moe.w_up, moe.w_down):
                p.normal_(0, 0.02)
            moe.router.weight.normal_(0, 0.02)
            moe.router.weight[0] += 0.5  # expert 0 wins for inputs with a positive mean
        return moe

    x = torch.randn(256, cfg.d_model) * 0.5 + 0.5
    moe = skewed()
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-2, weight_decay=0.0)
    first = last = None
    aux = []
    for step in range(60):
        _, router_logits = moe(x[None])
        rl = router_losses([router_logits], cfg.experts_per_token)
        (0.1 * rl.aux_loss + 1e-3 * rl.z_loss).backward()
        aux.append(float(rl.aux_loss.detach()))
        opt.step()
        opt.zero_grad()
        if step == 0:
            first = rl.utilisation[0].clone()
        last = rl.utilisation[0]
    assert float(first.max()) > 0.45  # expert 0 takes nearly every token's first slot
    assert float(balance_score(last)) > float(balance_score(first)) + 0.2
    assert float(last.max()) < 0.25
    assert aux[-1] < aux[0] - 0.5  # towards K = 2, its value for an even router


def test_dpo_loss_formula():
    pc, pr, rc, rr = (torch.randn(5) for _ in range(4))
    beta = 0.2
    out = dpo_loss(pc, pr, rc, rr, beta)
    ref = -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr)))).mean()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.margin, (beta * ((pc - rc) - (pr - rr))).mean())
    assert dpo_loss(pc, pr, pc, pr, beta).loss.item() == pytest.approx(math.log(2))


def test_sequence_logprobs_skips_ignored():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    lp = sequence_logprobs(logits, labels)
    ref = [sum(F.log_softmax(logits[b, t], -1)[labels[b, t]] for t in range(5) if labels[b, t] != -100)
           for b in range(2)]
    torch.testing.assert_close(lp, torch.stack(ref))


def test_schedules():
    kw = dict(base_lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.55)  # cosine midpoint between 1 and 0.1
    assert lr_at(100, **kw) == pytest.approx(0.1)
    wsd = dict(kw, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, **wsd) == 1.0 and lr_at(79, **wsd) == 1.0
    assert lr_at(90, **wsd) == pytest.approx(0.55)
    assert lr_at(100, **wsd) == pytest.approx(0.1)
    assert lr_at(50, **dict(kw, schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, **dict(kw, schedule="linear"))
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, base_lr=1.0, total_steps=5, warmup_steps=6)


def test_chunked_lm_loss_equals_one_shot_with_grads():
    """The CPU trainer's blockwise head + cross-entropy equals the one-shot loss, ignored labels included."""
    from giants.train.losses import causal_lm_loss, chunked_lm_loss

    torch.manual_seed(0)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (2, 7))
    y[0, :3] = -100

    def head(x):
        return 3 * torch.tanh(x @ w.t() / 3)  # a soft-capped head, as Gemma 2's

    ref = causal_lm_loss(head(h), y)
    got = chunked_lm_loss(head, h, y, 50, chunk_bytes=4 * 50 * 3)  # 3 rows a block: uneven last block
    torch.testing.assert_close(got, ref)
    g_ref = torch.autograd.grad(ref, (h, w))
    g_got = torch.autograd.grad(chunked_lm_loss(head, h, y, 50, chunk_bytes=4 * 50 * 3), (h, w))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)
