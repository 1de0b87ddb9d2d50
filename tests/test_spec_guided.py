"""Speculative decoding under structured output (spec_decode + guided): drafts cut at the first token the grammar
refuses, verification rows masked by the grammar state after their drafts, the sequence's matcher advanced by the
appended tokens only. Greedy output is plain guided decoding's token for token (tiny twin and SmolLM2, prompt
lookup and a draft equal to the target); sampled output always satisfies the grammar."""

from __future__ import annotations

import copy
import functools
import json
import re
from types import SimpleNamespace

import jsonschema
import pytest
import torch

from giants.inference import guided
from giants.inference.guided import GuideAhead, apply_guides, grammars_for, new_guide
from giants.inference.llm import LLM, _smollm2_tokenizer, random_model
from giants.inference.params import SamplingParams
from giants.inference.rejection import sample_draft
from giants.inference.sampling import Sampler, SamplingRow
from giants.inference.spec_decode import draft_for, expand_rows
from test_guided import SCHEMA  # nested objects, enums, arrays; bounded so every sample closes

SMOLLM2 = "smollm2-135m"
EXAMPLE = ('{"name":"Ann","age":31,"role":"admin","tags":["a","b"],"address":{"city":"Paris","zip":75001}}\n'
           '{"name":"Bob","age":42,"role":"user","tags":["c"],"address":{"city":"Rome","zip":100}}\n')
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICE = ["Paris", "London", "Rome", "Berlin"]
# prompts that repeat what the grammar makes the answer start with: prompt lookup finds drafts in them
CASES = [(dict(guided_json=SCHEMA), "Users as JSON, one a line:\n" + EXAMPLE),
         (dict(guided_regex=REGEX), "Codes: 123-ab, 456-cd, 789-ef, 123-ab, 456-"),
         (dict(guided_choice=CHOICE), "Capitals: Paris, London, Rome, Berlin. The capital of France is")]


def _ngram(k: int = 4) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def tok():
    t = _smollm2_tokenizer()
    if t is None:
        pytest.skip("needs SmolLM2's tokenizer (`giants download smollm2-135m`)")
    return t


@functools.cache
def _twin(seed: int = 0) -> torch.nn.Module:
    return random_model("tiny-llama", torch.device("cpu"), torch.float32, seed)


def _tiny(tok, spec=None, **kw) -> LLM:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("num_blocks", 256)
    return LLM(copy.deepcopy(_twin()), tokenizer=tok, speculative_config=spec, **kw)


def _guide(tok, **params):
    return new_guide(SamplingParams(**params), tok, 49152, {2})


def _ids(tok, text: str) -> list[int]:
    e = tok.encode(text)
    return list(getattr(e, "ids", e))


# ---- the pieces ---------------------------------------------------------------------------------------------
def test_draft_cut_at_the_first_refused_token(tok) -> None:
    g = _guide(tok, guided_choice=["yes", "no way"])
    no_way = _ids(tok, "no way")
    assert len(no_way) == 2
    assert g.valid_prefix(no_way + [5, 6]) == no_way  # "no way" then junk: cut after the grammar's end
    assert g.valid_prefix([no_way[0], 5, no_way[1]]) == [no_way[0]]
    assert g.valid_prefix([5] + no_way) == [] and g.valid_prefix([]) == []
    seq = SimpleNamespace(guide=g)
    assert draft_for(seq, no_way + [7]) == no_way
    assert draft_for(SimpleNamespace(guide=None), [5, 6]) == [5, 6]  # unconstrained: the draft as proposed
    # the matcher was only looked at: a refused draft leaves no trace
    assert g.valid_prefix(no_way) == no_way and not g.done
    g.accept(no_way[0])
    assert g.valid_prefix(no_way[1:] + [9]) == no_way[1:]


def _mask(logits: torch.Tensor) -> list[bool]:
    return (logits > float("-inf")).tolist()


@pytest.mark.parametrize("draft_aware", [True, False])
def test_verification_rows_masked_after_their_drafts(tok, monkeypatch, draft_aware: bool) -> None:
    """Row j's mask is the grammar state after the first j drafts (llguidance's draft-aware parallel mask, or, on an
    llguidance without it, consume/mask/rollback); the guide's own state is unchanged afterwards."""
    if not draft_aware:
        real = guided._executor or guided._import().LLExecutor()
        monkeypatch.setattr(guided, "_executor", SimpleNamespace(unsafe_compute_mask_ptr=real.unsafe_compute_mask_ptr))
    g = _guide(tok, guided_json=SCHEMA)
    other = _guide(tok, guided_regex=REGEX)
    draft = _ids(tok, '{"name":"Ann","age":3')
    assert g.valid_prefix(draft) == draft
    rows = [SamplingRow(SamplingParams(), [0], [], None, other),
            SamplingRow(SamplingParams(), [0], [], None, None),
            SamplingRow(SamplingParams(), [0], [], None, g)]
    expanded = expand_rows(rows, [[], [], draft])
    assert [type(r.guide).__name__ for r in expanded] == ["Guide", "NoneType", "Guide"] + ["GuideAhead"] * len(draft)
    assert expanded[-1].guide == GuideAhead(g, tuple(draft))
    V = 49152
    logits = torch.zeros(len(expanded), V)
    got = apply_guides(logits, [r.guide for r in expanded])
    ref = grammars_for(tok, V, {2}).matcher(SamplingParams(guided_json=SCHEMA).grammar)
    for j in range(len(draft) + 1):
        want = apply_guides(torch.zeros(1, V), [guided.Guide(ref)])
        assert _mask(got[2 + j]) == _mask(want[0]), j
        if j < len(draft):
            assert ref.consume_token(draft[j])
    assert _mask(got[0]) == _mask(apply_guides(torch.zeros(1, V), [_guide(tok, guided_regex=REGEX)])[0])
    assert bool((got[1] == 0).all())  # unconstrained
    assert g.valid_prefix(draft) == draft and g.matcher.validate_tokens(draft[1:]) == 0  # still at the start
    # a row ahead of its guide on its own (no run from the guide's own row) is masked the same way
    alone = apply_guides(torch.zeros(1, V), [g.ahead(draft[:3])])
    assert _mask(alone[0]) == _mask(got[2 + 3])


def test_sampled_draft_q_masked_like_the_target_row(tok) -> None:
    """A sampled guided row's draft is drawn from q masked by the grammar state after the drafts so far, the mask
    of the target's verification row at that position: q is zero exactly where the grammar refuses, and the draw
    is a token the grammar takes (so the draft is never cut and min(1, p/q) is exact)."""
    g = _guide(tok, guided_json=SCHEMA)
    ahead = _ids(tok, '{"name":"Ann","age":')
    V = 49152
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    rows = [SamplingRow(SamplingParams(temperature=1.0), [0], ahead[:j], torch.Generator().manual_seed(j),
                        g.ahead(ahead[:j])) for j in (0, len(ahead))]
    for _ in range(5):
        toks, q = sample_draft(Sampler(), logits, rows)
        masks = apply_guides(torch.zeros(2, V), [r.guide for r in rows]) > float("-inf")
        assert torch.equal(q > 0, masks) and torch.allclose(q.sum(-1), torch.ones(2))
        t0, t1 = toks.tolist()
        assert g.valid_prefix([t0]) == [t0] and g.valid_prefix(ahead + [t1]) == ahead + [t1]
    assert g.valid_prefix(ahead) == ahead and g.matcher.validate_tokens(ahead[1:]) == 0  # the guide is untouched


def test_sampled_guided_drafts_accepted_when_the_draft_is_the_target(tok) -> None:
    """Sampled JSON with a draft equal to the target: the masked q equals the target's p, so every draft is
    accepted (measured 1.000 over 254 drafts, 3.95 tokens a step); greedy drafts of the unconstrained draft model
    are cut by the grammar or rejected (measured 0.000)."""
    rates = {}
    for sample in (True, False):
        llm = _tiny(tok, {"model": copy.deepcopy(_twin()), "num_speculative_tokens": 3})
        llm.engine.spec.proposer.sample_drafts = sample
        outs = llm.generate([_ids(tok, CASES[0][1])] * 8, [SamplingParams(temperature=1.0, max_tokens=120,
                                                                          guided_json=SCHEMA, seed=i)
                                                           for i in range(8)], use_tqdm=False)
        for o in outs:
            assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
            _check(CASES[0][0], o.outputs[0].text)
        rates[sample] = llm.stats()
    assert rates[True]["spec_acceptance_rate"] >= 0.98 and rates[True]["spec_tokens_per_step"] > 3.5, rates[True]
    assert rates[False]["spec_acceptance_rate"] < 0.5, rates[False]


# ---- the engine: greedy identical, speculation happens, sampled output valid -------------------------------
def _run(llm: LLM, tok, params: dict, text: str, **sp) -> list[int]:
    sp = SamplingParams(temperature=0, max_tokens=64, **params, **sp)
    return llm.generate([_ids(tok, text)], sp, use_tqdm=False)[0].outputs[0]


def _check(params: dict, text: str) -> None:
    if "guided_json" in params:
        jsonschema.validate(json.loads(text), SCHEMA)
    elif "guided_regex" in params:
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CHOICE, text


def test_greedy_identical_on_a_twin(tok) -> None:
    plain = _tiny(tok)
    want = [_run(plain, tok, p, t) for p, t in CASES]
    for o, (p, _) in zip(want, CASES):
        assert o.finish_reason == "stop", o.text  # each grammar completes (random weights, bounded schema)
        _check(p, o.text)
    for label, spec in {"ngram": _ngram(), "draft-equals-target": {"model": copy.deepcopy(_twin()),
                                                                   "num_speculative_tokens": 4}}.items():
        llm = _tiny(tok, spec)
        for w, (p, t) in zip(want, CASES):
            o = _run(llm, tok, p, t)
            assert o.token_ids == w.token_ids, (label, p.keys(), o.text, w.text)
            assert o.finish_reason == w.finish_reason
        s = llm.stats()
        assert s["kv_blocks_used"] == 0
        if label == "ngram":  # the prompts repeat what the grammar forces: drafts found and accepted
            assert s["spec_num_drafts"] > 0 and s["spec_num_accepted_tokens"] > 0, s


def test_speculation_happens_for_guided_sequences(tok) -> None:
    llm = _tiny(tok, _ngram())
    prompt = _ids(tok, CASES[0][1])
    outs = llm.generate([prompt] * 2, SamplingParams(temperature=0, max_tokens=60, guided_json=SCHEMA),
                        use_tqdm=False)
    for o in outs:
        m = o.metrics
        assert m.num_spec_drafts > 0 and m.num_draft_tokens > 0 and m.num_accepted_tokens > 0, m
    s = llm.stats()
    assert s["spec_num_accepted_tokens"] > 0 and s["spec_tokens_per_step"] > 1


@pytest.mark.parametrize("spec", ["ngram", "draft-equals-target"])
def test_sampled_output_satisfies_the_grammar(tok, spec: str) -> None:
    """20 requests at temperature 1 (and a regex, a choice batched with them): every output validates and ends
    because its grammar completed."""
    cfg = _ngram() if spec == "ngram" else {"model": copy.deepcopy(_twin()), "num_speculative_tokens": 3}
    llm = _tiny(tok, cfg)
    prompts, params = [], []
    for i in range(20):
        prompts.append(_ids(tok, CASES[0][1]))
        params.append(SamplingParams(temperature=1.0, max_tokens=120, guided_json=SCHEMA, seed=i))
    for i, (p, t) in enumerate(CASES[1:]):
        prompts.append(_ids(tok, t))
        params.append(SamplingParams(temperature=1.0, max_tokens=20, seed=100 + i, **p))
    outs = llm.generate(prompts, params, use_tqdm=False)
    kinds = [CASES[0][0]] * 20 + [p for p, _ in CASES[1:]]
    for o, p in zip(outs, kinds):
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        _check(p, o.outputs[0].text)
    assert llm.stats()["spec_num_drafts"] > 0


def test_guided_speculation_under_preemption_and_prefix_caching(tok) -> None:
    """A cache too small for the batch: guided speculating sequences are preempted and recomputed (prefix-cache
    hits included), their grammar state kept; greedy output is still plain guided decoding's."""
    prompt = _ids(tok, CASES[0][1])
    prompts = [prompt + _ids(tok, f" #{i}\n") for i in range(4)]
    sp = SamplingParams(temperature=0, max_tokens=60, guided_json=SCHEMA)
    want = [o.outputs[0].token_ids for o in _tiny(tok).generate(prompts, sp, use_tqdm=False)]
    llm = _tiny(tok, _ngram(), block_size=4, num_blocks=len(prompt) // 4 * 2 + 24)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == want
    s = llm.stats()
    assert s["num_preemptions"] > 0 and s["prefix_cache_hits"] > 0 and s["spec_num_accepted_tokens"] > 0, s
    assert s["kv_blocks_used"] == 0


# ---- SmolLM2 --------------------------------------------------------------------------------------------------
# KV caches sized for what each test runs, not the CPU's 1 GiB default (zero-filling it took seconds per engine):
# one sequence at a time (64 blocks: two full-length sequences), or 20 sequences each at max_model_len (640 blocks:
# no preemption possible, as with the default).
ONE_SEQ = dict(max_model_len=512, cpu_threads=1, num_blocks=64)
TWENTY_SEQS = dict(max_model_len=512, cpu_threads=1, num_blocks=20 * 512 // 16)


@pytest.fixture(scope="module")
def smol_plain(tok):
    return LLM(SMOLLM2, **ONE_SEQ)


def test_greedy_identical_on_smollm2(tok, smol_plain) -> None:
    want = [_run(smol_plain, tok, p, t) for p, t in CASES]
    for o, (p, _) in zip(want, CASES):
        assert o.finish_reason == "stop", o.text
        _check(p, o.text)
    for label, spec in {"ngram": _ngram(), "draft-equals-target": {"model": SMOLLM2,
                                                                   "num_speculative_tokens": 3}}.items():
        llm = LLM(SMOLLM2, **ONE_SEQ, speculative_config=spec)
        for w, (p, t) in zip(want, CASES):
            o = _run(llm, tok, p, t)
            assert o.token_ids == w.token_ids, (label, p.keys(), o.text, w.text)
        s = llm.stats()
        assert s["spec_num_drafts"] > 0 and s["spec_num_accepted_tokens"] > 0, (label, s)


def test_sampled_json_on_smollm2(tok) -> None:
    llm = LLM(SMOLLM2, **TWENTY_SEQS, speculative_config=_ngram())
    prompt = _ids(tok, CASES[0][1])
    outs = llm.generate([prompt] * 20, [SamplingParams(temperature=1.0, max_tokens=120, guided_json=SCHEMA, seed=i)
                                        for i in range(20)], use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
    s = llm.stats()
    assert s["spec_num_drafts"] > 0 and s["spec_num_accepted_tokens"] > 0, s
