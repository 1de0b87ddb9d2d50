"""Tokenizer: a `tokenizers` tokenizer plus special tokens and a sandboxed chat template.

Sources: an HF directory (tokenizer.json + tokenizer_config.json [+ chat_template.jinja,
special_tokens_map.json, generation_config.json]), a tokenizer.json file, a .gguf file (the
vocabulary, merges and special tokens llama.cpp stores as metadata), or a known model name.

Chat templates are untrusted code from model files. They render in jinja2's
ImmutableSandboxedEnvironment with the helpers transformers gives them (raise_exception, tojson,
strftime_now), trim_blocks/lstrip_blocks, and plain-JSON inputs only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend
from tokenizers import processors

from giants.checkpoint.errors import CheckpointError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

class Tokenizer:
    """encode/decode, streaming decode, special tokens and chat templates over a `tokenizers.Tokenizer`."""

    def __init__(self, backend: _Backend, *, special: dict[str, str | None] | None = None,
                 chat_template: str | dict[str, str] | None = None, eos_token_ids: Iterable[int] = (),
                 add_bos_token: bool = False, add_eos_token: bool = False, source: str = "tokenizer") -> None:
        self.backend = backend
        self.source = source
        self.special = {k: (special or {}).get(k) for k in SPECIAL_NAMES}
        if isinstance(chat_template, list):  # tokenizer_config.json may hold [{"name":..., "template":...}]
            chat_template = {t["name"]: t["template"] for t in chat_template}
        self.chat_template = chat_template
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        ids = [i for i in eos_token_ids if i is not None]
        if self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.insert(0, self.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in ids))

    # ---- constructors --------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls.from_gguf(ggufs[0])
            raise CheckpointError("no tokenizer.json (and not exactly one .gguf) in the directory", file=path)
        backend = _read_backend(tj)
        cfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        smap = _read_json(path / "special_tokens_map.json") if (path / "special_tokens_map.json").is_file() else {}
        special = {k: _token_str(cfg.get(k, smap.get(k))) for k in SPECIAL_NAMES}
        template = cfg.get("chat_template")
        jinja = path / "chat_template.jinja"
        if jinja.is_file():  # transformers >= 4.43 writes the template beside the config
            template = jinja.read_text(encoding="utf-8")
        eos_ids: list[int] = []
        gen = path / "generation_config.json"
        if gen.is_file():
            e = _read_json(gen).get("eos_token_id")
            eos_ids = list(e) if isinstance(e, list) else ([e] if isinstance(e, int) else [])
        conf = path / "config.json"
        if not eos_ids and conf.is_file():
            e = _read_json(conf).get("eos_token_id")
            eos_ids = list(e) if isinstance(e, list) else ([e] if isinstance(e, int) else [])
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            try:
                template = {t["name"]: t["template"] for t in template}
            except (TypeError, KeyError):
                template = None
        if not (template is None or isinstance(template, str)
                or (isinstance(template, dict) and all(isinstance(v, str) for v in template.values()))):
            raise CheckpointError("chat_template must be a string or a list of named templates",
                                  file=path / "tokenizer_config.json")
        eos_ids = [i for i in eos_ids if isinstance(i, int) and not isinstance(i, bool)]
        return cls(backend, special=special, chat_template=template, eos_token_ids=eos_ids,
                   add_bos_token=bool(cfg.get("add_bos_token", False)),
                   add_eos_token=bool(cfg.get("add_eos_token", False)), source=str(path))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """A bare tokenizer.json (special tokens and template from its siblings when present)."""
        path = Path(path)
        if path.name == "tokenizer.json":
            return cls.from_dir(path.parent)
        return cls(_read_backend(path), source=str(path))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        from giants.checkpoint.gguf_io import gguf_metadata, open_gguf

        meta = gguf_metadata(open_gguf(path), path)
        return cls.from_gguf_metadata(meta, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "gguf") -> Tokenizer:
        """The tokenizer llama.cpp runs for this metadata (`giants.gguf_vocab`); an unsupported
        `tokenizer.ggml.model` or `tokenizer.ggml.pre` raises CheckpointError naming the file, key and value."""
        from giants.gguf_vocab import build_backend

        built = build_backend(meta, source)
        tokens = meta["tokenizer.ggml.tokens"]
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"tokenizer.chat_template must be a string, got {type(template).__name__}",
                                  file=source)

        def tok_id(key: str) -> int | None:
            i = meta.get(f"tokenizer.ggml.{key}", built.default_ids.get(key))
            if i is None:
                return None
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(tokens):
                raise CheckpointError(f"tokenizer.ggml.{key}={i!r} is not a token id of the vocabulary of "
                                      f"{len(tokens)}", file=source)
            return i

        def tok(key: str) -> str | None:
            i = tok_id(key)
            return None if i is None else built.backend.id_to_token(i)

        special = {"bos_token": tok("bos_token_id"), "eos_token": tok("eos_token_id"),
                   "unk_token": tok("unknown_token_id"), "pad_token": tok("padding_token_id")}
        eos = [tok_id("eos_token_id"), tok_id("eot_token_id")]
        for flag, name in ((built.add_bos, "bos"), (built.add_eos, "eos")):
            if flag and special[f"{name}_token"] is None:  # llama.cpp refuses this too
                raise CheckpointError(f"tokenizer.ggml.add_{name}_token is true, but tokenizer.ggml.{name}_token_id "
                                      "is not set", file=source)
        t = cls(built.backend, special=special, chat_template=template,
                eos_token_ids=[e for e in eos if e is not None], add_bos_token=built.add_bos,
                add_eos_token=built.add_eos, source=source)
        t._set_post_processor()
        return t

    def _set_post_processor(self) -> None:
        """BOS/EOS insertion as the flags say (GGUF carries flags, not a post-processor)."""
        single, special = "$A", []
        if self.add_bos_token and self.bos_token is not None:
            single = f"{self.bos_token} {single}"
            special.append((self.bos_token, self.bos_token_id))
        if self.add_eos_token and self.eos_token is not None:
            single = f"{single} {self.eos_token}"
            special.append((self.eos_token, self.eos_token_id))
        pair = single + " " + single.replace("$A", "$B:1")
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                    special_tokens=list(dict.fromkeys(special)))

    # ---- special tokens ------------------------------------------------------------------------------
    def _id(self, name: str) -> int | None:
        tok = self.special.get(name)
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def bos_token(self) -> str | None:
        return self.special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self.special["eos_token"]

    @property
    def pad_token(self) -> str | None:
        return self.special["pad_token"]

    @property
    def unk_token(self) -> str | None:
        return self.special["unk_token"]

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    @property
    def special_tokens(self) -> list[str]:
        """Every special added token (control tokens), in id order."""
        return [t.content for _, t in sorted(self.backend.get_added_tokens_decoder().items()) if t.special]

    @property
    def special_token_ids(self) -> list[int]:
        return [i for i, t in sorted(self.backend.get_added_tokens_decoder().items()) if t.special]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # ---- encode / decode -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental decoder: `.add(token_id) -> new text`, never half a UTF-8 character."""
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------------
    def get_chat_template(self, name: str | None = None, tools: list | None = None) -> str:
        t = self.chat_template
        if t is None:
            raise ValueError(f"{self.source}: this tokenizer has no chat template")
        if isinstance(t, dict):
            key = name or ("tool_use" if tools and "tool_use" in t else "default")
            if key not in t:
                raise ValueError(f"{self.source}: no chat template named {key!r} (have {sorted(t)})")
            return t[key]
        return t

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, *, tokenize: bool = False,
                            chat_template: str | None = None, documents: list[dict] | None = None,
                            **kwargs: Any) -> str | list[int]:
        """Render `messages` as transformers' `apply_chat_template` does (same environment, same inputs)."""
        if not messages:
            raise ValueError("apply_chat_template: empty conversation")
        template = chat_template or self.get_chat_template(tools=tools)
        chat = [{k: v for k, v in _plain(dict(m)).items() if v is not None} for m in messages]
        for m in chat:
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None),
                             None)
            if reasoning is not None:
                m.setdefault("thinking", reasoning)
                m["reasoning_content"] = reasoning
        context = {k: v for k, v in self.special.items() if v is not None}
        context.update(_plain(kwargs))
        text = _compile(template).render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt, **context)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- save ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> list[Path]:
        """tokenizer.json, tokenizer_config.json (with chat_template), special_tokens_map.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        special = {k: v for k, v in self.special.items() if v is not None}
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                               "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                               "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        return [path / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


class StreamDecoder:
    """Incremental detokenizer. `add(id)` returns only text that can no longer change: a delta is held
    back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD), and each step decodes a
    short window with one token of left context so byte-level and sentencepiece spacing stay right.
    `"".join(adds) + flush()` equals `decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start (context already emitted)
        self.read = 0  # first id whose text is not emitted yet

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(text) > len(prefix_text) and not text.endswith("\ufffd") and text.startswith(prefix_text):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (possibly ending in U+FFFD if the stream stopped mid-character)."""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text):] if text.startswith(prefix_text) else text

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids, self.skip)


# ---- builders ----------------------------------------------------------------------------------------
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes (`giants.gguf_vocab.byte_alphabet`)."""
    from giants.gguf_vocab import byte_alphabet

    return byte_alphabet()


def _read_backend(path: Path) -> _Backend:
    try:
        return _Backend.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read tokenizer: {e}", file=path) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read JSON: {e}", file=path) from None
    if not isinstance(d, dict):
        raise CheckpointError("expected a JSON object", file=path)
    return d


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):  # serialised AddedToken
        v = v.get("content")
    return v if isinstance(v, str) else None


# ---- chat template environment -----------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Only JSON-shaped data reaches a template (rich objects carry methods the sandbox doesn't vet)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _template_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _Namespace(jinja2.utils.Namespace):
        # No dunder / private attributes on namespaces: they are a route to interpreter internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for k in attrs:
                _Namespace._check(k)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; render it plainly.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _template_dict
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e}") from None


# ---- entry point -------------------------------------------------------------------------------------
def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """A Tokenizer from an HF directory, tokenizer.json, .gguf file or known model name."""
    from giants.checkpoint import hub

    if hub.is_known(source):
        return Tokenizer.from_gguf(hub.download(str(source)))
    path = Path(source).expanduser()
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return Tokenizer.from_gguf(path)
        return Tokenizer.from_file(path)
    raise FileNotFoundError(f"{source}: no such tokenizer source (an HF directory, tokenizer.json, .gguf file or "
                            f"known model name: {', '.join(hub.KNOWN_MODELS)})")


__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer"]
