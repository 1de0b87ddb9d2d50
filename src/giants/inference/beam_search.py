"""Beam search as vLLM's `LLM.beam_search` runs it: one engine step per generated token for every live beam.

Each round sends every beam (prompt + its tokens) to the engine as a one-token request asking for the
2 x beam_width most likely next tokens (as transformers keeps 2 x num_beams candidates); the prefix cache gives
back the KV of the shared prompt and beam prefixes, so a round recomputes only a beam's last partial block.
Candidates ending in EOS (unless ignore_eos) are complete; of the rest, the beam_width best by score go on.
At the end the complete and live beams are ranked together and the beam_width best returned.

Score (vLLM's get_beam_search_score, from transformers' BeamHypotheses): cumulative logprob /
len(tokens) ** length_penalty, where tokens include the prompt and exclude a final EOS. transformers'
generate divides by the generated length instead (EOS included) and stops early by a heuristic, so the two
agree when no beam ends (ignore_eos, or EOS never a candidate) and, with length_penalty 0, whenever the
completed beams transformers keeps are the ones vLLM keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from giants.inference.params import SAMPLING_EPS, SamplingParams, _is_int, _is_num

if TYPE_CHECKING:
    from giants.inference.llm import LLM


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams: beam_width beams, up to max_tokens new tokens each; temperature 0 ranks by the
    model's logprobs alone (above 0, each beam's sampled token also joins its candidates, as in vLLM)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"BeamSearchParams.{name}: {why} (got {getattr(self, name)!r})")

        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise bad("beam_width", "must be an integer >= 1")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0")
        if not _is_num(self.length_penalty) or self.length_penalty != self.length_penalty:
            raise bad("length_penalty", "must be a number")


@dataclass
class BeamSearchSequence:
    """tokens include the prompt; logprobs: per generated token, the candidates' {token id: logprob}."""

    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    stop_reason: int | None = None  # the EOS token that ended it


@dataclass
class BeamSearchOutput:
    """The beam_width best sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_search_score(tokens: list[int], cum_logprob: float, eos_ids: set[int] | frozenset[int],
                      length_penalty: float) -> float:
    seq_len = len(tokens) - (1 if tokens and tokens[-1] in eos_ids else 0)
    return cum_logprob / (seq_len ** length_penalty)


def beam_search(llm: LLM, prompts: Any, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params: must be a BeamSearchParams (got {type(params).__name__})")
    items = llm._normalise(prompts)
    W = params.beam_width
    eos = frozenset(llm.engine.eos_ids)
    step_params = SamplingParams(logprobs=2 * W, max_tokens=1, temperature=params.temperature, ignore_eos=True)
    greedy = params.temperature < SAMPLING_EPS

    def key(b: BeamSearchSequence) -> float:
        return beam_search_score(b.tokens, b.cum_logprob, eos, params.length_penalty)

    live: list[list[BeamSearchSequence]] = [[BeamSearchSequence(tokens=list(ids))] for _, ids in items]
    done: list[list[BeamSearchSequence]] = [[] for _ in items]
    for _ in range(params.max_tokens):
        flat = [(k, b) for k, beams in enumerate(live) for b in beams]
        if not flat:
            break
        outs = llm.generate([b.tokens for _, b in flat], step_params, use_tqdm=use_tqdm)
        nxt: list[list[BeamSearchSequence]] = [[] for _ in items]
        for (k, beam), out in zip(flat, outs):
            c = out.outputs[0]
            if out.error is not None or not c.logprobs:  # no room left (max_model_len): it ends here
                beam.finish_reason = "length"
                done[k].append(beam)
                continue
            cands = c.logprobs[0]
            if greedy:  # the argmax is in the top 2W anyway; ties must not add a (2W+1)-th candidate
                cands = dict(sorted(cands.items(), key=lambda kv: -kv[1])[:2 * W])
            for tok, lp in cands.items():
                new = BeamSearchSequence(tokens=beam.tokens + [tok], logprobs=beam.logprobs + [cands],
                                         cum_logprob=beam.cum_logprob + lp)
                if tok in eos and not params.ignore_eos:
                    new.finish_reason, new.stop_reason = "stop", tok
                    done[k].append(new)
                else:
                    nxt[k].append(new)
        live = [sorted(b, key=key, reverse=True)[:W] for b in nxt]
    results = []
    for k in range(len(items)):
        for b in live[k]:
            b.finish_reason = b.finish_reason or "length"
        best = sorted(done[k] + live[k], key=key, reverse=True)[:W]
        for b in best:
            b.text = llm.tokenizer.decode(b.tokens) if llm.tokenizer is not None else None
        results.append(BeamSearchOutput(sequences=best))
    return results
