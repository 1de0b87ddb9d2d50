"""Speculative decoding on the CUDA runner: verification rows replayed through the decode CUDA graphs (several rows
of one sequence in one replay) give plain decoding's greedy tokens, with prompt lookup and with a draft model."""

from __future__ import annotations

import pytest
import torch

from giants.inference.llm import LLM
from giants.inference.params import SamplingParams

from conftest import cuda

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _ids(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@cuda
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2"])
def test_speculative_greedy_equals_plain_through_the_graphs(name: str) -> None:
    kw = dict(device="cuda", dtype=torch.float32, seed=0, max_model_len=256, num_blocks=256, max_num_seqs=16)
    plain = LLM(name, **kw)
    p = [int(t) for t in torch.randint(100, 4000, (9,), generator=torch.Generator().manual_seed(3))]
    first = _ids(plain, [p])[0]
    prompts = [p, p + first + p]  # the second repeats the model's own continuation: prompt lookup finds it
    want = _ids(plain, prompts)
    assert plain.engine.runner.graphs, "the plain run should decode through CUDA graphs"
    for spec in ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
                 {"model": name, "num_speculative_tokens": 3}):
        llm = LLM(name, speculative_config=spec, **kw)
        assert _ids(llm, prompts) == want, spec
        s = llm.stats()
        assert s["spec_num_drafts"] > 0, s
        if "model" in spec:  # the draft is the target itself (same preset, same seed): nearly every draft accepted
            assert s["spec_acceptance_rate"] > 0.5, s
        assert llm.engine.runner.graphs, "verification should replay the decode graphs"
        del llm
        torch.cuda.empty_cache()
