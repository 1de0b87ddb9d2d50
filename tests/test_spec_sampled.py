"""Speculative decoding with sampled drafts (giants.inference.rejection): a draft model's sampled rows draw their
drafts from its processed distribution q and verification accepts with min(1, p(d)/q(d)), resampling from
normalize(max(0, p - q)). The emitted tokens follow the target's distribution (chi-square, at the first position,
a later one after accepted drafts, and the bonus token; with a known q and end to end with a different draft
model), a draft equal to the target is accepted every time (greedy drafts almost never are), seeded requests are
reproducible, and greedy rows stay plain decoding's."""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import torch

import giants
from giants.inference.llm import LLM, random_model
from giants.inference.params import SamplingParams
from giants.inference.rejection import sample_draft, verify
from giants.inference.sampling import Sampler, SamplingRow
from test_spec_decode import _chi2_p, _target


def _q(*rows: list[float]) -> torch.Tensor:
    q = torch.tensor(rows, dtype=torch.float32)
    return q / q.sum(-1, keepdim=True)


# ---- the rule, with known p and q ----------------------------------------------------------------------------
def test_rejection_follows_the_target_distribution() -> None:
    """Drafts drawn from a known q (a different one at each position; zero where p is not, and mass on a token
    top-k removes from p), verified against known logits over 6 tokens (temperature 0.8, top-k 5): the first
    emitted token follows p_0, the token after an accepted draft follows p_1, the bonus token after both follows
    p_2; a rejection's token follows normalize(max(0, p - q)); acceptance is sum(min(p, q)). Some rows seeded."""
    N = 40000
    l0 = torch.tensor([2.0, 0.5, 1.2, -1.0, 0.0, 1.6])
    l1 = torch.tensor([0.1, 1.5, -0.3, 0.8, 2.0, -2.0])
    l2 = torch.tensor([1.0, -0.5, 0.3, 0.0, 0.6, 1.8])
    params = SamplingParams(temperature=0.8, top_k=5)
    p0, p1, p2 = (_target(x, 0.8, 5) for x in (l0, l1, l2))
    q = _q([0.05, 0.4, 0.05, 0.3, 0.0, 0.2], [0.3, 0.05, 0.2, 0.1, 0.15, 0.2])  # q0(4) = 0 < p0(4); p0(3) = 0
    g = torch.Generator().manual_seed(1)
    d0 = torch.multinomial(q[0], N, replacement=True, generator=g).tolist()
    d1 = torch.multinomial(q[1], N, replacement=True, generator=g).tolist()
    drafts = [[a, b] for a, b in zip(d0, d1)]
    rows = [SamplingRow(params, [0], [], torch.Generator().manual_seed(100 + i) if i < 500 else None)
            for i in range(N)]
    logits = torch.stack([l0, l1, l2]).repeat(N, 1)
    out = verify(Sampler(torch.Generator().manual_seed(2)), logits, rows, drafts, [q] * N)
    first = np.array([toks[0] for toks, _ in out])
    assert _chi2_p(first, p0) > 1e-3
    second = np.array([toks[1] for toks, _ in out if len(toks) > 1])
    assert len(second) > 10000 and _chi2_p(second, p1) > 1e-3
    bonus = np.array([toks[2] for toks, _ in out if len(toks) == 3])
    assert len(bonus) > 5000 and _chi2_p(bonus, p2) > 1e-3
    qn = q.double().numpy()
    rejected = np.array([toks[0] for toks, _ in out if len(toks) == 1])
    assert _chi2_p(rejected, np.maximum(p0 - qn[0], 0)) > 1e-3
    a0, a1 = np.minimum(p0, qn[0]).sum(), np.minimum(p1, qn[1]).sum()
    n_acc = np.array([len(toks) - 1 for toks, _ in out])
    assert abs((n_acc >= 1).mean() - a0) < 0.01 and abs((n_acc == 2).mean() - a0 * a1) < 0.01
    assert all(toks[:len(toks) - 1] == d[:len(toks) - 1] for (toks, _), d in zip(out, drafts))
    # accepting every draft emits d0 ~ q0 (the test rejects it); the point-mass rule would accept only sum q p
    assert _chi2_p(np.array(d0), p0) < 1e-6
    assert a0 > float(qn[0] @ p0) + 0.2


def test_greedy_and_point_mass_rows_unchanged() -> None:
    """In one verification with q rows: a greedy row (its q ignored) emits the argmax chain as plain decoding,
    a point-mass row (no q) the same tokens as verifying it alone without any q row."""
    V = 6
    l0, l1 = torch.tensor([0.3, 2.0, 0.1, -1.0, 0.5, 0.0]), torch.tensor([1.0, 0.2, 3.0, 0.0, -0.5, 0.1])
    greedy = SamplingRow(SamplingParams(temperature=0), [0], [], None)
    sampled = SamplingRow(SamplingParams(temperature=1.0), [0], [], None)
    q = torch.full((2, V), 1 / V)
    logits = torch.stack([l0, l1, torch.zeros(V)] * 3)
    out = verify(Sampler(torch.Generator().manual_seed(0)), logits, [greedy, sampled, greedy],
                 [[1, 0], [1, 2], [1, 2]], [q, q, None])
    assert out[0][0] == [1, 2] and out[2][0] == [1, 2, 0]  # 1 accepted, then argmax 2 != draft 0; all accepted
    assert out[1][0][:len(out[1][0]) - 1] == [1, 2][:len(out[1][0]) - 1]


def test_verify_seeded_rows_reproducible() -> None:
    V, N = 8, 200
    logits = torch.randn(3 * N, V, generator=torch.Generator().manual_seed(4))
    q = torch.rand(2, V, generator=torch.Generator().manual_seed(5)).softmax(-1)
    drafts = [[i % V, (3 * i) % V] for i in range(N)]

    def run(seed0: int) -> list[list[int]]:
        rows = [SamplingRow(SamplingParams(temperature=1.0), [0], [], torch.Generator().manual_seed(seed0 + i))
                for i in range(N)]
        unseeded = Sampler(torch.Generator().manual_seed(int(torch.randint(1000, (1,)))))
        return [t for t, _ in verify(unseeded, logits, rows, drafts, [q] * N)]

    assert run(0) == run(0) and run(0) != run(1)


# ---- the draft side ------------------------------------------------------------------------------------------
def test_sample_draft_uses_the_rows_knobs() -> None:
    """q is the draft logits processed as the target's row: temperature, top-k, allowed_token_ids, logit_bias."""
    V = 10
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    rows = [SamplingRow(SamplingParams(temperature=0.5, top_k=3), [0], [], torch.Generator().manual_seed(1)),
            SamplingRow(SamplingParams(temperature=2.0, allowed_token_ids=[1, 4, 7], logit_bias={4: 1.0}), [0], [])]
    tok, q = sample_draft(Sampler(), logits, rows)
    want0 = _target(logits[0], 0.5, 3)
    x = torch.full((V,), float("-inf"))
    x[[1, 4, 7]] = logits[1, [1, 4, 7]] + torch.tensor([0.0, 1.0, 0.0])
    want1 = (x / 2.0).softmax(-1)
    assert torch.allclose(q[0].double(), torch.from_numpy(want0), atol=1e-6)
    assert torch.allclose(q[1], want1, atol=1e-6)
    assert q[0, tok[0]] > 0 and int(tok[1]) in (1, 4, 7)


# ---- the engine ----------------------------------------------------------------------------------------------
VOCAB64 = dataclasses.replace(giants.get_config("tiny-llama"), vocab_size=64)


@functools.cache
def _small(seed: int = 0, noise: float = 0.0) -> torch.nn.Module:
    """tiny-llama with a 64-token vocabulary (the exponential race over 49k tokens would dominate); with noise, a
    draft that agrees with the seed-0 target often, not always."""
    m = giants.build(VOCAB64, seed=seed).eval()
    if noise:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in m.parameters():
                if p.dtype.is_floating_point and p.numel() > 1:
                    p.add_(torch.randn(p.shape, generator=g) * p.float().std().nan_to_num(0.0) * noise)
    return m


def test_sampled_output_follows_the_target_end_to_end() -> None:
    """3000 samples of 3 tokens from a target drafted for by a different model (q != p, sum(min(p, q)) ~ 0.36 at
    the first position), k = 2, temperature 0.15, top-k 6: the first token follows the target's p, the second
    given the most frequent first one follows p after it, the third (a bonus token when both drafts were accepted)
    given the most frequent pair follows p after that pair."""
    T, K, N = 0.15, 6, 3000
    target, draft = _small(), _small(0, 0.7)
    prompt = [int(t) for t in torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(3))]

    @torch.no_grad()
    def p(model: torch.nn.Module, toks: list[int]) -> np.ndarray:
        return _target(model(torch.tensor([toks]))[0, -1], T, K)

    llm = LLM(copy.deepcopy(target), speculative_config={"model": copy.deepcopy(draft), "num_speculative_tokens": 2},
              max_model_len=64, num_blocks=2048, max_num_seqs=512, max_num_batched_tokens=8192)
    outs = llm.generate([prompt] * N, SamplingParams(temperature=T, top_k=K, max_tokens=3, ignore_eos=True),
                        use_tqdm=False)
    toks = np.array([o.outputs[0].token_ids for o in outs])
    p0, q0 = p(target, prompt), p(draft, prompt)
    assert 0.3 < np.minimum(p0, q0).sum() < 0.9 and ((p0 > 0) != (q0 > 0)).any()  # q differs, supports too
    assert _chi2_p(toks[:, 0], p0) > 1e-3
    t1 = int(np.bincount(toks[:, 0]).argmax())
    sel = toks[toks[:, 0] == t1]
    assert len(sel) > 500 and _chi2_p(sel[:, 1], p(target, prompt + [t1])) > 1e-3
    t2 = int(np.bincount(sel[:, 1]).argmax())
    sel2 = sel[sel[:, 1] == t2]
    assert len(sel2) > 120 and _chi2_p(sel2[:, 2], p(target, prompt + [t1, t2])) > 1e-3
    s = llm.stats()
    assert s["spec_num_drafts"] >= N and 0.1 < s["spec_acceptance_rate"] < 0.9, s
    assert s["kv_blocks_used"] == 0
    # accepting every draft would emit the draft's first tokens, distributed as q0: far from p0
    first_drafts = np.array(torch.multinomial(torch.from_numpy(q0), N, replacement=True).tolist())
    assert _chi2_p(first_drafts, p0) < 1e-6


@functools.cache
def _tiny() -> torch.nn.Module:
    return random_model("tiny-llama", torch.device("cpu"), torch.float32, 0)


def _acceptance(sample_drafts: bool, params: SamplingParams, draft: torch.nn.Module | None = None) -> dict:
    llm = LLM(copy.deepcopy(_tiny()), max_model_len=256, num_blocks=256,
              speculative_config={"model": copy.deepcopy(draft or _tiny()), "num_speculative_tokens": 4})
    llm.engine.spec.proposer.sample_drafts = sample_drafts
    g = torch.Generator().manual_seed(3)
    prompts = [[int(t) for t in torch.randint(100, 40000, (9,), generator=g)] for _ in range(8)]
    llm.generate(prompts, params, use_tqdm=False)
    return llm.stats()


def test_draft_equal_to_target_accepts_every_sampled_draft() -> None:
    """The draft is the target (same weights): sampled drafts have q == p (to rounding), so every draft is accepted
    and each step emits k + 1 tokens; greedy drafts (the old behaviour) are accepted with probability p(argmax)
    only. Measured on tiny-llama, 8 prompts x 40 tokens, k = 4: sampled 1.000 (temperature 0.8 and 1 with top-k 5),
    greedy 0.000 (temperature 0.8, near-uniform random logits) and 0.067 (top-k 5)."""
    for params in (SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True, seed=1),
                   SamplingParams(temperature=1.0, top_k=5, max_tokens=40, ignore_eos=True)):
        sampled, greedy = _acceptance(True, params), _acceptance(False, params)
        assert sampled["spec_acceptance_rate"] >= 0.98 and sampled["spec_tokens_per_step"] > 4.8, sampled
        assert greedy["spec_acceptance_rate"] < 0.2 and greedy["spec_tokens_per_step"] < 1.5, greedy


def test_seeded_sampled_requests_reproducible() -> None:
    """Seeded requests (drafts sampled with the request's generator) give the same tokens on two engines and twice
    on one; unseeded siblings of n=2 differ; greedy requests in the same batch are plain decoding's."""
    def build() -> LLM:
        return LLM(copy.deepcopy(_tiny()), max_model_len=256, num_blocks=256,
                   speculative_config={"model": copy.deepcopy(_small_tiny_draft()), "num_speculative_tokens": 3})

    g = torch.Generator().manual_seed(5)
    prompts = [[int(t) for t in torch.randint(100, 40000, (9,), generator=g)] for _ in range(3)]
    params = [SamplingParams(temperature=0.9, top_k=8, max_tokens=24, ignore_eos=True, seed=11),
              SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_tokens=24, ignore_eos=True, seed=12, n=2),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)]

    def ids(llm: LLM) -> list[list[list[int]]]:
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]

    a = build()
    first = ids(a)
    assert ids(a) == first and ids(build()) == first
    assert first[1][0] != first[1][1]
    plain = LLM(copy.deepcopy(_tiny()), max_model_len=256, num_blocks=256)
    assert first[2] == [o.outputs[0].token_ids for o in plain.generate([prompts[2]], params[2], use_tqdm=False)]
    s = a.stats()
    assert s["spec_num_accepted_tokens"] > 0 and s["kv_blocks_used"] == 0


@functools.cache
def _small_tiny_draft() -> torch.nn.Module:
    """tiny-llama's seed-0 weights plus noise: a draft whose q is close to p, not equal."""
    m = copy.deepcopy(_tiny())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            if p.dtype.is_floating_point and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * p.float().std().nan_to_num(0.0) * 0.3)
    return m
