"""SamplingParams: per-request decoding settings (vLLM's names and defaults), validated on creation."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Any


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Temperatures below this are greedy: dividing the logits by less overflows float32 or underflows to 0 (vLLM's
# _SAMPLING_EPS); a float32 temperature of 0 would turn every logit into +-inf and every draw into token 0.
SAMPLING_EPS = 1e-5
# The ranges the sampler can take: top_k goes to the device as int64 (values >= the vocabulary mean "off"),
# the seed into torch.Generator.manual_seed, the penalties and temperature into float32 without overflow.
MAX_TOP_K = 2**31 - 1
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
MAX_TEMPERATURE = 1e6
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


@dataclass
class SamplingParams:
    """temperature 0 (or below SAMPLING_EPS, 1e-5) = greedy; top_k 0 or -1 = off; top_p 1 = off; min_p 0 = off;
    penalties 1/0 = off.
    `stop` strings are never part of the returned text; `stop_token_ids` end a sequence like EOS does.
    `logprobs=N` returns, per generated token, the log-probabilities (of the model's raw distribution)
    of the sampled token and the N most likely tokens.
    vLLM's logits knobs (giants.inference.logits_process): `logit_bias` {token id: bias} added to the logits,
    `min_tokens` (EOS, stop_token_ids and stop strings cannot end a sequence before it has that many tokens),
    `bad_words` (strings whose token sequences are never completed), `allowed_token_ids` (only these are
    sampled), `prompt_logprobs=N` (per prompt token: its logprob and the N most likely; the first None),
    `best_of` (> n: sample best_of sequences, return the n with the highest cumulative logprob)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    best_of: int | None = None
    # structured output (giants.inference.guided; at most one): a JSON schema, a regex, one of the strings, a Lark
    # or GBNF grammar, or vLLM's GuidedDecodingParams (`structured_outputs` is its newer name)
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding: Any = None
    structured_outputs: InitVar[Any] = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self, structured_outputs: Any = None) -> None:
        if structured_outputs is not None:
            if self.guided_decoding is not None:
                raise ValueError("SamplingParams.structured_outputs: give it or guided_decoding, not both")
            self.guided_decoding = structured_outputs
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}: {why} (got {getattr(self, name)!r})")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not _is_num(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be a number in [0, {MAX_TEMPERATURE:g}] (below {SAMPLING_EPS:g}: greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"must be an integer: -1 or 0 (off) or in [1, {MAX_TOP_K}]")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not _is_num(self.repetition_penalty) or \
                not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] "
                      "(1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None and (not _is_int(self.seed) or not MIN_SEED <= self.seed <= MAX_SEED):
            raise bad("seed", f"must be an integer in [{MIN_SEED}, {MAX_SEED}] or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or None (up to max_model_len)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be an integer >= 0 or None")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        from giants.inference.logits_process import validate_knobs

        validate_knobs(self, bad)

        from giants.inference.guided import grammar_for

        try:
            self.__dict__["_grammar"] = grammar_for(self)
        except ValueError as e:
            raise ValueError(f"SamplingParams.{e}") from None

    @property
    def grammar(self) -> str | None:
        """The structured-output constraint as llguidance grammar text (None: unconstrained)."""
        return self.__dict__.get("_grammar")

    @property
    def guided_field(self) -> str | None:
        from giants.inference.guided import GUIDED_FIELDS

        return next((f for f in GUIDED_FIELDS if getattr(self, f) is not None), None)

    @property
    def stop_matcher(self):
        """The stop strings' matcher (giants.inference.detokenize.StopMatcher), built on first use and shared by
        every sequence of the request; None without stop strings."""
        if not self.stop_strings:
            return None
        m = self.__dict__.get("_stop_matcher")
        if m is None or m.stops != self.stop_strings:
            from giants.inference.detokenize import StopMatcher

            m = self.__dict__["_stop_matcher"] = StopMatcher(self.stop_strings)
        return m

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def k(self) -> int:
        """top-k with 0 meaning off."""
        return max(self.top_k, 0)
