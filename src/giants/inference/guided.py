"""Structured output: a grammar (JSON schema, regex, choice, Lark) as a token mask, through llguidance.

Why llguidance (over xgrammar and outlines-core): it is the engine vLLM and llama.cpp ship, a small Rust wheel with
no torch dependency, it takes a tokenizers JSON as is (the GGUF tokenizers giants builds included), and it computes
a mask lazily per step (tens of microseconds for JSON, no per-schema precompilation over the whole vocabulary),
so compiling a new schema costs well under a millisecond and many schemas can be served at once.

The pieces: `GuidedDecodingParams` (vLLM's spelling; `StructuredOutputsParams` is the newer vLLM name of the same
thing) or `SamplingParams.guided_*` name one grammar; `grammar_for(params)` turns it into llguidance's grammar
text, checked when the SamplingParams is made (ValueError naming the field); the engine gives every sequence of a
guided request its own `Guide` (a matcher copied from one compiled per grammar and tokenizer); the sampler masks
the rows that have one (`apply_guides`) and the engine advances each guide with the token it appends. A preempted
sequence keeps its guide: its generated tokens are not recomputed through the sampler, so the matcher's state is
still the state after its last token. Under speculative decoding (spec_decode) a draft is cut where the grammar
refuses it (`Guide.valid_prefix`) and verification row j is masked by the state after the first j drafts
(`GuideAhead`), the matcher itself still advanced only by the tokens the engine appends.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch

# The JSON grammar writes no whitespace between tokens: flexible whitespace lets a sampled model emit newlines
# until max_tokens, leaving the JSON unfinished (seen with SmolLM2 at temperature 1). A schema can opt back in
# with {"x-guidance": {"whitespace_flexible": true}}.
JSON_DEFAULTS = {"whitespace_flexible": False}
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding")
_CACHE_SIZE = 256  # compiled grammars kept per tokenizer (a server sees few distinct schemas)


@dataclass
class GuidedDecodingParams:
    """One of: json (a JSON schema, dict or str), regex, choice (strings), grammar (Lark or GBNF/EBNF text),
    json_object (any JSON object). vLLM's `GuidedDecodingParams` / `StructuredOutputsParams`."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        set_ = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"GuidedDecodingParams: exactly one of json, regex, choice, grammar, json_object must be "
                             f"set (got {set_ or 'none'})")


StructuredOutputsParams = GuidedDecodingParams


def _import() -> Any:
    try:
        import llguidance
    except ImportError as e:  # a dependency in pyproject.toml; a broken install says so
        raise ValueError(f"structured output needs the llguidance package (pip install llguidance): {e}") from None
    return llguidance


def _compile(kind: str, spec: Any, field: str) -> str:
    """llguidance grammar text for one constraint; ValueError naming `field` when it is malformed."""
    L = _import()
    M = L.LLMatcher
    if kind == "json":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"{field}: not valid JSON ({e})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{field}: a JSON schema must be an object (got {type(spec).__name__})")
        try:
            grammar = M.grammar_from_json_schema(spec, defaults=JSON_DEFAULTS)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{field}: {e}") from None
    elif kind == "regex":
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"{field}: must be a non-empty string")
        grammar = M.grammar_from_regex(spec)
    elif kind == "choice":
        if not isinstance(spec, list | tuple) or not spec or not all(isinstance(s, str) and s for s in spec):
            raise ValueError(f"{field}: must be a non-empty list of non-empty strings")
        grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in spec))
    elif kind == "grammar":
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"{field}: must be a non-empty grammar text (Lark or GBNF)")
        try:
            grammar = L.grammar_from("grammar", spec)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
    else:  # json_object
        grammar = M.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
    err = M.validate_grammar(grammar)
    if err:
        raise ValueError(f"{field}: the grammar engine rejects it: {err.strip()}")
    return grammar


def grammar_for(params: Any) -> str | None:
    """The llguidance grammar of a SamplingParams (None: unconstrained). Raises ValueError naming the field when
    more than one constraint is set or the one set is malformed."""
    set_ = [name for name in GUIDED_FIELDS if getattr(params, name, None) is not None]
    if len(set_) > 1:
        raise ValueError(f"{set_[0]}: only one structured-output constraint per request (got {', '.join(set_)})")
    if not set_:
        return None
    name = set_[0]
    value = getattr(params, name)
    if name == "guided_decoding":
        if isinstance(value, dict):  # vLLM's structured_outputs dict from a JSON body
            try:
                value = GuidedDecodingParams(**value)
            except TypeError as e:
                raise ValueError(f"guided_decoding: {e}") from None
        if not isinstance(value, GuidedDecodingParams):
            raise ValueError(f"guided_decoding: must be a GuidedDecodingParams (got {type(value).__name__})")
        kind = next(f.name for f in fields(value) if getattr(value, f.name) not in (None, False))
        return _compile(kind, getattr(value, kind), f"guided_decoding.{kind}")
    return _compile(name.removeprefix("guided_"), value, name)


# ---- the engine's side -----------------------------------------------------------------------------------


class _TokenizerGrammars:
    """llguidance's view of one tokenizer (built once, ~0.3 s for a 49k vocabulary) and the compiled matchers of
    the grammars seen with it (a new sequence copies one: microseconds)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        L = _import()
        backend = getattr(tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "to_str"):
            backend = getattr(tokenizer, "backend_tokenizer", None)  # a transformers fast tokenizer
        if backend is None:
            raise ValueError("structured output needs a `tokenizers`-backed tokenizer (giants.Tokenizer or a "
                             f"transformers fast tokenizer; got {type(tokenizer).__name__})")
        eos = sorted(eos_ids) or [getattr(tokenizer, "eos_token_id", None) or 0]
        self.ll = L.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self.matchers: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def matcher(self, grammar: str) -> Any:
        L = _import()
        with self.lock:
            m = self.matchers.get(grammar)
            if m is not None:
                self.matchers.move_to_end(grammar)
                return m.deep_copy()
        m = L.LLMatcher(self.ll, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"the grammar engine rejects the constraint: {m.get_error()}")
        with self.lock:
            self.matchers[grammar] = m
            while len(self.matchers) > _CACHE_SIZE:
                self.matchers.popitem(last=False)
        return m.deep_copy()


_grammars_lock = threading.Lock()


def grammars_for(tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> _TokenizerGrammars:
    """One per (tokenizer, vocabulary size, EOS ids), kept on the tokenizer object."""
    key = (vocab_size, tuple(sorted(eos_ids)))
    with _grammars_lock:
        cache = tokenizer.__dict__.setdefault("_giants_guided", {})
        g = cache.get(key)
        if g is None:
            g = cache[key] = _TokenizerGrammars(tokenizer, vocab_size, eos_ids)
    return g


class Guide:
    """One sequence's grammar state."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> None:
        """Advance by a sampled token; raises if the grammar did not allow it (the mask should have)."""
        if not self.matcher.consume_token(token):
            raise ValueError(f"structured output: token {token} broke the grammar ({self.matcher.get_error()})")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (EOS aside): the sequence can stop here."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    def valid_prefix(self, draft: list[int]) -> list[int]:
        """Speculative decoding: the draft cut at the first token the grammar refuses from the current state (a
        refused draft could never be accepted: its verification row's mask excludes it). The matcher is left as
        it was."""
        return draft[:self.matcher.validate_tokens(draft)] if draft else draft

    def ahead(self, draft: list[int]) -> Guide | GuideAhead:
        """The grammar state after `draft` (valid, see valid_prefix), for the mask of a verification row."""
        return GuideAhead(self, tuple(draft)) if draft else self


@dataclass(frozen=True)
class GuideAhead:
    """A guide as it would be after `tokens` (speculative decoding's verification row j: the first j drafts).
    Never advances the guide: `apply_guides` computes its mask by consuming the tokens and rolling them back, so
    a rejected draft leaves no trace in the grammar state."""

    guide: Guide
    tokens: tuple[int, ...]


def new_guide(params: Any, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> Guide | None:
    grammar = getattr(params, "grammar", None)
    if grammar is None:
        return None
    if tokenizer is None:
        raise ValueError(f"{params.guided_field}: structured output needs a tokenizer (this engine has none)")
    return Guide(grammars_for(tokenizer, vocab_size, eos_ids).matcher(grammar))


_executor: Any = None
_BITS: dict[torch.device, torch.Tensor] = {}


def _bits(dev: torch.device) -> torch.Tensor:
    b = _BITS.get(dev)
    if b is None:
        b = _BITS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    return b


def _entries(guides: list[Guide | GuideAhead | None]
             ) -> tuple[list[int], list[tuple[Any, int, list[int]]], list[tuple[Any, int, tuple[int, ...]]]]:
    """The guided rows, and how to compute their masks (indices into the compact bitmask): runs as a verification
    lays them out (a guide, then the same guide ahead by 1, 2, .. drafts) as one (matcher, index, drafts) entry
    for llguidance's draft-aware parallel mask; a GuideAhead outside such a run on its own (matcher, index,
    tokens): consumed, masked, rolled back."""
    rows: list[int] = []
    runs: list[tuple[Any, int, list[int]]] = []
    alone: list[tuple[Any, int, tuple[int, ...]]] = []
    last: tuple[Guide, int, list[int]] | None = None  # the open run: its guide, first index, drafts
    for i, g in enumerate(guides):
        if g is None:
            continue
        j = len(rows)
        rows.append(i)
        if isinstance(g, Guide):
            last = (g, j, [])
            runs.append((g.matcher, j, last[2]))
        elif (last is not None and last[0] is g.guide and j == last[1] + len(last[2]) + 1
              and g.tokens[:-1] == tuple(last[2])):
            last[2].append(g.tokens[-1])
        else:
            last = None
            alone.append((g.guide.matcher, j, g.tokens))
    return rows, runs, alone


def _fill(runs: list[tuple[Any, int, list[int]]], alone: list[tuple[Any, int, tuple[int, ...]]],
          bitmask: torch.Tensor) -> None:
    global _executor
    L = _import()
    from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

    if _executor is None:
        _executor = L.LLExecutor()
    plain = [(m, j) for m, j, d in runs if not d]
    drafted = [r for r in runs if r[2]]
    if drafted and not hasattr(_executor, "unsafe_compute_mask_ptr_with_draft_token"):  # an older llguidance
        alone = alone + [(m, j + n, tuple(d[:n])) for m, j, d in drafted for n in range(len(d) + 1)]
        drafted = []
    if drafted:
        from llguidance.torch import fill_next_token_bitmask_par_with_draft_tokens

        # it consumes each run's drafts, writes the mask after each, and rolls the matcher back (it refuses an
        # empty draft list, so the rows without drafts go the plain way)
        fill_next_token_bitmask_par_with_draft_tokens(_executor, drafted, bitmask)
    if plain:
        fill_next_token_bitmask_par(_executor, plain, bitmask)
    for m, j, toks in alone:
        if not m.consume_tokens(list(toks)):
            raise ValueError(f"structured output: a draft broke the grammar ({m.get_error()})")
        try:
            fill_next_token_bitmask(m, bitmask, j)
        finally:
            m.rollback(len(toks))


def apply_guides(logits: torch.Tensor, guides: list[Guide | GuideAhead | None]) -> torch.Tensor:
    """logits (B, V): rows with a guide get -inf on every token their grammar does not allow next (EOS only
    where the grammar accepts); a GuideAhead row (speculative decoding) is masked by the grammar state after its
    tokens, the guide itself left as it was. Masks are computed on the host, in parallel across rows, by
    llguidance."""
    rows, runs, alone = _entries(guides)
    if not rows:
        return logits
    B, V = logits.shape
    words = (V + 31) // 32
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)
    _fill(runs, alone, bitmask)
    dev = logits.device
    bitmask = bitmask.to(dev, non_blocking=True) if dev.type == "cuda" else bitmask
    allowed = ((bitmask[:, :, None] >> _bits(dev)) & 1).view(len(rows), -1)[:, :V].bool()
    if len(rows) == B:
        return logits.masked_fill(~allowed, float("-inf"))
    idx = torch.tensor(rows, device=dev)
    out = logits.clone()
    out[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
    return out
