"""A `tokenizers` backend from the vocabulary a GGUF file stores as metadata, tokenizing as llama.cpp does.

Two vocabulary kinds (`tokenizer.ggml.model`) are read; anything else is refused, never guessed:

* ``gpt2``: byte-level BPE (Llama 3, SmolLM2, Qwen2, gpt-oss, Mistral's tekken, GPT-2 ...). Tokens and merges
  are spelled in GPT-2's byte alphabet; the text is first cut by the split regexes llama.cpp keeps for the
  file's ``tokenizer.ggml.pre`` name (``_PRE_TOKENIZERS``; an unknown name is refused).
* ``llama``: SentencePiece BPE (Llama 2, Mistral 7B, Mixtral, Gemma ...). The file has tokens, scores and token
  types but no merges. llama.cpp's SPM tokenizer merges, over the whole text with spaces escaped as ``▁``, the
  adjacent pair whose concatenation is a token of the highest score, and spells whatever is left as ``<0xNN>``
  byte tokens. That is BPE with one merge per (left, right) split of every token, ranked by the merged
  token's score, plus byte fallback -- how transformers' GGUF loader builds it too.

llama.cpp's tokenizer is the reference for what a GGUF means (src/llama-vocab.cpp: `llama_vocab::impl::load`,
`llm_tokenizer_bpe`, `llm_tokenizer_spm_session`, `llama_vocab::impl::tokenize`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from giants.checkpoint.errors import CheckpointError

# llama.cpp token types (`llama_token_type`): what each id of `tokenizer.ggml.token_type` means.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---- split regexes ---------------------------------------------------------------------------------------
# Each is the regex of the model's own tokenizer.json (HF `tokenizers` / tiktoken syntax, which `Regex` runs
# as is). llama.cpp keeps the same ones in `llm_tokenizer_bpe::llm_tokenizer_bpe`, rewriting `(?i:'s|...)` as
# `(?:'[sS]|...)` for std::regex and dropping a trailing `|\s+`, which changes no split: whitespace that
# `\s+(?!\S)` leaves unmatched becomes a piece of its own either way.
#
# GPT-2 (openai/gpt-2 encoder.py; llama.cpp LLAMA_VOCAB_PRE_TYPE_GPT2).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3 (meta-llama/Meta-Llama-3-8B tokenizer.json; llama.cpp LLAMA_VOCAB_PRE_TYPE_LLAMA3).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 (Qwen/Qwen2-7B tokenizer.json; llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2): Llama 3's with single digits.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral tekken (mistralai/Mistral-Nemo-Instruct-2407 tokenizer.json; llama.cpp LLAMA_VOCAB_PRE_TYPE_TEKKEN).
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k (tiktoken's o200k_base, openai/gpt-oss-20b tokenizer.json; llama.cpp LLAMA_VOCAB_PRE_TYPE_GPT4O).
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """llama.cpp's handling of one `tokenizer.ggml.pre` value: regexes applied one after another, each cutting
    every piece so far into its matches and the text between them (`unicode_regex_split`, which is
    `Split(behavior="isolated")`), then byte-level spelling. `ignore_merges`: a piece that is a token is
    taken whole (`llama_vocab::impl::load` sets it for these). `add_bos`: llama.cpp's default when the file
    has no `tokenizer.ggml.add_bos_token`."""

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2_PRE = PreTokenizer((_GPT2,))
# llama.cpp isolates every numeral first (their tokenizer.json has Digits(individual_digits=True) first).
_DIGITS_PRE = PreTokenizer((r"\p{N}", _GPT2))
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_PRE = PreTokenizer((_QWEN2,))
_GPT4O_PRE = PreTokenizer((_GPT4O,))

# `tokenizer.ggml.pre` -> llama.cpp's pre-tokenizer (the name checks of `llama_vocab::impl::load` and the
# regexes of `llm_tokenizer_bpe`), for the families giants builds and their close relatives.
_PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # LLAMA_VOCAB_PRE_TYPE_DEFAULT: what llama.cpp runs for "default" (and for a file with no `pre` at all).
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    # LLAMA_VOCAB_PRE_TYPE_GPT2 / MPT / OLMO: the GPT-2 regex alone.
    "gpt-2": _GPT2_PRE, "phi-2": _GPT2_PRE, "mpt": _GPT2_PRE, "olmo": _GPT2_PRE,
    # LLAMA_VOCAB_PRE_TYPE_SMOLLM / STARCODER / REFACT / COMMAND_R / CODESHELL / EXAONE / MINERVA.
    "smollm": _DIGITS_PRE, "starcoder": _DIGITS_PRE, "refact": _DIGITS_PRE, "command-r": _DIGITS_PRE,
    "codeshell": _DIGITS_PRE, "exaone": _DIGITS_PRE, "minerva-7b": _DIGITS_PRE,
    # LLAMA_VOCAB_PRE_TYPE_LLAMA3 (Llama 3.x and the models converted with its tokenizer).
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"), _LLAMA3_PRE),
    # LLAMA_VOCAB_PRE_TYPE_DBRX / SMAUG: the Llama 3 regex without Llama 3's flags.
    "dbrx": PreTokenizer((_LLAMA3,)), "smaug-bpe": PreTokenizer((_LLAMA3,)),
    # LLAMA_VOCAB_PRE_TYPE_QWEN2 / STABLELM2 (Qwen2, Qwen2.5, Qwen3, DeepSeek-R1 distills of Qwen).
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"), _QWEN2_PRE),
    # LLAMA_VOCAB_PRE_TYPE_TEKKEN (Mistral Nemo, Mistral Small 3, Pixtral's text model).
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    # LLAMA_VOCAB_PRE_TYPE_GPT4O / MINIMAX_M2 (gpt-oss, Llama 4, ...).
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_PRE),
}

SUPPORTED_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}
SUPPORTED_PRE = tuple(sorted(_PRE_TOKENIZERS))


def pre_tokenizer_for(pre: str | None, source: str) -> PreTokenizer:
    """The pre-tokenizer a byte-level BPE GGUF asks for; an unknown name is an error, never a stand-in."""
    if not pre:
        # Absent or empty: as llama.cpp does ("missing pre-tokenizer type, using: 'default'"), and as loudly.
        warnings.warn(f"{source}: no tokenizer.ggml.pre (or an empty one) in a byte-level BPE vocabulary; using "
                      "llama.cpp's 'default' pre-tokenizer as llama.cpp does (re-convert the model for the right one)",
                      stacklevel=3)
        pre = "default"
    spec = _PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise CheckpointError(f"tokenizer.ggml.pre={pre!r} is not a supported pre-tokenizer for "
                              f"tokenizer.ggml.model='gpt2' (supported: {', '.join(SUPPORTED_PRE)})", file=source)
    return spec


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# ---- metadata ---------------------------------------------------------------------------------------------
@dataclass
class GGUFVocab:
    """What the tokenizer needs from a GGUF's metadata, type-checked (metadata is untrusted input)."""

    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    pre: str | None
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None


def read_vocab(meta: dict[str, Any], source: str) -> GGUFVocab:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not isinstance(tokens, list) or not tokens:
        raise CheckpointError("no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)", file=source)
    if not isinstance(kind, str) or kind not in SUPPORTED_MODELS:
        raise CheckpointError(f"tokenizer.ggml.model={kind!r} is not supported (supported: "
                              f"{', '.join(f'{k!r} ({v})' for k, v in SUPPORTED_MODELS.items())})", file=source)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges") or []
    scores = meta.get("tokenizer.ggml.scores")
    for key, value, kinds in (("tokens", tokens, str), ("token_type", types, int), ("merges", merges, str),
                              ("scores", scores if scores is not None else [], (int, float))):
        if not isinstance(value, list) or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value):
            names = kinds.__name__ if isinstance(kinds, type) else "number"
            raise CheckpointError(f"tokenizer.ggml.{key} must be an array of {names}", file=source)
    for key, value in (("token_type", types), ("scores", scores)):
        if value is not None and len(value) != len(tokens):
            raise CheckpointError(f"tokenizer.ggml.{key} has {len(value)} entries for {len(tokens)} tokens",
                                  file=source)
    pre = meta.get("tokenizer.ggml.pre")
    if pre is not None and not isinstance(pre, str):
        raise CheckpointError(f"tokenizer.ggml.pre must be a string, got {type(pre).__name__}", file=source)
    flags = {}
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and not isinstance(v, bool):
            raise CheckpointError(f"tokenizer.ggml.{key} must be a bool, got {type(v).__name__}", file=source)
        flags[key] = v
    # llama.cpp names an empty token "[EMPTY_<id>]" and refuses duplicates; so do we.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if seen.setdefault(t, i) != i:
            raise CheckpointError(f"duplicate token in tokenizer.ggml.tokens: {t!r} has ids {seen[t]} and {i}",
                                  file=source)
    return GGUFVocab(kind, tokens, types, None if scores is None else [float(s) for s in scores], merges, pre,
                     flags["add_bos_token"], flags["add_eos_token"], flags["add_space_prefix"])


@dataclass
class Built:
    backend: _Backend
    add_bos: bool
    add_eos: bool
    default_ids: dict[str, int]  # llama.cpp's special token ids for keys the file leaves out


def build_backend(meta: dict[str, Any], source: str) -> Built:
    """The `tokenizers` backend for a GGUF's vocabulary, and its BOS/EOS flags as llama.cpp reads them."""
    v = read_vocab(meta, source)
    if v.model == "gpt2":
        spec = pre_tokenizer_for(v.pre, source)
        backend = _byte_level_bpe(v, spec, source)
        add_bos = spec.add_bos if v.add_bos is None else v.add_bos
        return Built(backend, add_bos, bool(v.add_eos), {})
    # llama.cpp's SPM defaults: BOS added, unk/bos/eos at 0/1/2 unless the file says otherwise.
    defaults = {k: i for k, i in (("unknown_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2))
                if i < len(v.tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id", defaults.get("unknown_token_id", 0))
    if not isinstance(unk, int) or isinstance(unk, bool) or not 0 <= unk < len(v.tokens):
        raise CheckpointError(f"tokenizer.ggml.unknown_token_id={unk!r} is not a token id of the vocabulary of "
                              f"{len(v.tokens)}", file=source)
    return Built(_sentencepiece_bpe(v, unk, source), True if v.add_bos is None else v.add_bos, bool(v.add_eos),
                 defaults)


# ---- byte-level BPE ---------------------------------------------------------------------------------------
def _byte_level_bpe(v: GGUFVocab, spec: PreTokenizer, source: str) -> _Backend:
    spell = byte_alphabet()
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    texts = set(v.tokens)
    for i, t in enumerate(v.tokens):
        # Tokens are spelled in the byte alphabet, but control and user-defined ones are plain text (llama.cpp
        # matches those in the raw text): they stay plain, and added tokens below point at them. Any other
        # token outside the alphabet is spelled, unless that spelling is taken (then merges cannot reach it,
        # as in llama.cpp, which compares token text with the byte-spelled pieces).
        key = t
        if not set(t) <= alphabet and v.types[i] not in (CONTROL, USER_DEFINED):
            spelled = "".join(spell[b] for b in t.encode("utf-8"))
            key = t if spelled in texts or spelled in vocab else spelled
        vocab[key] = i
    pairs = []
    for m in v.merges:
        cut = m.find(" ", 1)  # llama.cpp: the first space after the first character
        if cut < 0:
            raise CheckpointError(f"tokenizer.ggml.merges: malformed merge {m!r}", file=source)
        pairs.append((m[:cut], m[cut + 1:]))
    try:
        model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                           ignore_merges=spec.ignore_merges)
    except Exception as e:
        raise CheckpointError(f"cannot build the BPE tokenizer: {e}", file=source) from None
    backend = _Backend(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    _add_tokens(backend, v)
    n = backend.get_vocab_size(with_added_tokens=True)
    if n != len(v.tokens):
        raise CheckpointError(f"tokenizer has {n} entries but the file lists {len(v.tokens)} tokens "
                              "(duplicate or unspellable tokens)", file=source)
    return backend


# ---- SentencePiece BPE ------------------------------------------------------------------------------------
def _sentencepiece_bpe(v: GGUFVocab, unk: int, source: str) -> _Backend:
    if v.scores is None:
        raise CheckpointError("tokenizer.ggml.model='llama' needs tokenizer.ggml.scores (the merge priorities)",
                              file=source)
    vocab = {t: i for i, t in enumerate(v.tokens)}
    # Byte fallback spells a character that no merge reaches as <0xNN> tokens; the unknown token is left for
    # a byte whose token is missing too.
    model = models.BPE(vocab=vocab, merges=spm_merges(v.tokens, v.scores), unk_token=v.tokens[unk],
                       fuse_unk=True, byte_fallback=True)
    backend = _Backend(model)
    # llama.cpp (`llama_vocab::impl::tokenize`, LLAMA_VOCAB_TYPE_SPM): each run of text between special tokens
    # gets " " in front when add_space_prefix is on (the default), then every " " becomes "▁", and the run is
    # merged whole (no pre-tokenizer). A normalizer runs on each such run, as llama.cpp's prefix does.
    prefix = True if v.add_space_prefix is None else v.add_space_prefix
    escape = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape]) if prefix else escape
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_tokens(backend, v)
    return backend


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """llama.cpp's SPM merge order as BPE merges: every split (a, b) of a token t with a and b tokens too,
    best first by t's score (llama.cpp merges the highest-scoring adjacent pair first); ties as transformers'
    `generate_merges` orders them (longer left piece, then longer right piece, then vocabulary order)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in ids and b in ids:
                found.append((-scores[i], -len(a), -len(b), i, a, b))
    found.sort(key=lambda m: m[:4])
    return [(a, b) for *_, a, b in found]


def _add_tokens(backend: _Backend, v: GGUFVocab) -> None:
    """Control (and unknown) tokens become special added tokens, user-defined ones added tokens that are not
    special: both are matched whole in the raw text before anything else, as llama.cpp's
    `tokenizer_st_partition` does. Each is already in the model's vocabulary, so it keeps its id."""
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(v.tokens, v.types)
               if k in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(v.tokens, v.types) if k == USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


__all__ = ["SUPPORTED_MODELS", "SUPPORTED_PRE", "PreTokenizer", "build_backend", "byte_alphabet", "pre_tokenizer_for",
           "spm_merges"]
