"""Sampling vectorised over a batch whose rows carry their own parameters.

Order (as transformers' generate applies its processors): penalties -> temperature -> top-k -> top-p
-> min-p -> sample. Greedy rows (temperature below SamplingParams' SAMPLING_EPS, 1e-5) take the argmax of
the penalised logits. Each step skips the stages no row in the batch uses. Sampling is an exponential race
(argmax of p / q with q ~ Exp(1)), which draws exactly from p; seeded rows draw their q from their own
torch.Generator so a request's tokens do not depend on what else is in the batch.

Legend: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from giants.inference.guided import Guide, GuideAhead, apply_guides
from giants.inference.logits_process import apply_logits_processors, wants_cumulative
from giants.inference.params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence at this step."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None = None
    # structured output: the sequence's grammar state (giants.inference.guided); a speculative verification row's
    # is the state after its drafts (GuideAhead)
    guide: Guide | GuideAhead | None = None


def _to_device(values: list, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A small host list on the device without a stream sync (a pageable copy waits for queued work)."""
    if dev.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(dev, non_blocking=True)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition penalty (transformers/CTRL: over prompt and output tokens, divide positive logits,
    multiply negative ones) and OpenAI's presence/frequency penalties (over output tokens)."""
    B, V = logits.shape
    dev = logits.device
    rep = [r.params.repetition_penalty for r in rows]
    pres = [r.params.presence_penalty for r in rows]
    freq = [r.params.frequency_penalty for r in rows]
    if any(p != 1.0 for p in rep):
        seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            if rep[i] != 1.0:
                ids = torch.tensor(r.prompt_ids + r.output_ids, dtype=torch.long, device=dev)
                seen[i, ids] = True
        p = torch.tensor(rep, dtype=logits.dtype, device=dev)[:, None]
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(seen, penalised, logits)
    if any(pres) or any(freq):
        counts = torch.zeros(B, V, dtype=logits.dtype, device=dev)
        for i, r in enumerate(rows):
            if (pres[i] or freq[i]) and r.output_ids:
                ids = torch.tensor(r.output_ids, dtype=torch.long, device=dev)
                counts[i].index_add_(0, ids, torch.ones(len(ids), dtype=logits.dtype, device=dev))
        f = torch.tensor(freq, dtype=logits.dtype, device=dev)[:, None]
        pr = torch.tensor(pres, dtype=logits.dtype, device=dev)[:, None]
        logits = logits - f * counts - pr * (counts > 0).to(logits.dtype)
    return logits


def apply_filters(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, *, kmax: int | None = None, any_top_p: bool | None = None,
                  any_min_p: bool | None = None) -> torch.Tensor:
    """logits: (B, V) float; per-row temperature (> 0), top_k (0 = off), top_p (1 = off), min_p (0 = off).
    Returns tempered logits with filtered-out tokens at -inf (at least one token always survives).
    kmax / any_top_p / any_min_p, when the caller knows them, spare a device sync each."""
    logits = logits / temperature[:, None]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if kmax is None:
        kmax = int(top_k.max())
    if any_top_p is None:
        any_top_p = bool((top_p < 1).any())
    if any_min_p is None:
        any_min_p = bool((min_p > 0).any())
    if kmax > 0:
        top = torch.topk(logits, min(kmax, logits.shape[-1]), dim=-1).values  # (B, kmax) descending
        k = top_k.clamp(min=1, max=top.shape[-1])
        kth = top.gather(1, (k - 1)[:, None])
        kth = torch.where((top_k > 0)[:, None], kth, neg_inf)
        logits = torch.where(logits < kth, neg_inf, logits)
    if any_top_p:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)[:, None]
        remove[:, -1] = False  # the most likely token always stays
        remove = remove.scatter(1, sorted_idx, remove)
        logits = logits.masked_fill(remove, float("-inf"))
    if any_min_p:
        probs = logits.softmax(dim=-1)
        top_prob = probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < min_p[:, None] * top_prob, float("-inf"))
    return logits


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None],
                     default: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from probs (B, V); rows with a generator use it, the rest share `default`."""
    q = torch.empty_like(probs)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        q.exponential_(generator=default)
    for i in seeded:
        q[i].exponential_(generator=generators[i])
    return (probs / q).argmax(dim=-1)


@dataclass
class Processed:
    """A batch's logits on their way to the draw (`Sampler.process`)."""

    raw: torch.Tensor  # (B, V) float: the model's, for logprobs
    logits: torch.Tensor  # knobs, penalties and grammar applied: greedy rows take its argmax
    filtered: torch.Tensor | None  # tempered and filtered (-inf outside top-k/p, min-p); None when all rows are greedy
    greedy: list[bool]


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[dict[int, float] | None]


class PendingSample:
    """Tokens chosen on the device, not yet read back: `result()` waits for them. After `copy_async()`
    the wait is on an event recorded right after the tokens, so work queued later on the stream (the
    next decode step, launched ahead) does not delay it."""

    def __init__(self, tokens: torch.Tensor, raw: torch.Tensor, params: list[SamplingParams]) -> None:
        self.tokens, self.raw, self.params = tokens, raw, params
        self.host: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None

    @property
    def wants_logprobs(self) -> bool:
        return any(p.logprobs is not None or wants_cumulative(p) for p in self.params)

    def copy_async(self) -> None:
        if self.tokens.is_cuda:
            self.host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self.host.copy_(self.tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> SampleResult:
        if self.event is not None:
            self.event.synchronize()
            token_list = self.host.tolist()
        else:
            token_list = self.tokens.tolist()
        params, tokens, raw = self.params, self.tokens, self.raw
        logprobs: list[dict[int, float] | None] = [None] * len(params)
        want = [i for i, p in enumerate(params) if p.logprobs is not None or wants_cumulative(p)]
        if want:
            lp = torch.log_softmax(raw[want], dim=-1)
            V = lp.shape[-1]
            n_top = min(max(params[i].logprobs or 0 for i in want), V)  # more than the vocabulary: all of it
            top_v, top_i = torch.topk(lp, n_top, dim=-1) if n_top else (None, None)
            chosen = lp.gather(1, tokens[want][:, None])[:, 0].tolist()
            for j, i in enumerate(want):
                d: dict[int, float] = {}
                n = min(params[i].logprobs or 0, V)
                if n:
                    d.update(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist()))
                d[token_list[i]] = chosen[j]
                logprobs[i] = d
        return SampleResult(token_list, logprobs)


class Sampler:
    eos_ids: frozenset[int] = frozenset()  # what min_tokens holds back besides stop_token_ids (the engine's EOS)

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        """logits: (B, V) for the rows that produce a token this step."""
        return self.launch(logits, rows).result()

    def launch(self, logits: torch.Tensor, rows: list[SamplingRow]) -> PendingSample:
        """Queues the sampling of logits (B, V) on the device; the tokens are read back by `.result()`."""
        pr = self.process(logits, rows)
        return PendingSample(self.draw(pr, rows), pr.raw, [r.params for r in rows])

    def process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> Processed:
        """Every stage before the draw (knobs, penalties, grammar, then temperature and the filters for the
        sampled rows): softmax(`filtered`) is the distribution a sampled row draws from (spec_decode's p and q)."""
        logits = logits.float()
        raw = logits
        dev = logits.device
        logits = apply_logits_processors(logits, rows, self.eos_ids)  # logit_bias, min_tokens, bad/allowed words
        logits = apply_penalties(logits, rows)
        logits = apply_guides(logits, [r.guide for r in rows])  # before the filters: they keep allowed tokens
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        filtered = None
        if not all(greedy):
            V = logits.shape[-1]
            temp = _to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, dev)
            top_k = _to_device([min(p.k, V) for p in params], torch.long, dev)  # k >= V: every token
            top_p = _to_device([p.top_p for p in params], torch.float32, dev)
            min_p = _to_device([p.min_p for p in params], torch.float32, dev)
            filtered = apply_filters(logits, temp, top_k, top_p, min_p, kmax=min(max(p.k for p in params), V),
                                     any_top_p=any(p.top_p < 1 for p in params),
                                     any_min_p=any(p.min_p > 0 for p in params))
        return Processed(raw, logits, filtered, greedy)

    def default_generator(self, dev: torch.device) -> torch.Generator | None:
        """The generator of the rows without a seed (None: torch's default one, when ours is on another device)."""
        gen = self.generator
        return gen if gen is not None and gen.device == dev else None

    def draw(self, pr: Processed, rows: list[SamplingRow]) -> torch.Tensor:
        """One token per row (B,) on the device: the argmax for greedy rows, a draw from softmax(filtered) else."""
        tokens = pr.logits.argmax(dim=-1)
        if pr.filtered is not None:
            dev = tokens.device
            sampled = exponential_race(pr.filtered.softmax(dim=-1), [r.generator for r in rows],
                                       self.default_generator(dev))
            tokens = torch.where(_to_device(pr.greedy, torch.bool, dev), tokens, sampled)
        return tokens
