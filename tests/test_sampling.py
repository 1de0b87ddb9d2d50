"""Sampling filters against transformers' logits processors (and a plain loop for OpenAI's penalties),
distributions, seeds and validation."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import giants
from giants.inference import SamplingParams
from giants.inference.engine import Engine
from giants.inference.sampling import Sampler, SamplingRow, apply_filters, apply_penalties, exponential_race

V = 50


def fixed_logits(B: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    x[0, :5] = x[0, 0]  # ties at the top
    x[1, 7] = x[1, 9] = x[1].max() + 1
    return x


def hf_reference(row: torch.Tensor, t: float, k: int, p: float, m: float) -> torch.Tensor:
    scores = row[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    if t != 1.0:
        scores = TemperatureLogitsWarper(t)(ids, scores)
    if k > 0:
        scores = TopKLogitsWarper(k)(ids, scores)
    if p < 1.0:
        scores = TopPLogitsWarper(p)(ids, scores)
    if m > 0:
        scores = MinPLogitsWarper(m)(ids, scores)
    return scores[0]


SETTINGS = [  # (temperature, top_k, top_p, min_p) per row: each filter alone, then combined
    (1.0, 3, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.1), (1.0, 0, 1.0, 0.0), (0.5, 10, 0.8, 0.05),
    (2.0, 1, 0.5, 0.2),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filters_match_transformers_per_row(seed):
    logits = fixed_logits(len(SETTINGS), seed)
    t, k, p, m = (torch.tensor(c) for c in zip(*SETTINGS))
    got = apply_filters(logits, t.float(), k.long(), p.float(), m.float())
    for i, (ti, ki, pi, mi) in enumerate(SETTINGS):
        ref = hf_reference(logits[i], ti, ki, pi, mi)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(ref)), (i, SETTINGS[i])
        keep = ~torch.isinf(ref)
        torch.testing.assert_close(got[i][keep], ref[keep])


def test_each_filter_alone_matches_transformers():
    logits = fixed_logits(4, 5)
    ones = torch.ones(4)
    for k in (1, 2, 7, V):
        got = apply_filters(logits, ones, torch.full((4,), k), ones, torch.zeros(4))
        ref = torch.stack([TopKLogitsWarper(k)(None, r[None])[0] for r in logits])
        assert torch.equal(got, ref)
    for p in (0.05, 0.3, 0.9, 0.999):
        got = apply_filters(logits, ones, torch.zeros(4, dtype=torch.long), torch.full((4,), p), torch.zeros(4))
        ref = torch.stack([TopPLogitsWarper(p)(None, r[None])[0] for r in logits])
        assert torch.equal(got, ref)
    for m in (0.01, 0.2, 0.9):
        got = apply_filters(logits, ones, torch.zeros(4, dtype=torch.long), ones, torch.full((4,), m))
        ref = torch.stack([MinPLogitsWarper(m)(None, r[None])[0] for r in logits])
        assert torch.equal(got, ref)


def test_penalties_match_references():
    logits = fixed_logits(3, 7)
    prompt = [[1, 2, 3], [4, 4, 5], [6]]
    output = [[3, 3, 10, 11], [], [6, 6, 6, 12]]
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(repetition_penalty=0.8), SamplingParams(frequency_penalty=-0.7, presence_penalty=1.5)]
    rows = [SamplingRow(sp, pr, out) for sp, pr, out in zip(params, prompt, output)]
    got = apply_penalties(logits.clone(), rows)
    for i, (sp, pr, out) in enumerate(zip(params, prompt, output)):
        ids = torch.tensor([pr + out])
        ref = RepetitionPenaltyLogitsProcessor(sp.repetition_penalty)(ids, logits[i:i + 1].clone())[0]
        for tok in set(out):  # OpenAI: logit -= count * frequency + presence
            ref[tok] -= out.count(tok) * sp.frequency_penalty + sp.presence_penalty
        torch.testing.assert_close(got[i], ref)


def test_exponential_race_draws_from_the_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).expand(40000, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    draws = exponential_race(probs, [None] * len(probs), gen)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[4] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)


def test_sampler_only_draws_allowed_tokens_and_greedy_rows_take_argmax():
    logits = fixed_logits(4, 3)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=2), SamplingParams(top_p=0.3),
              SamplingParams(min_p=0.5, temperature=0.9)]
    sampler = Sampler(torch.Generator().manual_seed(0))
    rows = [SamplingRow(p, [1], []) for p in params]
    allowed = apply_filters(logits, torch.tensor([1.0, 1.0, 1.0, 0.9]), torch.tensor([0, 2, 0, 0]),
                            torch.tensor([1.0, 1.0, 0.3, 1.0]), torch.tensor([0.0, 0.0, 0.0, 0.5]))
    for _ in range(200):
        toks = sampler(logits, rows).tokens
        assert toks[0] == int(logits[0].argmax())
        for i in (1, 2, 3):
            assert not torch.isinf(allowed[i, toks[i]])


def test_logprobs_are_raw_log_softmax():
    logits = fixed_logits(2, 4)
    rows = [SamplingRow(SamplingParams(temperature=0, logprobs=3), [1], []),
            SamplingRow(SamplingParams(temperature=0.8, logprobs=0, repetition_penalty=1.5), [1], [])]
    res = Sampler(torch.Generator().manual_seed(0))(logits, rows)
    ref = torch.log_softmax(logits, dim=-1)
    top = torch.topk(ref[0], 3)
    assert set(res.logprobs[0]) == set(top.indices.tolist())
    for tok, lp in res.logprobs[0].items():
        assert lp == pytest.approx(float(ref[0, tok]), abs=1e-5)
    assert list(res.logprobs[1]) == [res.tokens[1]]
    assert res.logprobs[1][res.tokens[1]] == pytest.approx(float(ref[1, res.tokens[1]]), abs=1e-5)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("top_k", 1.5), ("min_p", 1.1), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("seed", "x"), ("max_tokens", 0), ("logprobs", -1), ("stop", [""]),
    ("stop_token_ids", [-1]), ("ignore_eos", "yes"),
    # beyond what the sampler takes: int64 top_k, torch.Generator seeds, float32 penalties and temperatures
    ("top_k", 2**63), ("top_k", 2**31), ("seed", 2**64), ("seed", -(2**63) - 1), ("repetition_penalty", 1e-45),
    ("repetition_penalty", 1e300), ("temperature", 1e7), ("temperature", 10**400), ("temperature", float("inf")),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_values_at_the_bounds_sample():
    """The largest top_k, seeds at both ends, logprobs beyond the vocabulary (all of it), temperatures below
    SAMPLING_EPS (greedy: a float32 temperature of 0 made every draw token 0)."""
    from giants.inference.params import SAMPLING_EPS

    logits = fixed_logits(2, 9)
    sampler = Sampler(torch.Generator().manual_seed(0))
    for kw in (dict(top_k=2**31 - 1, temperature=0.7), dict(seed=2**64 - 1), dict(seed=-(2**63)),
               dict(repetition_penalty=0.01), dict(repetition_penalty=100.0), dict(logprobs=10**6, temperature=0.5)):
        sp = SamplingParams(**kw)
        gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
        res = sampler(logits, [SamplingRow(sp, [1], [2], gen), SamplingRow(SamplingParams(), [1], [])])
        assert all(0 <= t < V for t in res.tokens), kw
        if sp.logprobs:
            assert len(res.logprobs[0]) == V
    for t in (1e-45, 1e-30, SAMPLING_EPS / 2):
        assert SamplingParams(temperature=t).greedy
        rows = [SamplingRow(SamplingParams(temperature=t), [1], []) for _ in range(2)]
        assert sampler(logits, rows).tokens == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy


def _run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[list[int]]]:
    for rid, (p, sp) in requests.items():
        engine.add_request(rid, p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = [c.token_ids for c in o.outputs]
    return done


def test_seeds_reproduce_and_do_not_depend_on_the_batch():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    prompt = [11, 12, 13, 14, 15]
    alone = _run(Engine(model, block_size=4, num_blocks=128), {"a": (prompt, sp)})["a"]
    again = _run(Engine(model, block_size=4, num_blocks=128), {"a": (prompt, sp)})["a"]
    assert alone == again
    others = {f"o{i}": ([20 + i] * (3 + i), SamplingParams(temperature=1.2, max_tokens=8 + i, ignore_eos=True))
              for i in range(5)}
    crowd = _run(Engine(model, block_size=4, num_blocks=128, seed=99), {**others, "a": (prompt, sp)})["a"]
    assert crowd == alone
    other_seed = _run(Engine(model, block_size=4, num_blocks=128),
                      {"a": (prompt, SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=12,
                                                    ignore_eos=True))})["a"]
    assert other_seed != alone


def test_n_completions_differ_and_engine_seed_reproduces():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=8, ignore_eos=True)
    a = _run(Engine(model, block_size=4, num_blocks=128, seed=7), {"r": ([5, 6, 7], sp)})["r"]
    b = _run(Engine(model, block_size=4, num_blocks=128, seed=7), {"r": ([5, 6, 7], sp)})["r"]
    assert a == b and len(a) == 3 and len({tuple(x) for x in a}) == 3
    assert all(len(x) == 8 for x in a)
