"""vLLM's sampling knobs (logit_bias, min_tokens, bad_words, allowed_token_ids, prompt_logprobs, best_of): each
against transformers' own logits processor or generate on a tiny twin, prompt_logprobs against a full forward,
and through `giants serve` with the official `openai` client."""

from __future__ import annotations

import math
import time

import openai
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

import giants
from giants.inference import LLM, SamplingParams
from giants.inference.engine import Engine
from giants.inference.logits_process import apply_logits_processors, bad_words_token_ids, prepare
from giants.inference.sampling import Sampler, SamplingRow

from hf_utils import hf_model_from_config

V = 64
EOS = 2


@pytest.fixture(scope="module")
def tok():
    return giants.load_tokenizer("smollm2-135m")


def _logits(B: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _row(out: list[int], **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), [1, 2, 3], list(out))


# --- each processor against transformers' -----------------------------------------------------------------


def test_logit_bias_equals_sequence_bias_processor():
    x = _logits(3)
    bias = {5: 4.5, 9: -7.0, 63: 100.0}
    got = apply_logits_processors(x, [_row([], logit_bias=bias), _row([]), _row([4], logit_bias={0: -1.0})])
    ref = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(torch.zeros(1, 1, dtype=torch.long),
                                                                           x[:1].clone())
    assert torch.allclose(got[0], ref[0]) and not torch.equal(got[0], x[0])
    assert torch.equal(got[1], x[1])  # a row without knobs is untouched
    assert got[2, 0] == x[2, 0] - 1.0
    assert torch.equal(x, _logits(3))  # the input (the raw distribution for logprobs) is not modified


@pytest.mark.parametrize("n_out", [0, 2, 3, 5])
def test_min_tokens_equals_min_new_tokens_processor(n_out):
    x = _logits(1, n_out)
    prompt = [7, 8, 9]
    out = list(range(10, 10 + n_out))
    row = SamplingRow(SamplingParams(min_tokens=3, stop_token_ids=[11]), prompt, out)
    got = apply_logits_processors(x, [row], eos_ids={EOS})
    ref = MinNewTokensLengthLogitsProcessor(len(prompt), 3, [EOS, 11])(torch.tensor([prompt + out]), x.clone())
    assert torch.equal(got, ref)
    assert torch.isinf(got[0, EOS]).item() == (n_out < 3)
    # ignore_eos: EOS is no stop, so min_tokens leaves it (stop_token_ids are still held back)
    row = SamplingRow(SamplingParams(min_tokens=3, stop_token_ids=[11], ignore_eos=True), prompt, out)
    got = apply_logits_processors(x, [row], eos_ids={EOS})
    assert got[0, EOS] == x[0, EOS] and torch.isinf(got[0, 11]).item() == (n_out < 3)


@pytest.mark.parametrize("out", [[], [5], [5, 6], [6, 5, 6], [4, 5, 6, 7]])
def test_bad_words_equal_no_bad_words_processor(out):
    seqs = [[9], [5, 6, 12], [6, 13], [4, 5, 6, 7, 14]]
    x = _logits(1, len(out))
    p = SamplingParams(bad_words=["x"])
    p.__dict__["_bad_words_ids"] = seqs  # the token sequences, as prepare() tokenises them
    got = apply_logits_processors(x, [SamplingRow(p, [1], list(out))])
    ref = NoBadWordsLogitsProcessor(seqs, eos_token_id=EOS)(torch.tensor([out or [0]]), x.clone())
    if not out:  # transformers needs one token of history; ours is the output alone (vLLM: output ids)
        ref = NoBadWordsLogitsProcessor([s for s in seqs if len(s) == 1], EOS)(torch.tensor([[0]]), x.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.isinf(got[0, 9])


def test_allowed_token_ids_equal_suppress_tokens_processor():
    x = _logits(2)
    allowed = [3, 17, 40]
    got = apply_logits_processors(x, [_row([], allowed_token_ids=allowed), _row([])])
    ref = SuppressTokensLogitsProcessor([t for t in range(V) if t not in allowed])(torch.zeros(1, 1, dtype=torch.long),
                                                                                  x[:1].clone())
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], x[1])


def test_knob_rows_share_a_step_with_plain_rows():
    """The sampled tokens of rows without knobs do not depend on rows with knobs in the batch (seeded rows)."""
    x = _logits(4, 3)
    plain = [SamplingRow(SamplingParams(temperature=0.8, seed=s), [1], [], torch.Generator().manual_seed(s))
             for s in (1, 2)]
    alone = Sampler()(x[[0, 2]], plain)
    plain = [SamplingRow(SamplingParams(temperature=0.8, seed=s), [1], [], torch.Generator().manual_seed(s))
             for s in (1, 2)]
    knob = [_row([], allowed_token_ids=[7]), _row([], temperature=0, logit_bias={11: 1e3})]
    res = Sampler()(x, [plain[0], knob[0], plain[1], knob[1]])
    assert res.tokens == [alone.tokens[0], 7, alone.tokens[1], 11]


def test_bad_words_tokenised_as_vllm_does(tok):
    ids = bad_words_token_ids(["hello", " world peace"], tok)
    assert tok.encode("hello", add_special_tokens=False) in ids
    assert tok.encode(" hello", add_special_tokens=False) in ids  # the word in the middle of a text
    assert tok.encode("world peace", add_special_tokens=False) in ids  # leading spaces stripped first


# --- validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    ({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"logit_bias": {5: float("nan")}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": [" "]}, "bad_words"), ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"), ({"n": 3, "best_of": 2}, "best_of"),
])
def test_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}:"):
        SamplingParams(**kw)


def test_vocab_checks_name_the_field(tok):
    for kw, field in [({"logit_bias": {V: 1.0}}, "logit_bias"), ({"allowed_token_ids": [1, V]}, "allowed_token_ids")]:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}: token id {V} outside"):
            prepare(SamplingParams(**kw), V, tok)
    with pytest.raises(ValueError, match="SamplingParams.bad_words: .*no tokenizer"):
        prepare(SamplingParams(bad_words=["x"]), V, None)


# --- end to end on a tiny twin against transformers' generate ---------------------------------------------------


@pytest.fixture(scope="module")
def twin(tmp_path_factory, tok):
    """(transformers model, giants LLM) with the same weights (tiny-llama shape, the parity regime)."""
    cfg = giants.get_config("tiny-llama")
    hf = hf_model_from_config(cfg, seed=0, active=True)
    path = tmp_path_factory.mktemp("twin")
    hf.save_pretrained(path)
    llm = LLM(giants.load(path), tok, device="cpu", max_model_len=128, num_blocks=64, block_size=4)
    return hf, llm


PROMPT = [11, 200, 3000, 45, 7]


def _hf_greedy(hf, n: int, **kw) -> list[int]:
    out = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, len(PROMPT):].tolist()


def test_generate_with_knobs_equals_transformers(twin, tok):
    hf, llm = twin
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    plain = plain[0].outputs[0].token_ids
    eos = hf.generation_config.eos_token_id
    bad = tok.decode([plain[1]])  # the greedy path's second token, banned
    p = SamplingParams(temperature=0, max_tokens=8, min_tokens=4, logit_bias={eos: 30.0, plain[3]: -5.0},
                       bad_words=[bad])
    got = llm.generate([PROMPT], p, use_tqdm=False)[0].outputs[0]
    bad_ids = p.__dict__["_bad_words_ids"]
    ref = _hf_greedy(hf, 8, min_new_tokens=4, bad_words_ids=bad_ids,
                     sequence_bias=[[[eos], 30.0], [[plain[3]], -5.0]])
    assert got.token_ids == ref
    assert got.token_ids != plain[:len(got.token_ids)]  # the knobs changed the path
    assert len(got.token_ids) == 5 and got.token_ids[-1] == eos and got.finish_reason == "stop"  # EOS from token 5


def test_allowed_token_ids_in_generate(twin):
    _, llm = twin
    out = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=0, max_tokens=12, allowed_token_ids=[5, 6, 99]),
                       use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= {5, 6, 99} and len(out.token_ids) == 12


def test_min_tokens_holds_back_stop_strings(twin, tok):
    _, llm = twin
    base = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([PROMPT], base, use_tqdm=False)[0].outputs[0]
    stop = tok.decode(first.token_ids[:1]).strip() or tok.decode(first.token_ids[:1])
    early = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=[stop]),
                         use_tqdm=False)[0].outputs[0]
    held = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=[stop],
                                                 min_tokens=3), use_tqdm=False)[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) == 1
    assert len(held.token_ids) > 3 and held.token_ids == first.token_ids[:len(held.token_ids)]


def _full_logprobs(llm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(llm.model(torch.tensor([ids])).float(), dim=-1)[0]


def test_prompt_logprobs_equal_full_forward_with_a_prefix_cache_hit(twin):
    _, llm = twin
    ids = PROMPT + list(range(300, 320))  # 25 tokens: 6 full blocks of 4 cached by the first request
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate([ids], sp, use_tqdm=False)[0]
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=3),
                       use_tqdm=False)[0]
    assert out.metrics.num_cached_tokens >= 20  # the paged prefill still used the prefix cache
    assert out.outputs[0].token_ids == first.outputs[0].token_ids
    ref = _full_logprobs(llm, ids)
    plp = out.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None and first.prompt_logprobs is None
    for j in range(1, len(ids)):
        d = plp[j]
        assert math.isclose(d[ids[j]], ref[j - 1, ids[j]].item(), abs_tol=1e-4)
        top = torch.topk(ref[j - 1], 3)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert math.isclose(d[t], v, abs_tol=1e-4)
        assert len(d) in (3, 4)  # the top 3, and the prompt token when it is not among them


def test_knobs_survive_preemption(twin):
    """Four requests in a cache of 12 blocks of 4: some are preempted and recomputed; outputs equal a roomy run."""
    hf, llm = twin
    eng = Engine(llm.model, None, max_model_len=64, block_size=4, num_blocks=12, seed=0)
    roomy = Engine(llm.model, None, max_model_len=64, block_size=4, num_blocks=64, seed=0)
    eos = hf.generation_config.eos_token_id
    params = [SamplingParams(temperature=0, max_tokens=10, min_tokens=6, logit_bias={eos: 40.0}),
              SamplingParams(temperature=0, max_tokens=10, allowed_token_ids=[5, 6, 7, 8], prompt_logprobs=2),
              SamplingParams(temperature=0.9, seed=3, max_tokens=10, ignore_eos=True, n=1, best_of=3),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)]
    results = []
    for e in (eng, roomy):
        for i, p in enumerate(params):
            e.add_request(str(i), PROMPT + [i] * 6, p)
        done = {}
        while e.has_unfinished_requests():
            for o in e.step():
                if o.finished:
                    done[o.request_id] = o
        results.append(done)
    assert eng.num_preemptions > 0
    for i in map(str, range(4)):
        a, b = results[0][i], results[1][i]
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs], i
        assert a.prompt_logprobs == b.prompt_logprobs
    assert len(results[0]["0"].outputs[0].token_ids) == 7  # six held back, then EOS


def test_best_of_returns_the_n_best_candidates(twin):
    _, llm = twin
    kw = dict(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    every = llm.generate([PROMPT], SamplingParams(n=4, logprobs=0, **kw), use_tqdm=False)[0].outputs
    best = llm.generate([PROMPT], SamplingParams(n=2, best_of=4, **kw), use_tqdm=False)[0].outputs
    ranked = sorted(every, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked]
    assert [c.index for c in best] == [0, 1]
    assert len({tuple(c.token_ids) for c in every}) == 4  # distinct candidates: the ranking mattered
    ref = _full_logprobs(llm, PROMPT + best[0].token_ids)
    want = sum(ref[len(PROMPT) - 1 + j, t].item() for j, t in enumerate(best[0].token_ids))
    assert math.isclose(best[0].cumulative_logprob, want, abs_tol=1e-3)


# --- the OpenAI server --------------------------------------------------------------------------------------------

KEY = "sk-knobs"


@pytest.fixture(scope="module")
def client():
    from giants.serve.launch import ServerProcess

    srv = ServerProcess("tiny-llama", "--max-model-len", "256", "--log-level", "warning", api_key=KEY)
    srv.start(wait=False)
    deadline = time.monotonic() + 180
    srv.wait_ready()
    assert time.monotonic() < deadline
    yield openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=60)
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def ref_llm():
    return LLM("tiny-llama", device="cpu", max_model_len=256)


def _err(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


def test_server_logit_bias_min_tokens_allowed_and_bad_words(client, ref_llm, tok):
    r = client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=4, temperature=0,
                                  logit_bias={"1234": 100})
    assert r.choices[0].text == tok.decode([1234] * 4)
    kw = dict(temperature=0, max_tokens=6)
    extra = {"min_tokens": 2, "bad_words": ["the", "and"], "allowed_token_ids": list(range(100, 400))}
    r = client.completions.create(model="tiny-llama", prompt="Hello there", extra_body=extra, **kw)
    want = ref_llm.generate(["Hello there"], SamplingParams(**kw, **extra), use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == want.text and all(100 <= t < 400 for t in want.token_ids)
    c = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, temperature=0, logit_bias={"77": 100})
    assert c.choices[0].message.content == tok.decode([77] * 3)


def test_server_best_of_and_prompt_logprobs(client, ref_llm, tok):
    kw = dict(temperature=1.0, seed=5, max_tokens=5, ignore_eos=True)
    r = client.completions.create(model="tiny-llama", prompt="Once", n=2, best_of=3, seed=5, temperature=1.0,
                                  max_tokens=5, extra_body={"ignore_eos": True})
    want = ref_llm.generate(["Once"], SamplingParams(n=2, best_of=3, **kw), use_tqdm=False)[0].outputs
    assert [ch.text for ch in r.choices] == [c.text for c in want]
    r = client.completions.create(model="tiny-llama", prompt="The cat sat", max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    ids = tok.encode("The cat sat")
    ref = ref_llm.generate([ids], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2),
                           use_tqdm=False)[0].prompt_logprobs
    got = r.choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for j in range(1, len(ids)):
        assert math.isclose(got[j][str(ids[j])]["logprob"], ref[j][ids[j]], abs_tol=1e-5)
    c = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={"prompt_logprobs": 0})
    assert c.model_extra["prompt_logprobs"][0] is None and len(c.model_extra["prompt_logprobs"]) > 3


@pytest.mark.parametrize("stream", [False, True])
def test_server_echo_with_logprobs(client, ref_llm, tok, stream):
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    kw = dict(model="tiny-llama", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    if stream:
        chunks = [ch.choices[0] for ch in client.completions.create(**kw, stream=True) if ch.choices]
        text = "".join(ch.text for ch in chunks)
        tokens = [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens]
        lps = [v for ch in chunks if ch.logprobs for v in ch.logprobs.token_logprobs]
        tops = [v for ch in chunks if ch.logprobs for v in ch.logprobs.top_logprobs]
        offsets = [v for ch in chunks if ch.logprobs for v in ch.logprobs.text_offset]
    else:
        ch = client.completions.create(**kw).choices[0]
        text, tokens, lps = ch.text, ch.logprobs.tokens, ch.logprobs.token_logprobs
        tops, offsets = ch.logprobs.top_logprobs, ch.logprobs.text_offset
    ref = ref_llm.generate([ids], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, logprobs=2),
                           use_tqdm=False)[0]
    out = ref.outputs[0]
    assert text.startswith(prompt) and text == prompt + out.text
    assert len(tokens) == len(ids) + 3 and tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    assert lps[0] is None and tops[0] is None
    want = [ref.prompt_logprobs[j][ids[j]] for j in range(1, len(ids))] + \
        [d[t] for d, t in zip(out.logprobs, out.token_ids)]
    for a, b in zip(lps[1:], want):
        assert math.isclose(a, b, abs_tol=1e-5)
    assert all(len(t) == 2 for t in tops[1:])
    assert offsets == sorted(offsets) and offsets[len(ids)] == sum(len(t) for t in tokens[:len(ids)])


@pytest.mark.parametrize("extra,param", [
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"49152": 1}}, "logit_bias"), ({"allowed_token_ids": [49152]}, "allowed_token_ids"),
    ({"min_tokens": 9}, "min_tokens"), ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"), ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"bad_words": [" "]}, "bad_words"), ({"suffix": "tail"}, "suffix"),
])
def test_server_refuses_by_name(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=4, extra_body=extra)
    assert _err(e.value)["param"] == param, _err(e.value)
