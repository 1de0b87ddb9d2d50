"""What the engine hands back each step (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]  # cumulative
    finish_reason: str | None = None  # None while running, "stop" or "length" when done, "abort"
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob} sampled + top-N
    new_token_ids: list[int] = field(default_factory=list)  # since the previous output of this request
    new_text: str = ""  # since the previous output; a stop string is never part of it
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs (with logprobs or best_of)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    # speculative decoding (giants.inference.spec_decode): verify steps with drafts, tokens drafted, drafts accepted
    num_spec_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt: str | None = None
    error: str | None = None  # set when the request failed on its own (it is then finished)
    # SamplingParams.prompt_logprobs: per prompt token {token id: logprob} (itself and the top N); the first None
    prompt_logprobs: list[dict[int, float] | None] | None = None
