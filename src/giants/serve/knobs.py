"""The sampling knobs vLLM's OpenAI server takes beyond OpenAI's own (and OpenAI's logit_bias and best_of):
request fields -> SamplingParams keywords, refused by name where they cannot apply, and the prompt logprobs
in the responses (vLLM's `prompt_logprobs`, and the completions API's `echo` with `logprobs`).

prompt_logprobs come back as vLLM writes them: per prompt token None (the first) or {token id (a string):
{"logprob", "decoded_token"}} with the token itself and the N most likely (giants gives no `rank`).
"""

from __future__ import annotations

from typing import Any

from giants.serve.errors import APIError
from giants.serve.protocol import CompletionLogprobs

MAX_OPENAI_LOGIT_BIAS = 100.0  # OpenAI's range for a bias: [-100, 100]
MAX_BAD_WORDS = 256
MAX_BAD_WORD_CHARS = 1024


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


def sampling_kwargs(body: Any, vocab_size: int, tokenizer: Any, echo_logprobs: int | None = None) -> dict[str, Any]:
    """SamplingParams keywords for logit_bias, min_tokens, bad_words, allowed_token_ids, best_of and
    prompt_logprobs (`echo_logprobs`: the completions API's logprobs when echo is on: the prompt's too)."""
    kw: dict[str, Any] = {}
    if body.logit_bias:
        bias: dict[int, float] = {}
        for key, v in body.logit_bias.items():
            try:
                t = int(key)
            except ValueError:
                raise _bad("logit_bias", f"logit_bias keys must be token ids (got {key!r})") from None
            if not 0 <= t < vocab_size:
                raise _bad("logit_bias", f"token id {t} in logit_bias is outside the vocabulary (0..{vocab_size - 1})")
            if not -MAX_OPENAI_LOGIT_BIAS <= v <= MAX_OPENAI_LOGIT_BIAS:
                raise _bad("logit_bias", f"logit_bias values must be in [-100, 100] (got {v!r} for {key!r})")
            bias[t] = float(v)
        kw["logit_bias"] = bias
    if body.min_tokens is not None:
        kw["min_tokens"] = body.min_tokens
    if body.bad_words:
        if tokenizer is None:
            raise APIError(400, "bad_words are tokenised and this server has no tokenizer", "bad_words",
                           "unsupported_parameter")
        if len(body.bad_words) > MAX_BAD_WORDS or any(len(w) > MAX_BAD_WORD_CHARS for w in body.bad_words):
            raise _bad("bad_words", f"at most {MAX_BAD_WORDS} bad_words of at most {MAX_BAD_WORD_CHARS} characters")
        kw["bad_words"] = list(body.bad_words)
    if body.allowed_token_ids is not None:
        bad = [t for t in body.allowed_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise _bad("allowed_token_ids", f"token id {bad[0]} in allowed_token_ids is outside the vocabulary "
                       f"(0..{vocab_size - 1})")
        kw["allowed_token_ids"] = list(body.allowed_token_ids)
    if body.best_of is not None and body.best_of != body.n:
        if body.stream:
            raise APIError(400, "best_of other than n cannot stream (the best are known only at the end)", "best_of",
                           "unsupported_parameter")
        kw["best_of"] = body.best_of
    plp = body.prompt_logprobs
    if plp is not None and body.stream:
        raise APIError(400, "prompt_logprobs is not returned in streams", "prompt_logprobs", "unsupported_parameter")
    if echo_logprobs is not None:
        plp = max(plp or 0, echo_logprobs)
    if plp is not None:
        kw["prompt_logprobs"] = plp
    return kw


def num_seqs(body: Any) -> int:
    """Sequences one prompt runs: best_of when it is more than n."""
    return max(body.n, body.best_of or 0)


def prompt_logprobs_json(tok: Any, plp: list[dict[int, float] | None] | None) -> list[Any] | None:
    if plp is None:
        return None
    return [None if d is None else {str(t): {"logprob": float(v), "decoded_token": tok.decode([t])}
                                    for t, v in sorted(d.items(), key=lambda kv: -kv[1])} for d in plp]


def echo_logprobs(tok: Any, prompt: list[int], plp: list[dict[int, float] | None] | None,
                  n: int) -> CompletionLogprobs:
    """The prompt's part of a completion choice's logprobs (echo with logprobs): OpenAI's shape, first token null."""
    out = CompletionLogprobs()
    pos = 0
    for t, d in zip(prompt, plp or [None] * len(prompt)):
        text = tok.decode([t])
        out.tokens.append(text)
        out.token_logprobs.append(None if d is None else float(d[t]))
        out.top_logprobs.append(None if d is None else {
            tok.decode([i]): float(v) for i, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]})
        out.text_offset.append(pos)
        pos += len(text)
    return out


def join_logprobs(head: CompletionLogprobs, tail: CompletionLogprobs | None) -> CompletionLogprobs:
    """head (the echoed prompt) then tail (the completion, its text offsets already past the prompt's)."""
    if tail is None:
        return head
    return CompletionLogprobs(tokens=head.tokens + tail.tokens,
                              token_logprobs=head.token_logprobs + tail.token_logprobs,
                              top_logprobs=head.top_logprobs + tail.top_logprobs,
                              text_offset=head.text_offset + tail.text_offset)


def text_len(lp: CompletionLogprobs) -> int:
    return sum(len(t) for t in lp.tokens)
