"""Speculative decoding's verification: rejection sampling of k drafts against the target's k + 1 rows.

For a draft d drawn from a distribution q and the target's distribution p at the same position (both after the
row's knobs, penalties, grammar, temperature and filters), accept d with probability min(1, p(d) / q(d)); on
rejection draw from normalize(max(0, p - q)); when all k drafts are accepted draw the bonus token from the last
row's p. The emitted token at every position is then distributed as p given the tokens before it (Leviathan et
al. 2023, Chen et al. 2023; vLLM's `RejectionSampler`). Two cases, per sequence:

* q given (a draft model's sampled drafts, `sample_draft`): the general rule above, with the uniform and the
  residual's draw taken from the row's own generator when it has a seed (so seeded requests are reproducible).
* q a point mass on d (greedy drafting, prompt lookup, greedy rows): min(1, p(d)/q(d)) = p(d), and the residual is
  p without d, which is the law of drawing x ~ p at the row and accepting iff x == d. That is what is done: every
  row is sampled by the engine's `Sampler` as in plain decoding, so a greedy row's tokens are plain decoding's.

Legend: V vocabulary, R draft rows verified with a q.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from giants.inference.sampling import PendingSample, SamplingRow, exponential_race


def expand_rows(rows: list[SamplingRow], drafts: list[list[int]]) -> list[SamplingRow]:
    """Row j of a sequence with drafts d: its output so far + d[:j] (penalties, min_tokens, bad_words see what
    plain decoding would have seen at that position), and its grammar, if any, ahead by d[:j]."""
    return [draft_row(r, d[:j]) for r, d in zip(rows, drafts) for j in range(len(d) + 1)]


def draft_row(row: SamplingRow, ahead: list[int]) -> SamplingRow:
    """The row as it is after the tokens `ahead` (valid under its grammar, if any)."""
    if not ahead:
        return row
    return dataclasses.replace(row, output_ids=row.output_ids + ahead,
                               guide=row.guide.ahead(ahead) if row.guide is not None else None)


def accept(drawn: list[int], draft: list[int]) -> int:
    """How many drafts are accepted in the point-mass case: the longest prefix where the draft equals the token
    drawn from the target at that position."""
    a = 0
    while a < len(draft) and drawn[a] == draft[a]:
        a += 1
    return a


def sample_draft(sampler: Any, logits: torch.Tensor, rows: list[SamplingRow]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A draft model's next token for sampled rows (temperature > 0): drawn from q, the draft's logits (B, V)
    processed as the target's row would be (`Sampler.process`: knobs, penalties, grammar, temperature, filters),
    with the row's generator when it has a seed. Returns the tokens (B,), -1 where q allows no token (the draft
    ends there), and q (B, V) float."""
    pr = sampler.process(logits, rows)
    q = pr.filtered.softmax(dim=-1)
    tok = exponential_race(q, [r.generator for r in rows], sampler.default_generator(logits.device))
    return torch.where(torch.isfinite(pr.filtered).any(dim=-1), tok, -1), q


def _uniforms(sampler: Any, rows: list[SamplingRow], counts: list[int], dev: torch.device) -> torch.Tensor:
    """counts[i] uniforms in [0, 1) for row i, from its generator if it has one (the others share one draw)."""
    shared = torch.rand(sum(c for r, c in zip(rows, counts) if r.generator is None),
                        generator=sampler.default_generator(dev), device=dev)
    parts, n = [], 0
    for r, c in zip(rows, counts):
        if r.generator is not None:
            parts.append(torch.rand(c, generator=r.generator, device=dev))
        else:
            parts.append(shared[n:n + c])
            n += c
    return torch.cat(parts)


def verify(sampler: Any, logits: torch.Tensor, rows: list[SamplingRow], drafts: list[list[int]],
           qs: list[torch.Tensor | None] | None = None) -> list[tuple[list[int], list[dict[int, float] | None]]]:
    """logits: len(d) + 1 rows per sequence (the target's, at the last token and at each draft); qs: per sequence
    the (len(d), V) distributions its drafts were drawn from, or None (a point mass on each draft; greedy rows
    are always verified so). Returns per sequence the tokens it emits this step (the accepted drafts + the token
    drawn at the first rejection, or the bonus token) and their logprobs. Raises when the sampler does."""
    expanded = expand_rows(rows, drafts)
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
    qs = qs or [None] * len(drafts)
    with_q = [i for i, (r, d, q) in enumerate(zip(rows, drafts, qs)) if q is not None and d and not r.params.greedy]
    acc: dict[int, int] = {}  # accepted drafts of the sequences verified with their q
    if not with_q:
        res = sampler.launch(logits, expanded).result()
    else:
        pr = sampler.process(logits, expanded)
        tokens = sampler.draw(pr, expanded)  # every row drawn from p: the point-mass rows' and the bonus tokens
        dev = tokens.device
        lens = [len(drafts[i]) for i in with_q]
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        ridx = torch.tensor([starts[i] + j for i in with_q for j in range(len(drafts[i]))], device=dev)
        d = torch.tensor([t for i in with_q for t in drafts[i]], device=dev)
        f = pr.filtered[ridx]  # (R, V) the draft rows' target logits, tempered and filtered: p = softmax(f)
        p_d = (f.gather(1, d[:, None])[:, 0] - torch.logsumexp(f, dim=-1)).exp()
        q_d = torch.cat([qs[i][:n].gather(1, d[o:o + n, None])[:, 0] for i, o, n in zip(with_q, offs, lens)])
        u = _uniforms(sampler, [rows[i] for i in with_q], lens, dev)
        ok = (u * q_d < p_d).tolist()  # accepted with probability min(1, p(d) / q(d))
        tokens[ridx] = d  # an accepted draft is the emitted token (its logprob the target's at that row)
        resid = []  # (sequence, its first rejected draft, that row among the R)
        for i, o, n in zip(with_q, offs, lens):
            a = ok[o:o + n].index(False) if False in ok[o:o + n] else n
            acc[i] = a
            if a < n:
                resid.append((i, a, o + a))
        if resid:  # the first rejected row of each sequence: a draw from normalize(max(0, p - q))
            rr = [r for _, _, r in resid]
            p = f[rr].softmax(dim=-1)
            left = (p - torch.stack([qs[i][a] for i, a, _ in resid])).clamp_(min=0)
            left = torch.where((left.sum(dim=-1) > 0)[:, None], left, p)  # p == q up to rounding: p itself
            tokens[ridx[rr]] = exponential_race(left, [rows[i].generator for i, _, _ in resid],
                                                sampler.default_generator(dev))
        res = PendingSample(tokens, pr.raw, [r.params for r in expanded]).result()
    out = []
    for i, d in enumerate(drafts):
        toks, lps = res.tokens[starts[i]:starts[i + 1]], res.logprobs[starts[i]:starts[i + 1]]
        a = acc[i] if i in acc else accept(toks, d)
        out.append((toks[:a + 1], lps[:a + 1]))
    return out
