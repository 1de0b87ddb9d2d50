"""Speculative decoding: a drafter proposes k tokens per sequence, the target verifies them in one forward.

Drafters:
* prompt lookup (`"method": "ngram"`): the last `prompt_lookup_max` .. `prompt_lookup_min` tokens are looked up
  earlier in prompt + output (the most recent occurrence, longest n first) and the tokens that followed them
  are proposed. No model, no memory; it pays off on text that repeats itself (code, lists, quotes, edits).
* a draft model (`"model": DRAFT`): any smaller model with the same vocabulary, with its own paged KV cache
  (holding as many tokens as the target's; the engine splits its cache budget between the two), run for k tokens
  per step, batched over the speculating sequences. Greedy rows (temperature 0) draft its argmax; sampled rows draw
  each draft from q, the draft's logits processed as the target's row (`Sampler.process`: logits knobs and
  penalties over the output extended by the drafts so far, the grammar ahead by them, temperature, top-k/p,
  min-p), with the row's own generator when the request has a seed. After verification its cache is rolled back
  to the tokens the sequence kept (the fed tokens are compared with the sequence's).

Verification (`giants.inference.rejection`): each speculating sequence's decode chunk becomes [last token, d_1 ..
d_k] (one multi-token forward over the paged cache for the whole batch, logits of all k+1 positions; see
`Chunk.n_logits`). Row j is processed by the engine's own `Sampler` with the sequence's output extended by d_1 ..
d_j, so every logits knob applies exactly as in plain decoding; p_j is that row's distribution. Then the rejection
sampling of Leviathan et al. / Chen et al. (vLLM's RejectionSampler): d_j is accepted with probability
min(1, p_j(d_j) / q_j(d_j)); the first rejection emits a draw from normalize(max(0, p_j - q_j)) and ends the step;
when all k are accepted the bonus token is drawn from p_k. The emitted tokens are then distributed as the target's.
What q is, per case:

* a draft model's sampled drafts (temperature > 0): the q each draft was drawn from, kept as a (k, V) float tensor
  for those sequences only (none for greedy rows or prompt lookup), for the step. A draft equal to the target gives
  p == q and every draft is accepted, where greedy drafts would be accepted with probability p(argmax) only.
* greedy drafting (temperature 0) and prompt lookup (no distribution): a point mass on d_j. Then min(1, p/q) = p(d)
  and the residual is p without d, the law of drawing x ~ p at row j and accepting iff x == d_j, which is what is
  done: the row is sampled as in plain decoding (P(accept) = p(d); P(x | reject) = p(x) / (1 - p(d)) for x != d),
  so greedy output is the target's argmax chain, token for token.

The KV slots of rejected drafts are released (`KVCacheManager.truncate`).

Structured output (as vLLM v1): a guided sequence's draft is cut at the first token its grammar refuses
(`Guide.valid_prefix`, llguidance's validate_tokens: a refused draft could never be accepted), and verification
row j is masked by the grammar state after d_1 .. d_j (`Guide.ahead`: consumed, masked, rolled back, the
sequence's matcher untouched). The engine then advances the matcher by exactly the tokens it appends (the
accepted drafts and the drawn token), stopping as in plain guided decoding where the grammar completes; so a
rejected tail leaves no trace, and greedy guided output is plain guided decoding's token for token. A sampled
guided row's q is masked by the same grammar state as the target's row (the draft-aware mask, ahead by the drafts
so far): its draft is then a draw from exactly that q and never cut (a draft stops only where the grammar allows
no token at all, a function of the tokens before it), so the rule above is exact. An unmasked q would not be: the
cut at a refused d_j depends on d_j itself, and the cut position's token, drawn from p instead of the residual,
would be biased. (A point mass would be exact too, but accepts less.)

A prompt's last prefill chunk carries drafts too (prompt lookup finds them in the prompt; a draft model catches
up with the prompt first), so the first tokens can come out of the prefill's own forward. Not speculated (decoded
one token at a time, in the same step as the others): steps where the token budget, `max_tokens` or
`max_model_len` leave no room. Drafts never preempt anyone: a sequence whose draft slots do not fit this step
decodes plainly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from giants.inference.kv_cache import KVCacheManager, SeqBlocks
from giants.inference.rejection import accept as accept  # re-exported
from giants.inference.rejection import draft_row, sample_draft, verify
from giants.inference.rejection import expand_rows as expand_rows  # re-exported
from giants.inference.runner import Chunk, ModelRunner
from giants.inference.sampling import SamplingRow
from giants.model.transformer import Transformer

if TYPE_CHECKING:
    from giants.inference.engine import Engine, Sequence

KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "quantization",
        "draft_tensor_parallel_size", "disable_by_batch_size")
METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 64
CATCH_UP_ROWS = 8  # a draft model's catch-up up to this many tokens runs as decode rows (see DraftModelProposer)


@dataclass
class SpeculativeConfig:
    """vLLM's speculative_config dict, checked. method "ngram" (prompt lookup) or "draft_model" (implied by
    "model"); disable_by_batch_size: no speculation while this many sequences or more run (large batches are
    compute-bound, where drafts cost more than they save)."""

    method: str
    num_speculative_tokens: int
    model: Any = None  # anything LLM's model argument takes: preset, known name, path, .gguf, Transformer
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    quantization: str | None = None  # the draft model's (LLM's quantization argument)
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, raw: dict | SpeculativeConfig) -> SpeculativeConfig:
        if isinstance(raw, SpeculativeConfig):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config: a dict such as {{'method': 'ngram', 'num_speculative_tokens': 4}} "
                             f"(got {raw!r:.60})")
        unknown = [k for k in raw if k not in KEYS]
        if unknown:
            raise ValueError(f"speculative_config: unknown key {unknown[0]!r} (giants reads {', '.join(KEYS)})")

        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"speculative_config.{key}: {why} (got {raw.get(key)!r:.60})")

        def count(key: str, lo: int, hi: int | None = None) -> int | None:
            v = raw.get(key)
            if v is None:
                return None
            if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                raise bad(key, f"must be an integer in [{lo}, {hi if hi is not None else 'inf'}]")
            return v

        method = raw.get("method")
        model = raw.get("model")
        if method is None:
            method = "draft_model" if model is not None else None
        if method not in METHODS:
            raise bad("method", f"one of {', '.join(map(repr, METHODS))} (or give 'model' for a draft model)")
        k = count("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
        if k is None:
            raise bad("num_speculative_tokens", "is required: the number of tokens drafted per step")
        if (tp := count("draft_tensor_parallel_size", 1, 1)) is not None and tp != 1:
            raise bad("draft_tensor_parallel_size", "only 1")
        lo, hi = count("prompt_lookup_min", 1), count("prompt_lookup_max", 1)
        if method == "ngram":
            if model is not None:
                raise bad("model", "a draft model is not used with method 'ngram'")
            if raw.get("quantization") is not None:
                raise bad("quantization", "quantizes a draft model; method 'ngram' has none")
            # vLLM's defaults: both 5 when neither is given, else the one given for both
            lo, hi = (5, 5) if lo is None and hi is None else (lo or hi, hi or lo)
            if lo > hi:
                raise bad("prompt_lookup_min", f"must be <= prompt_lookup_max={hi}")
        else:
            if model is None:
                raise bad("model", "method 'draft_model' needs the draft model")
            for key in ("prompt_lookup_min", "prompt_lookup_max"):
                if raw.get(key) is not None:
                    raise bad(key, "is for method 'ngram' (prompt lookup), not a draft model")
        return cls(method, k, model, hi, lo, raw.get("quantization"),
                   count("disable_by_batch_size", 1))


# ---- drafters ----------------------------------------------------------------------------------------------
def ngram_propose(tokens: list[int] | np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the longest suffix of
    `tokens` (n_max .. n_min tokens long) that occurred before; [] when none did."""
    arr = np.asarray(tokens, dtype=np.int64)
    L = len(arr)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        # windows starting at 0 .. L-1-n: each has at least one token after it, and the suffix itself is excluded
        win = np.lib.stride_tricks.sliding_window_view(arr[:L - 1], n)
        hits = np.flatnonzero((win == arr[L - n:]).all(axis=1))
        if hits.size:
            i = int(hits[-1]) + n
            return arr[i:i + k].tolist()
    return []


class NgramProposer:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.n_min, self.n_max = cfg.prompt_lookup_min, cfg.prompt_lookup_max

    def propose(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """The drafts, and no q (prompt lookup has no distribution: a point mass on each draft)."""
        return [ngram_propose(s.token_ids, k, self.n_min, self.n_max) for s, k in zip(seqs, ks)], [None] * len(seqs)


@dataclass
class _DraftState:
    seq: Sequence
    blocks: SeqBlocks
    fed: list[int]  # the tokens whose KV the draft cache holds (positions 0 .. len - 1)
    last_step: int = 0


class DraftModelProposer:
    """A draft model over its own paged KV cache, run for k tokens per step (batched): greedy rows draft its argmax,
    sampled rows a draw from its processed distribution q (see the module's docstring)."""

    sample_drafts = True  # False: greedy drafts for every row (a point-mass q), to compare acceptance

    def __init__(self, model: Transformer, engine: Engine) -> None:
        self.model = model.eval()
        self.engine = engine
        cfg = model.config
        self.max_len = min(engine.max_model_len, cfg.max_context)
        dtype = next(model.parameters()).dtype
        # as many tokens as the target's cache (the engine gave the draft its share of the budget)
        tokens = max(g.pool.num_blocks for g in engine.kv.groups) * engine.block_size
        self.kv = KVCacheManager(cfg, block_size=engine.block_size, num_blocks=-(-tokens // engine.block_size),
                                 max_model_len=self.max_len, dtype=dtype, device=engine.device,
                                 enable_prefix_caching=False)
        if engine.device.type == "cuda" and engine.use_cuda_graphs:
            from giants.inference.cuda_runner import CudaModelRunner

            # the 1-token draft steps replay the draft's own CUDA graphs; catch-up chunks run eagerly
            self.runner: ModelRunner = CudaModelRunner(model, self.kv, max_num_seqs=engine.max_num_seqs,
                                                       max_model_len=self.max_len)
        else:
            self.runner = ModelRunner(model, self.kv)
            if engine.device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
                self.runner.pack_for_onednn()
        self.states: dict[int, _DraftState] = {}
        self.step = 0

    def _prune(self) -> None:
        from giants.inference.engine import FINISHED

        for sid in [sid for sid, st in self.states.items() if st.seq.status == FINISHED]:
            self.kv.free(self.states.pop(sid).blocks)

    def _allocate(self, st: _DraftState, start: int, end: int, busy: set[int]) -> bool:
        self.kv.release_outside_window(st.blocks, start)
        while not self.kv.allocate(st.blocks, start, end):
            idle = [s for sid, s in self.states.items() if sid not in busy and s.fed]
            if not idle:
                return False
            victim = min(idle, key=lambda s: s.last_step)  # least recently drafted: recomputed if it drafts again
            self.kv.free(victim.blocks)
            victim.fed.clear()
        return True

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Up to k drafts per sequence and, for the sampled ones (temperature > 0, unless `sample_drafts` is off),
        q: the (len(draft), V) distributions the drafts were drawn from; None for greedy drafts."""
        self._prune()
        self.step += 1
        busy = {s.seq_id for s in seqs}
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[torch.Tensor | None] = [None] * len(seqs)
        sampled = [self.sample_drafts and not s.request.params.greedy for s in seqs]
        live, chunks, want = [], [], []
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            st = self.states.get(seq.seq_id)
            if st is None:
                st = self.states[seq.seq_id] = _DraftState(seq, SeqBlocks(len(self.kv.groups)), [])
            st.last_step = self.step
            toks = seq.token_ids
            k = min(k, self.max_len - len(toks))
            if k < 1:
                continue
            n = min(len(st.fed), len(toks) - 1)  # at least the last token is fed: its logits give d_1
            if st.fed[:n] != toks[:n]:
                n = next(j for j in range(n) if st.fed[j] != toks[j])
            del st.fed[n:]
            # positions [n, len + k - 1): the missing tokens, then d_1 .. d_{k-1} (d_k is never fed)
            if not self._allocate(st, n, len(toks) + k - 1, busy):
                continue
            # a short catch-up (the step's new tokens) as 1-token rows with logits each (runner.verify_rows): a
            # decode step, the draft's CUDA graphs on the GPU; a long one (a prompt) as one prefill chunk
            m = len(toks) - n
            chunks.append(Chunk(st.blocks, n, toks[n:], True, m if m <= CATCH_UP_ROWS else 1))
            st.fed.extend(toks[n:])
            live.append((i, st))
            want.append(k)
        for step in range(max(want, default=0)):
            if step:
                chunks = [Chunk(st.blocks, len(st.fed), [drafts[i][-1]], True) for i, st in live]
                for i, st in live:
                    st.fed.append(drafts[i][-1])
            logits = self.runner.execute(chunks)
            if any(c.n_logits != 1 for c in chunks):  # catch-up chunks (step 0): each chunk's last row
                ends = torch.tensor(list(itertools.accumulate(c.n_logits for c in chunks)), device=logits.device)
                logits = logits[ends - 1]
            toks = logits.argmax(dim=-1)  # greedy drafts
            if js := [j for j, (i, _) in enumerate(live) if sampled[i]]:
                self._sample(logits, toks, js, [(i, want[j]) for j, (i, _) in enumerate(live)], seqs, drafts, qs)
            ended = set()
            for j, ((i, _), tok) in enumerate(zip(live, toks.tolist())):
                if tok < 0:  # q allowed no token (the grammar's end): the draft stops before it
                    ended.add(j)
                else:
                    drafts[i].append(tok)
            keep = [j for j, (i, _) in enumerate(live) if j not in ended and len(drafts[i]) < want[j]]
            live, want = [live[j] for j in keep], [want[j] for j in keep]
        return drafts, [q[:len(d)] if q is not None else None for q, d in zip(qs, drafts)]

    def _sample(self, logits: torch.Tensor, toks: torch.Tensor, js: list[int], live: list[tuple[int, int]],
                seqs: list[Sequence], drafts: list[list[int]], qs: list[torch.Tensor | None]) -> None:
        """Rows js of this draft step (live: (sequence, k) per row) sampled from their processed distribution q,
        written into toks; q kept in qs (k x V per sampled sequence, allocated at its first draft)."""
        rows = [draft_row(SamplingRow(s.request.params, s.prompt_ids, s.output_ids, s.generator, s.guide), drafts[i])
                for i, s in ((live[j][0], seqs[live[j][0]]) for j in js)]
        try:
            tok, q = sample_draft(self.engine.sampler, logits[js], rows)
        except Exception:  # noqa: BLE001 - e.g. a row's knobs fail: no more drafts for these rows (verification
            toks[js] = -1  # then fails that request alone, as plain decoding would)
            return
        toks[js] = tok
        for n, j in enumerate(js):
            i, k = live[j]
            if qs[i] is None:
                qs[i] = torch.empty(k, q.shape[-1], dtype=q.dtype, device=q.device)
            qs[i][len(drafts[i])] = q[n]


def draft_for(seq: Sequence, draft: list[int]) -> list[int]:
    """The draft a sequence verifies: under structured output, cut at the first token its grammar refuses."""
    guide = getattr(seq, "guide", None)
    return guide.valid_prefix(draft) if guide is not None else draft


# ---- the engine's side -------------------------------------------------------------------------------------
def resolve_draft(cfg: SpeculativeConfig, target: Transformer, seed: int) -> Transformer:
    """The draft model on the target's device and dtype; a preset is built with the engine's seed (so a preset
    drafting for itself is the target's twin, every draft accepted)."""
    from giants.inference.llm import resolve_model

    p = next(target.parameters())
    try:
        draft, _ = resolve_model(cfg.model, p.dtype, p.device, seed, cfg.quantization)
    except ValueError as e:
        raise ValueError(f"speculative_config.model: {e}") from None
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"speculative_config.model: the draft's vocabulary ({draft.config.vocab_size} tokens) is "
                         f"not the target's ({target.config.vocab_size}); a draft model must share the tokenizer")
    return draft


class SpecDecoder:
    """Plans each step's drafts into the decode chunks and turns the verified rows into accepted tokens."""

    def __init__(self, config: dict | SpeculativeConfig, target: Transformer, seed: int) -> None:
        self.cfg = SpeculativeConfig.parse(config)
        self.draft = resolve_draft(self.cfg, target, seed) if self.cfg.method == "draft_model" else None
        self.proposer: NgramProposer | DraftModelProposer | None = None
        self.drafts: dict[int, list[int]] = {}  # this step's drafts by seq_id
        self.qs: dict[int, torch.Tensor] = {}  # the distributions of this step's sampled drafts, by seq_id
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0

    def kv_share(self, target: Transformer) -> float:
        """The target's share of the KV budget, so that both caches hold the same number of tokens."""
        if self.draft is None:
            return 1.0
        dtype = next(target.parameters()).dtype
        t = KVCacheManager.bytes_per_block(target.config, 1, target.config.n_layers, dtype)
        d = KVCacheManager.bytes_per_block(self.draft.config, 1, self.draft.config.n_layers, dtype)
        return t / (t + d)

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        self.proposer = NgramProposer(self.cfg) if self.draft is None else DraftModelProposer(self.draft, engine)

    @property
    def drafted(self) -> bool:
        return bool(self.drafts)

    def plan(self, scheduled: list[tuple[Sequence, int]], chunks: list[Chunk]) -> None:
        """Extends decode chunks with drafts (in place) and gives them KV slots, within the step's token budget."""
        self.drafts.clear()
        self.qs.clear()
        e = self.engine
        if self.cfg.disable_by_batch_size is not None and len(e.running) >= self.cfg.disable_by_batch_size:
            return
        budget = e.max_num_batched_tokens - sum(n for _, n in scheduled)
        cands = []
        for i, ((seq, _), c) in enumerate(zip(scheduled, chunks)):
            if budget <= 0:
                break
            if not c.sample:
                continue  # a prompt's last chunk drafts too: its first tokens can come in the prefill's forward
            mt = seq.request.params.max_tokens
            k = min(self.cfg.num_speculative_tokens, budget, e.max_model_len - len(seq) - 1,
                    mt - len(seq.output_ids) - 1 if mt is not None else budget)
            if k >= 1:
                cands.append((i, seq, k))
                budget -= k
        if not cands:
            return
        proposals, qs = self.proposer.propose([s for _, s, _ in cands], [k for _, _, k in cands])
        for (i, seq, k), d, q in zip(cands, proposals, qs):
            # a sampled draft was drawn from q masked by the row's grammar: it never needs cutting
            d = d[:k] if q is not None else draft_for(seq, d[:k])
            c = chunks[i]
            end = c.start + len(c.token_ids) + len(d)
            # a sampled draft's length may hang on its own tokens (a grammar's end): whether it is verified must
            # not, so slots for all k are asked for and the unused ones given back
            if d and e.kv.allocate(seq.blocks, c.start, end if q is None else end - len(d) + k):
                if q is not None:
                    e.kv.truncate(seq.blocks, end)
                c.token_ids = list(c.token_ids) + d
                c.n_logits = 1 + len(d)
                self.drafts[seq.seq_id] = d
                if q is not None:
                    self.qs[seq.seq_id] = q[:len(d)]

    def sample(self, logits: torch.Tensor, sampling: list[Sequence], rows: list[SamplingRow]
               ) -> list[tuple[Sequence, int, dict[int, float] | None]]:
        """Verifies this step's drafts: logits hold n_logits rows per sampled sequence. Returns the tokens to
        append, in order (a sequence's tokens after one that finishes it are skipped by the engine); moves each
        speculating sequence's num_computed past its accepted drafts and releases the rejected slots."""
        e = self.engine
        drafts = [self.drafts.get(s.seq_id, []) for s in sampling]
        qs = [self.qs.get(s.seq_id) for s in sampling]
        self.drafts, self.qs = {}, {}
        try:
            verified = verify(e.sampler, logits, rows, drafts, qs)
        except Exception:  # noqa: BLE001 - some sequence's rows failed: verify each alone, fail that request only
            verified, off = [], 0
            for seq, row, d, q in zip(sampling, rows, drafts, qs):
                try:
                    verified += verify(e.sampler, logits[off:off + len(d) + 1], [row], [d], [q])
                except Exception as err:  # noqa: BLE001
                    e._fail_request(seq.request, err)
                    verified.append(([], []))
                off += len(d) + 1
        picked = []
        for seq, d, (toks, lps) in zip(sampling, drafts, verified):
            if d and toks:
                a = len(toks) - 1
                seq.num_computed += a  # the accepted drafts' KV was written by the verify forward
                e.kv.truncate(seq.blocks, seq.num_computed + 1)
                self.num_drafts += 1
                self.num_draft_tokens += len(d)
                self.num_accepted_tokens += a
                m = seq.request.metrics
                m.num_spec_drafts += 1
                m.num_draft_tokens += len(d)
                m.num_accepted_tokens += a
            picked.extend((seq, t, lp) for t, lp in zip(toks, lps))
        return picked

    def stats(self) -> dict[str, Any]:
        """num_drafts: verify steps of a sequence with at least one draft; accepted_tokens_per_step: drafts accepted
        per such step (mean); tokens_per_step: tokens emitted per such step (accepted + 1, vLLM's mean acceptance
        length); acceptance_rate: accepted / drafted tokens."""
        n, drafted, acc = self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens
        return {"spec_method": self.cfg.method, "spec_num_speculative_tokens": self.cfg.num_speculative_tokens,
                "spec_num_drafts": n, "spec_num_draft_tokens": drafted, "spec_num_accepted_tokens": acc,
                "spec_acceptance_rate": acc / drafted if drafted else 0.0,
                "spec_accepted_tokens_per_step": acc / n if n else 0.0,
                "spec_tokens_per_step": 1 + acc / n if n else 0.0}
