"""LLM.beam_search (vLLM's API and scoring) against transformers' generate(num_beams=..., do_sample=False) on a
tiny Llama twin (same weights, the parity regime so the candidates are well separated)."""

from __future__ import annotations

import math

import pytest
import torch

import giants
from giants.inference import LLM, BeamSearchParams
from giants.inference.beam_search import BeamSearchOutput, beam_search_score

from hf_utils import hf_model_from_config

PROMPT = [11, 200, 3000, 45, 7]
MAX_NEW = 6


@pytest.fixture(scope="module")
def hf():
    return hf_model_from_config(giants.get_config("tiny-llama"), seed=0, active=True)


def _twin(hf, path, eos: int) -> LLM:
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    hf.save_pretrained(path)
    return LLM(giants.load(path), device="cpu", max_model_len=64, num_blocks=48, block_size=4)


def _hf_beams(hf, W: int, length_penalty: float, eos: int) -> tuple[list[list[int]], list[float]]:
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    out = hf.generate(torch.tensor([PROMPT]), num_beams=W, num_return_sequences=W, do_sample=False,
                      max_new_tokens=MAX_NEW, length_penalty=length_penalty, eos_token_id=eos, pad_token_id=0,
                      early_stopping="never", return_dict_in_generate=True, output_scores=True)
    seqs = []
    for row in out.sequences[:, len(PROMPT):].tolist():
        seqs.append(row[:row.index(eos) + 1] if eos in row else row)  # padding after EOS
    return seqs, out.sequences_scores.tolist()


@pytest.fixture(scope="module")
def llm_no_eos(hf, tmp_path_factory):
    return _twin(hf, tmp_path_factory.mktemp("t0"), eos=2)


@pytest.mark.parametrize("W,length_penalty", [(2, 1.0), (3, 0.5), (4, 2.0)])
def test_ignore_eos_equals_transformers(hf, llm_no_eos, W, length_penalty):
    """No beam ends: the same beam_width sequences, in the same order, with the same summed logprobs."""
    res = llm_no_eos.beam_search([PROMPT], BeamSearchParams(beam_width=W, max_tokens=MAX_NEW, ignore_eos=True,
                                                            length_penalty=length_penalty))
    assert isinstance(res[0], BeamSearchOutput) and len(res[0].sequences) == W
    ref, scores = _hf_beams(hf, W, length_penalty, eos=2)  # token 2 is never a candidate here: no beam ends
    got = res[0].sequences
    assert [s.tokens[len(PROMPT):] for s in got] == ref
    for s, sc in zip(got, scores):  # transformers' score: summed logprob / generated length ** penalty
        assert math.isclose(s.cum_logprob, sc * MAX_NEW ** length_penalty, abs_tol=1e-3)
        assert s.tokens[:len(PROMPT)] == PROMPT and s.finish_reason == "length" and len(s.logprobs) == MAX_NEW
    greedy = llm_no_eos.generate([PROMPT], giants.SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0].token_ids
    assert W < 3 or got[0].tokens[len(PROMPT):] != greedy  # a wider beam found a better sequence than greedy


# EOS tokens that are candidates of this model's beams, so some beams end early
@pytest.mark.parametrize("eos", [22800, 1104])
@pytest.mark.parametrize("W", [2, 3])
def test_eos_with_length_penalty_0_equals_transformers(hf, tmp_path, eos, W):
    llm = _twin(hf, tmp_path, eos)
    res = llm.beam_search([PROMPT], BeamSearchParams(beam_width=W, max_tokens=MAX_NEW, length_penalty=0.0))[0]
    ref, scores = _hf_beams(hf, W, 0.0, eos)
    assert [s.tokens[len(PROMPT):] for s in res.sequences] == ref
    assert [round(s.cum_logprob, 3) for s in res.sequences] == pytest.approx([round(x, 3) for x in scores], abs=2e-3)
    if W == 3:  # a beam that ended at EOS is among the best (transformers agrees on it)
        assert any(s.finish_reason == "stop" and s.stop_reason == eos for s in res.sequences)


def test_length_penalty_is_vllms_score(hf, tmp_path):
    """With EOS, the ranking is vLLM's: cum_logprob / (prompt + generated - final EOS) ** length_penalty."""
    eos = 22800
    llm = _twin(hf, tmp_path, eos)
    for lp in (0.0, 1.0, 3.0):
        seqs = llm.beam_search([PROMPT], BeamSearchParams(beam_width=2, max_tokens=MAX_NEW, length_penalty=lp))[0]
        seqs = seqs.sequences
        scores = [s.cum_logprob / (len(s.tokens) - (s.tokens[-1] == eos)) ** lp for s in seqs]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == beam_search_score(seqs[0].tokens, seqs[0].cum_logprob, {eos}, lp)
        with torch.no_grad():  # each beam's cum_logprob is its tokens' summed logprob under a full forward
            lps = torch.log_softmax(llm.model(torch.tensor([seqs[0].tokens])).float(), -1)[0]
        want = sum(lps[j - 1, seqs[0].tokens[j]].item() for j in range(len(PROMPT), len(seqs[0].tokens)))
        assert math.isclose(seqs[0].cum_logprob, want, abs_tol=1e-3)
    short = llm.beam_search([PROMPT], BeamSearchParams(beam_width=2, max_tokens=MAX_NEW, length_penalty=1.0))[0]
    assert short.sequences[0].tokens[-1] == eos  # the ended beam wins under vLLM's score (transformers' differs)


def test_several_prompts_and_text(hf, llm_no_eos):
    llm_no_eos.tokenizer = giants.load_tokenizer("smollm2-135m")
    try:
        p = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
        both = llm_no_eos.beam_search([PROMPT, [9, 8, 7]], p)
        alone = llm_no_eos.beam_search([[9, 8, 7]], p)
        assert [s.tokens for s in both[1].sequences] == [s.tokens for s in alone[0].sequences]
        assert both[0].sequences[0].text == llm_no_eos.tokenizer.decode(both[0].sequences[0].tokens)
    finally:
        llm_no_eos.tokenizer = None


@pytest.mark.parametrize("kw,field", [({"beam_width": 0}, "beam_width"), ({"max_tokens": 0}, "max_tokens"),
                                      ({"temperature": -1.0}, "temperature"),
                                      ({"length_penalty": float("nan")}, "length_penalty")])
def test_params_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"BeamSearchParams.{field}:"):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kw})
