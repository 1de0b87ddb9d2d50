"""vLLM's per-request logits knobs, applied inside the batched sampler, and the request-level ones around it.

In the sampler (before penalties and temperature, in vLLM V1's order): `allowed_token_ids` (every other token
at -inf) -> `bad_words` (the last token of a banned sequence at -inf when the output so far ends with the rest
of it) -> `min_tokens` (EOS and stop_token_ids at -inf while the output is shorter) -> `logit_bias` (added).
Rows without these knobs cost one attribute check each, so requests with and without them share a step.
Returned logprobs stay those of the model's raw distribution, as vLLM's default (`raw_logprobs`) gives them.

Around the sampler: `prompt_logprobs` (a separate full forward over the prompt, for the requests that ask
only: the paged prefill and its prefix-cache hits stay untouched), `best_of` (best_of sequences sampled, the n
with the highest cumulative logprob returned), and the checks that need the vocabulary or the tokenizer.

Legend: B rows, V vocabulary, T prompt tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from giants.inference.params import SamplingParams
    from giants.inference.sampling import SamplingRow

# Rows of the prompt whose logits are materialised at once for prompt_logprobs: bounds the (rows, V) float32
# buffer (512 x 256k vocabulary = 512 MB) whatever the prompt's length.
PROMPT_LOGPROBS_CHUNK = 256
MAX_LOGIT_BIAS = 1e6  # float32-safe (a bias of 1e38 would overflow the logit to inf)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_knobs(p: SamplingParams, bad: Callable[[str, str], ValueError]) -> None:
    """Type and range checks that need no model (SamplingParams.validate calls this); the token ids' upper bound
    is checked by `check_vocab` where the vocabulary is known."""
    if p.logit_bias is not None:
        if not isinstance(p.logit_bias, dict) or not all(
                _is_int(k) and k >= 0 and isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and abs(v) <= MAX_LOGIT_BIAS for k, v in p.logit_bias.items()):
            raise bad("logit_bias", f"must be a dict of token id (int >= 0) -> finite bias in "
                      f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
    if not _is_int(p.min_tokens) or p.min_tokens < 0:
        raise bad("min_tokens", "must be an integer >= 0")
    if p.max_tokens is not None and _is_int(p.max_tokens) and p.min_tokens > p.max_tokens:
        raise bad("min_tokens", f"must be <= max_tokens={p.max_tokens}")
    if p.prompt_logprobs is not None and (not _is_int(p.prompt_logprobs) or p.prompt_logprobs < 0):
        raise bad("prompt_logprobs", "must be an integer >= 0 or None")
    if p.bad_words is not None and (not isinstance(p.bad_words, list) or not all(
            isinstance(w, str) and w.strip() for w in p.bad_words)):
        raise bad("bad_words", "must be a list of non-blank strings")
    if p.allowed_token_ids is not None and (not isinstance(p.allowed_token_ids, list) or not p.allowed_token_ids
                                            or not all(_is_int(t) and t >= 0 for t in p.allowed_token_ids)):
        raise bad("allowed_token_ids", "must be a non-empty list of token ids (ints >= 0)")
    if p.best_of is not None and (not _is_int(p.best_of) or not _is_int(p.n) or p.best_of < p.n):
        raise bad("best_of", f"must be an integer >= n={p.n} or None")


def check_vocab(p: SamplingParams, vocab_size: int) -> None:
    """Token ids of the knobs inside [0, vocab_size): a ValueError naming the field otherwise."""
    fields: list[tuple[str, Iterable[int]]] = [("logit_bias", (p.logit_bias or {}).keys()),
                                               ("allowed_token_ids", p.allowed_token_ids or [])]
    for name, ids in fields:
        for t in ids:
            if t >= vocab_size:
                raise ValueError(f"SamplingParams.{name}: token id {t} outside [0, vocab_size={vocab_size})")


def bad_words_token_ids(words: list[str], tokenizer: Any) -> list[list[int]]:
    """vLLM's tokenisation of bad_words: each word as written (leading spaces stripped) and, when that gives a
    different first token but as many tokens, with one leading space (the word in the middle of a text)."""
    out: list[list[int]] = []
    for word in words:
        plain = _encode(tokenizer, word.lstrip())
        if plain:
            out.append(plain)
        spaced = _encode(tokenizer, " " + word.lstrip())
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(spaced)
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))


def prepare(p: SamplingParams, vocab_size: int, tokenizer: Any) -> None:
    """At add_request: the vocabulary checks, and bad_words tokenised once (kept on the params, shared by every
    sequence and request that uses them)."""
    check_vocab(p, vocab_size)
    if p.bad_words:
        if tokenizer is None:
            raise ValueError("SamplingParams.bad_words: bad words are tokenised and this model has no tokenizer "
                             f"(got {p.bad_words!r})")
        key = (id(tokenizer), tuple(p.bad_words))
        if p.__dict__.get("_bad_words_key") != key:
            ids = bad_words_token_ids(p.bad_words, tokenizer)
            for seq in ids:
                for t in seq:
                    if not 0 <= t < vocab_size:
                        raise ValueError(f"SamplingParams.bad_words: token id {t} outside [0, vocab_size={vocab_size})")
            p.__dict__["_bad_words_ids"], p.__dict__["_bad_words_key"] = ids, key


def _active(p: SamplingParams) -> bool:
    return bool(p.logit_bias or p.min_tokens or p.bad_words or p.allowed_token_ids is not None)


def wants_cumulative(p: SamplingParams) -> bool:
    """The sampled token's logprob is needed (best_of ranks sequences by their sum)."""
    return p.best_of is not None and p.best_of > p.n


def apply_logits_processors(logits: torch.Tensor, rows: list[SamplingRow], eos_ids: Iterable[int] = ()
                            ) -> torch.Tensor:
    """logits (B, V) float -> the same with each row's knobs applied (a new tensor when any row has one: the
    caller keeps the input as the raw distribution). eos_ids: what min_tokens holds back besides stop_token_ids
    (unless ignore_eos)."""
    if not any(_active(r.params) for r in rows):
        return logits
    B, V = logits.shape
    dev = logits.device
    out = logits.clone()
    ban_r: list[int] = []
    ban_c: list[int] = []
    bias_r: list[int] = []
    bias_c: list[int] = []
    bias_v: list[float] = []
    for i, r in enumerate(rows):
        p = r.params
        if not _active(p):
            continue
        if p.allowed_token_ids is not None:
            keep = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=dev)
            row = torch.full((V,), float("-inf"), dtype=out.dtype, device=dev)
            row[keep] = out[i, keep]
            out[i] = row
        if p.bad_words:
            hist = r.output_ids
            for seq in p.__dict__.get("_bad_words_ids") or []:
                k = len(seq) - 1
                if k == 0 or (len(hist) >= k and hist[len(hist) - k:] == seq[:-1]):
                    ban_r.append(i)
                    ban_c.append(seq[-1])
        if p.min_tokens and len(r.output_ids) < p.min_tokens:
            stops = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                stops.update(eos_ids)
            for t in stops:
                if t < V:
                    ban_r.append(i)
                    ban_c.append(t)
        if p.logit_bias:
            for t, b in p.logit_bias.items():
                bias_r.append(i)
                bias_c.append(t)
                bias_v.append(float(b))
    if ban_r:
        out[torch.tensor(ban_r, device=dev), torch.tensor(ban_c, device=dev)] = float("-inf")
    if bias_r:
        out.index_put_((torch.tensor(bias_r, device=dev), torch.tensor(bias_c, device=dev)),
                       torch.tensor(bias_v, dtype=out.dtype, device=dev), accumulate=True)
    return out


def engine_prompt_logprobs(engine: Any, ids: list[int], n: int) -> list[dict[int, float] | None]:
    """prompt_logprobs for a request the engine is adding: a full forward of the engine's own model (so the
    paged prefill, its prefix-cache hits and a later preemption's recompute are all unaffected)."""
    from giants.inference.runner import ModelRunner

    runner = engine.runner
    if not isinstance(runner, ModelRunner):  # tensor parallelism: engine.model is only rank 0's shard
        raise ValueError("SamplingParams.prompt_logprobs: not supported with tensor_parallel_size > 1 "
                         f"(got {n})")
    if getattr(engine.model, "placement", None) is not None:
        raise ValueError(f"SamplingParams.prompt_logprobs: not supported with device_map (got {n})")
    return prompt_logprobs(engine.model, runner._head, ids, n, engine.device)


@torch.inference_mode()
def prompt_logprobs(model: Any, head: Callable[[torch.Tensor], torch.Tensor], ids: list[int], n: int,
                    device: torch.device) -> list[dict[int, float] | None]:
    """vLLM's RequestOutput.prompt_logprobs: None for the first token, then per prompt token {token id: logprob}
    of the token itself and the n most likely at its position, from one full forward over the prompt.
    head: hidden (rows, d) -> logits (rows, V), the runner's own (soft-cap, int8 or packed head)."""
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]
    hidden = model(x, return_hidden=True)[0]  # (T, d), final norm applied
    out: list[dict[int, float] | None] = [None]
    T = len(ids)
    for s in range(0, T - 1, PROMPT_LOGPROBS_CHUNK):
        e = min(s + PROMPT_LOGPROBS_CHUNK, T - 1)
        lp = torch.log_softmax(head(hidden[s:e]).float(), dim=-1)  # row j predicts token s + j + 1
        target = torch.tensor(ids[s + 1:e + 1], dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, target[:, None])[:, 0].tolist()
        k = min(n, lp.shape[-1])
        top_v, top_i = torch.topk(lp, k, dim=-1) if k else (None, None)
        tv = top_v.tolist() if k else None
        ti = top_i.tolist() if k else None
        for j in range(e - s):
            d: dict[int, float] = dict(zip(ti[j], tv[j])) if k else {}
            d[ids[s + j + 1]] = chosen[j]
            out.append(d)
    return out


def best_of_order(seqs: list[Any], n: int) -> list[Any]:
    """The n sequences with the highest cumulative logprob (ties: the earlier sequence), best first."""
    def key(s: Any) -> tuple[float, int]:
        c = s.cumulative_logprob
        return (-c if c is not None else math.inf, s.index)

    return sorted(seqs, key=key)[:n]
