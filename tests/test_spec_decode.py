"""Speculative decoding (giants.inference.spec_decode): greedy output identical to plain decoding on every tiny twin
and on SmolLM2 (prompt lookup, a draft model, a draft equal to the target), the verification's sampled tokens
distributed as the target's, continuous batching, prefix caching and preemption, the config's checks."""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from giants.inference.llm import LLM, random_model
from giants.inference.params import SamplingParams
from giants.inference.sampling import Sampler, SamplingRow
from giants.inference.spec_decode import SpeculativeConfig, accept, ngram_propose, verify

TWINS = ["tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss", "tiny-gpt-oss-described"]
SMOLLM2 = Path(os.environ.get("GIANTS_CACHE", Path.home() / ".cache" / "giants")) / "smollm2-135m" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def _ngram(k: int = 4, lo: int = 1, hi: int = 3) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": hi, "prompt_lookup_min": lo}


def _llm(model, spec=None, **kw) -> LLM:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("num_blocks", 256)  # not the CPU's 1 GiB default: quicker to build
    return LLM(model, speculative_config=spec, **kw)


def _ids(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@functools.cache
def _twin(name: str, seed: int = 0) -> torch.nn.Module:
    """Built once (random init is most of a tiny twin's cost); each LLM gets its own copy (runners fuse weights)."""
    return random_model(name, torch.device("cpu"), torch.float32, seed)


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    return copy.deepcopy(_twin(name, seed))


def _perturbed(name: str, scale: float) -> torch.nn.Module:
    """The twin's own weights (LLM seed 0) plus noise: a draft that agrees often, not always."""
    m = _model(name)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            if p.dtype.is_floating_point and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * p.float().std().nan_to_num(0.0) * scale)
    return m


def _prompts(plain: LLM) -> list[list[int]]:
    """A random prompt, and one that repeats the model's own continuation (prompt lookup finds it)."""
    p = [int(t) for t in torch.randint(100, 40000, (9,), generator=torch.Generator().manual_seed(3))]
    out = _ids(plain, [p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    return [p, p + out + p]


# ---- the config -------------------------------------------------------------------------------------------
def test_config_checks() -> None:
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)  # vLLM: the one given for both
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (5, 5)
    assert SpeculativeConfig.parse({"model": "tiny-llama", "num_speculative_tokens": 3}).method == "draft_model"
    bad = [({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown key 'lookahead'"),
           ({"method": "ngram"}, "num_speculative_tokens"),
           ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
           ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
           ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
            "prompt_lookup_min"),
           ({"method": "ngram", "num_speculative_tokens": 2, "model": "tiny-llama"}, "model"),
           ({"model": "tiny-llama", "num_speculative_tokens": 2, "prompt_lookup_max": 2}, "prompt_lookup_max"),
           ({"model": "tiny-llama", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
            "draft_tensor_parallel_size"),
           ("ngram", "speculative_config")]
    for raw, word in bad:
        with pytest.raises(ValueError, match=word):
            SpeculativeConfig.parse(raw)
    with pytest.raises(ValueError, match="unknown key 'foo'"):
        _llm("tiny-llama", {"method": "ngram", "num_speculative_tokens": 2, "foo": 1})
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM("tiny-llama", tensor_parallel_size=2, speculative_config=_ngram())


def test_draft_vocabulary_must_match() -> None:
    import dataclasses

    import giants

    cfg = dataclasses.replace(giants.get_config("tiny-llama"), vocab_size=1000)
    with pytest.raises(ValueError, match="speculative_config.model: the draft's vocabulary"):
        _llm("tiny-llama", {"model": giants.build(cfg, seed=0), "num_speculative_tokens": 2})


def test_cli_flag() -> None:
    import argparse

    from giants.inference.cli import add_speculative_arg

    p = argparse.ArgumentParser()
    add_speculative_arg(p)
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'
    assert p.parse_args(["--speculative-config", spec]).speculative_config == json.loads(spec)
    for bad in ['{"method": "ngram"}', '{"num_speculative_tokens": 2, "modle": "x"}', "{not json"]:
        with pytest.raises(SystemExit):
            p.parse_args(["--speculative-config", bad])


# ---- prompt lookup ----------------------------------------------------------------------------------------
def test_ngram_propose() -> None:
    t = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert ngram_propose(t, 3, 1, 3) == [7, 8, 1]  # the most recent earlier "1 2 3"
    assert ngram_propose(t, 10, 1, 3) == [7, 8, 1, 2, 3]  # up to the end of the sequence
    assert ngram_propose([5, 6, 7, 6], 2, 1, 2) == [7, 6]  # only "6" matches: the longest n that occurred
    assert ngram_propose([5, 6, 7, 8], 2, 1, 3) == []
    assert ngram_propose([4, 4, 4], 2, 2, 2) == [4]  # an overlapping match proposes what follows it
    assert ngram_propose([3], 2, 1, 1) == []
    assert accept([5, 6, 7], [5, 6]) == 2 and accept([5, 1, 7], [5, 6]) == 1 and accept([0], []) == 0


# ---- greedy: identical to plain decoding --------------------------------------------------------------------
@pytest.mark.parametrize("name", TWINS)
def test_greedy_identical_on_every_twin(name: str) -> None:
    plain = _llm(_model(name))
    prompts = _prompts(plain)
    want = _ids(plain, prompts)
    specs = {"ngram": _ngram(), "draft-other-seed": {"model": _model(name, 1), "num_speculative_tokens": 3},
             "draft-perturbed": {"model": _perturbed(name, 0.3), "num_speculative_tokens": 4},
             "draft-equals-target": {"model": _model(name), "num_speculative_tokens": 4}}
    for label, spec in specs.items():
        llm = _llm(_model(name), spec)
        assert _ids(llm, prompts) == want, f"{name} {label}"
        s = llm.stats()
        assert s["spec_num_drafts"] > 0, (name, label)
        assert s["kv_blocks_used"] == 0  # rejected slots and finished sequences all released
        if label == "draft-equals-target":
            assert s["spec_acceptance_rate"] == 1.0  # the target's twin: every draft accepted
            assert s["spec_tokens_per_step"] > 4


def test_greedy_identical_with_penalties_and_logprobs() -> None:
    """Row j of a verification sees the output extended by the first j drafts: penalties apply as in plain
    decoding; logprobs come back for every token. The draft named as a preset is built with the engine's seed."""
    plain = _llm("tiny-llama")
    prompts = _prompts(plain)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5,
                        frequency_penalty=0.3, logprobs=2)
    want = plain.generate(prompts, sp, use_tqdm=False)
    llm = _llm("tiny-llama", {"model": _perturbed("tiny-llama", 0.2), "num_speculative_tokens": 4})
    got = llm.generate(prompts, sp, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.outputs[0].logprobs) == len(g.outputs[0].token_ids)
        for lw, lg, t in zip(w.outputs[0].logprobs, g.outputs[0].logprobs, g.outputs[0].token_ids):
            assert lw.keys() == lg.keys() and abs(lw[t] - lg[t]) < 1e-3
    m = got[1].metrics
    assert m.num_spec_drafts > 0 and 0 < m.num_accepted_tokens <= m.num_draft_tokens
    same = _llm("tiny-llama", {"model": "tiny-llama", "num_speculative_tokens": 3})  # the target's twin
    assert [o.outputs[0].token_ids for o in same.generate(prompts, sp, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in want]
    assert same.stats()["spec_acceptance_rate"] == 1.0


@pytest.mark.skipif(not SMOLLM2.is_file(), reason="needs `giants download smollm2-135m`")
def test_greedy_identical_on_smollm2() -> None:
    text = "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,"
    sp = SamplingParams(temperature=0, max_tokens=32)
    # one sequence at a time: 64 blocks (1024 tokens, two full-length sequences), not the CPU's 1 GiB default
    # (zero-filling it took seconds for each of the four caches)
    kw = dict(max_model_len=512, cpu_threads=1, num_blocks=64)
    plain = LLM(str(SMOLLM2), **kw)
    want = _ids(plain, [text], sp)
    ngram = LLM(str(SMOLLM2), **kw, speculative_config=_ngram(4, 1, 4))
    assert _ids(ngram, [text], sp) == want
    s = ngram.stats()
    assert s["spec_acceptance_rate"] > 0.5 and s["spec_tokens_per_step"] > 2  # the week repeats itself
    same = LLM(str(SMOLLM2), **kw, speculative_config={"model": str(SMOLLM2), "num_speculative_tokens": 3})
    assert _ids(same, [text], SamplingParams(temperature=0, max_tokens=12)) == [want[0][:12]]
    assert same.stats()["spec_acceptance_rate"] == 1.0


# ---- sampling: distributed as the target's --------------------------------------------------------------------
def _chi2_p(tokens: np.ndarray, p: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=len(p))
    keep = p > 0
    if counts[~keep].sum():
        return 0.0  # a token the target cannot produce was emitted
    return _chisquare_pvalue(counts[keep], p[keep] / p[keep].sum() * counts.sum())


def _chisquare_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square test (scipy.stats.chisquare's p-value, without scipy, which the suite does not
    install): P(chi2 with k-1 degrees of freedom >= the statistic), the upper regularized gamma function."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _target(logits: torch.Tensor, temperature: float, top_k: int) -> np.ndarray:
    x = logits / temperature
    kth = torch.topk(x, top_k).values[-1]
    return torch.where(x < kth, float("-inf"), x).softmax(-1).double().numpy()


def test_verification_follows_the_target_distribution() -> None:
    """Drafts from a known q (far from p), verified against known logits over 6 tokens with temperature 0.8 and
    top-k 5: the first emitted token follows p (and never a token top-k removed), the token after an accepted
    draft follows the next position's p; a sampler that accepts every draft fails the same test."""
    N, V = 30000, 6
    torch.manual_seed(0)
    l0 = torch.tensor([2.0, 0.5, 1.2, -1.0, 0.0, 1.6])
    l1 = torch.tensor([0.1, 1.5, -0.3, 0.8, 2.0, -2.0])
    l2 = torch.zeros(V)
    params = SamplingParams(temperature=0.8, top_k=5)
    p0, p1 = _target(l0, 0.8, 5), _target(l1, 0.8, 5)
    q = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.1, 0.1])
    g = torch.Generator().manual_seed(1)
    d0 = torch.multinomial(q, N, replacement=True, generator=g).tolist()
    d1 = torch.multinomial(q, N, replacement=True, generator=g).tolist()
    drafts = [[a, b] for a, b in zip(d0, d1)]
    rows = [SamplingRow(params, [0], [], None) for _ in range(N)]
    logits = torch.stack([l0, l1, l2]).repeat(N, 1)
    out = verify(Sampler(torch.Generator().manual_seed(2)), logits, rows, drafts)
    first = np.array([toks[0] for toks, _ in out])
    assert _chi2_p(first, p0) > 1e-3
    second = np.array([toks[1] for toks, _ in out if len(toks) > 1])
    assert len(second) > 2000 and _chi2_p(second, p1) > 1e-3
    accepted = np.mean([len(toks) - 1 for toks, _ in out])
    a0 = float(q.double().numpy() @ p0)  # P(draft 1 accepted) = sum_d q(d) p(d) for a draft drawn from q
    assert abs(accepted - a0 * (1 + float(q.double().numpy() @ p1))) < 0.01
    # a wrong sampler (every draft accepted) emits d0 ~ q: the test rejects it
    assert _chi2_p(np.array(d0), p0) < 1e-6


def test_verification_point_mass_draft() -> None:
    """Prompt lookup: the same draft token every time (q a point mass) is accepted with probability p(d), and a
    rejection emits a token from p without d."""
    N = 20000
    l0 = torch.tensor([1.0, 0.2, 0.7, -0.5])
    p0 = l0.softmax(-1).double().numpy()
    rows = [SamplingRow(SamplingParams(temperature=1.0), [0], [], None) for _ in range(N)]
    logits = torch.stack([l0, torch.zeros(4)]).repeat(N, 1)
    out = verify(Sampler(torch.Generator().manual_seed(5)), logits, rows, [[2]] * N)
    first = np.array([toks[0] for toks, _ in out])
    assert _chi2_p(first, p0) > 1e-3
    rejected = np.array([toks[0] for toks, _ in out if len(toks) == 1])
    resid = p0.copy()
    resid[2] = 0
    assert _chi2_p(rejected, resid) > 1e-3  # normalize(max(0, p - q))
    assert abs((first == 2).mean() - p0[2]) < 0.015


# ---- the engine: batching, prefix cache, preemption, sampling ---------------------------------------------------
def test_continuous_batching_mixed() -> None:
    """Prompts of different lengths, greedy and sampled, n=2, some too short for drafts (max_tokens=1), a small
    token budget (chunked prefill; drafts limited by it): the greedy ones decode as without speculation."""
    g = torch.Generator().manual_seed(11)
    base = [int(t) for t in torch.randint(100, 40000, (6,), generator=g)]
    # different lengths, each ending in a repeat that prompt lookup finds
    prompts = [[int(t) for t in torch.randint(100, 40000, (r,), generator=g)] + base * 2 for r in (1, 4, 9, 17, 30)]
    params = [SamplingParams(temperature=0, max_tokens=18, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, max_tokens=15, seed=4, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True)]
    plain = _llm(_model("tiny-llama"), max_num_batched_tokens=24)
    want = plain.generate(prompts, params, use_tqdm=False)
    for spec in (_ngram(3), {"model": _perturbed("tiny-llama", 0.3), "num_speculative_tokens": 3}):
        llm = _llm(_model("tiny-llama"), spec, max_num_batched_tokens=24)
        got = llm.generate(prompts, params, use_tqdm=False)
        for w, o, sp in zip(want, got, params):
            assert [len(c.token_ids) for c in o.outputs] == [sp.max_tokens] * sp.n
            if sp.temperature == 0:
                assert o.outputs[0].token_ids == w.outputs[0].token_ids
            if sp.logprobs is not None:
                assert len(o.outputs[0].logprobs) == sp.max_tokens
        s = llm.stats()
        assert s["spec_num_drafts"] > 0 and s["kv_blocks_used"] == 0


def test_prefix_cache_and_stream() -> None:
    llm = _llm(_model("tiny-llama"), {"model": _perturbed("tiny-llama", 0.3), "num_speculative_tokens": 4},
               block_size=4)
    plain = _llm(_model("tiny-llama"), block_size=4)
    prompt = list(range(300, 340))
    want = _ids(plain, [prompt])
    assert _ids(llm, [prompt]) == want
    hits = llm.stats()["prefix_cache_hits"]
    assert _ids(llm, [prompt]) == want
    assert llm.stats()["prefix_cache_hits"] > hits
    streamed = [t for out in llm.stream(prompt, GREEDY) for t in out.outputs[0].new_token_ids]
    assert streamed == want[0]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2"])
def test_preemption_under_small_kv_budget(name: str) -> None:
    """More sequences than the cache holds: sequences are preempted and recomputed, drafts never preempt anyone,
    and the greedy output is still plain decoding's (tiny-gemma2: sliding-window blocks released as it goes)."""
    g = torch.Generator().manual_seed(2)
    prompts = [[int(t) for t in torch.randint(100, 40000, (14,), generator=g)] * 2 for _ in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = _ids(_llm(_model(name)), prompts, sp)
    llm = _llm(_model(name), {"model": _perturbed(name, 0.2), "num_speculative_tokens": 4}, block_size=4,
               num_blocks=40)
    assert _ids(llm, prompts, sp) == want
    s = llm.stats()
    assert s["num_preemptions"] > 0 and s["spec_num_accepted_tokens"] > 0 and s["kv_blocks_used"] == 0
