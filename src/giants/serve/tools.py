"""What the model must write and how its text is read back: tools / tool_choice (the call parsed into OpenAI's
`tool_calls`) and gpt-oss's harmony channels (analysis -> `reasoning_content`, final -> `content`, commentary
`to=functions.NAME` -> a tool call). Structured output's request fields: giants.serve.structured.

Tool calls are written as each family's chat template teaches the model:
- Hermes / Qwen style: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (one block per call);
- Llama 3.1 style: the whole reply a JSON object `{"name": ..., "parameters": {...}}` (or `<|python_tag|>` first);
- Mistral style: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`;
- harmony (gpt-oss): `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}`.
"auto" reads any of the first three (or harmony for a harmony template). "required" and a named function are
enforced with the grammar engine as vLLM does: a named function's reply is its arguments (a JSON schema), a
required call a JSON list of {"name", "parameters"}; for harmony, a grammar of the commentary header and the
arguments. A template that does not render `tools` gets them in a system message in the Hermes format
(giants' own choice: vLLM would pass them to a template that drops them, and the model would never see them).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from giants.serve.errors import APIError
from giants.serve.structured import check_grammar, structured_kwargs

# ---- tools -------------------------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
HERMES_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON string, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def template_style(template: str | None) -> str:
    """How the template asks the model to call tools: harmony, hermes, llama, mistral, or none (it does not
    render tools)."""
    t = template or ""
    if "<|channel|>" in t:
        return "harmony"
    if "tools" not in t:
        return "none"
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return "mistral"
    return "llama"  # Llama 3.1 and templates like it: a JSON object with name and parameters


def _params_schema(fn: dict[str, Any]) -> dict[str, Any]:
    p = fn.get("parameters")
    return p if isinstance(p, dict) and p else {"type": "object", "properties": {}}


class ToolPlan:
    """One chat request's tools, tool_choice and template style: what goes into the template, the grammar for
    "required" / a named function, and the parser for the reply."""

    def __init__(self, tools: list[dict[str, Any]] | None, tool_choice: Any, template: str | None,
                 parallel_tool_calls: bool | None = None) -> None:
        self.style = template_style(template)
        self.tools = list(tools or [])
        self.parallel = parallel_tool_calls is not False
        self.functions: dict[str, dict[str, Any]] = {}
        for i, t in enumerate(self.tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
                raise APIError(400, "each tool must be {\"type\": \"function\", \"function\": {...}}", f"tools[{i}]",
                               "invalid_value")
            name = fn.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise APIError(400, "a function name must be 1-64 letters, digits, _ . or -",
                               f"tools[{i}].function.name", "invalid_value")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise APIError(400, "parameters must be a JSON schema object", f"tools[{i}].function.parameters",
                               "invalid_value")
            check_grammar("json", _params_schema(fn), f"tools[{i}].function.parameters")
            self.functions[name] = fn
        choice = tool_choice
        if choice is None:
            choice = "auto" if self.tools else "none"
        self.named: str | None = None
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(400, "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                               "\"function\": {\"name\": ...}}", "tool_choice", "invalid_value")
            if fn["name"] not in self.functions:
                raise APIError(400, f"tool_choice names function {fn['name']!r}, which is not in tools",
                               "tool_choice", "invalid_value")
            self.named, choice = fn["name"], "named"
        elif choice not in ("none", "auto", "required"):
            raise APIError(400, "tool_choice must be \"none\", \"auto\", \"required\" or a named function",
                           "tool_choice", "invalid_value")
        elif choice != "none" and not self.tools:
            raise APIError(400, f"tool_choice {choice!r} needs tools", "tool_choice", "invalid_value")
        self.mode = choice
        self.stop_token_ids: list[int] = []  # harmony: its stop tokens with the request's (set by tool_plan)

    @property
    def active(self) -> bool:
        """The reply needs reading back (tool calls, or harmony's channels)."""
        return self.mode != "none" or self.style == "harmony"

    # -- the prompt --
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the template renders (none with tool_choice "none", or when giants renders them itself)."""
        if self.mode == "none" or self.style == "none":
            return None
        return self.tools

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation for the template: assistant tool calls with their arguments as objects (what
        templates index into, as vLLM passes them); for a template without tools, the tools in a system message
        and earlier calls written out as the model is told to write them."""
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    fn = dict(c["function"])
                    try:
                        fn["arguments"] = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) \
                            else fn["arguments"]
                    except json.JSONDecodeError:
                        pass  # the template gets the string as the client sent it
                    calls.append({**c, "function": fn})
                m["tool_calls"] = calls
                if self.style == "none":
                    text = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                                   "arguments": c["function"]["arguments"]})
                                     + "\n</tool_call>" for c in calls)
                    m["content"] = ((m.get("content") or "") + "\n" + text).strip()
                    del m["tool_calls"]
            out.append(m)
        if self.style == "harmony":
            out = _harmony_history(out)
        if self.style == "none" and self.mode != "none":
            block = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in self.tools))
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
            else:
                out.insert(0, {"role": "system", "content": block})
        return out

    # -- the grammar --
    def sampling_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.style == "harmony":
            kw["skip_special_tokens"] = False  # the channel markers are special tokens: the parser needs them
            if self.stop_token_ids:
                kw["stop_token_ids"] = list(self.stop_token_ids)
        if self.mode == "named":
            if self.style == "harmony":
                kw["guided_grammar"] = _harmony_call_grammar({self.named: self.functions[self.named]})
            else:
                kw["guided_json"] = _params_schema(self.functions[self.named])
        elif self.mode == "required":
            if self.style == "harmony":
                kw["guided_grammar"] = _harmony_call_grammar(self.functions)
            else:
                items = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                                     "parameters": _params_schema(fn)},
                                    "required": ["name", "parameters"], "additionalProperties": False}
                                   for name, fn in self.functions.items()]}
                schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
                if not self.parallel:
                    schema["maxItems"] = 1
                kw["guided_json"] = schema
        return kw

    # -- the reply --
    def parse(self, text: str, final: bool = True) -> Parsed:
        """final=False: a streamed reply so far; content stops short of anything that may still become a call,
        and only calls already complete (or, for harmony and a named function, their arguments so far) appear."""
        if self.style == "harmony":
            p = parse_harmony(text, final)
        elif self.mode == "none":
            p = Parsed(text)
        elif self.mode == "named":
            p = Parsed(None, tool_calls=[ToolCall(self.named, text)] if text or final else [])
        elif self.mode == "required":
            p = Parsed(None, tool_calls=_calls_from_json(text) if final else [])
            if final and not p.tool_calls:
                p.content = text  # cut off by max_tokens before the list closed: the raw text, as vLLM returns it
        else:
            p = parse_auto(text, final)
        if self.mode == "none" and p.tool_calls:  # harmony: the model called a tool it was told not to
            p.tool_calls = []
        if not self.parallel:
            p.tool_calls = p.tool_calls[:1]
        return p


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # as Tokenizer.apply_chat_template reads them


def _harmony_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a harmony (gpt-oss) template, so that it renders a call as openai_harmony does:
    - each call's content type `<|constrain|>json` (what the model writes and openai_harmony renders; the
      template reads `content_type` and would otherwise write a bare ` json`);
    - one assistant message per call, each followed by its tool results (by tool_call_id, else in order): the
      template renders only a message's first call and names each result after the last call before it, and
      gpt-oss calls one function per turn (generation stops at `<|call|>`);
    - reasoning and content both on a message with calls (analysis, then a commentary preamble) joined into the
      reasoning: the template renders one analysis message before a call and refuses a message with both."""
    out, i = [], 0
    while i < len(messages):
        m = messages[i]
        i += 1
        calls = m.get("tool_calls") if m.get("role") == "assistant" else None
        if not calls:
            out.append(m)
            continue
        calls = [{**c, "function": {**c["function"], "content_type": c["function"].get("content_type", HARMONY_JSON)}}
                 for c in calls]
        thinking = next((m[k] for k in _REASONING_KEYS if m.get(k)), None)
        if thinking and m.get("content"):
            m = {k: v for k, v in m.items() if k not in _REASONING_KEYS}
            m.update(reasoning_content=f"{thinking}\n{m['content']}", content="")
        groups: list[list[dict[str, Any]]] = [[] for _ in calls]
        ids = [c.get("id") for c in calls]
        answered: set[int] = set()
        while i < len(messages) and messages[i].get("role") == "tool":
            r = messages[i]
            i += 1
            tid = r.get("tool_call_id")
            k = ids.index(tid) if tid is not None and tid in ids else \
                next((j for j in range(len(calls)) if j not in answered), len(calls) - 1)
            answered.add(k)
            groups[k].append(r)
        for k, c in enumerate(calls):
            out.append({**m, "tool_calls": [c]} if k == 0 else {"role": "assistant", "content": "", "tool_calls": [c]})
            out.extend(groups[k])
    return out


def _harmony_call_grammar(functions: dict[str, dict[str, Any]]) -> str:
    """gpt-oss: a commentary-channel call to one of `functions`, its arguments matching the schema (Lark with
    llguidance's %json and special-token syntax)."""
    rules, alts = [], []
    for i, (name, fn) in enumerate(functions.items()):
        rules.append(f"args{i}: %json {json.dumps(_params_schema(fn))}")
        alts.append(f'"commentary to=functions.{name} " <|constrain|> "json" <|message|> args{i}')
    return "start: <|channel|> (" + " | ".join(alts) + ")\n" + "\n".join(rules)


def _call_from_obj(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if args is None or set(obj) - {"name", "arguments", "parameters", "type", "id"}:
        return None
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _calls_from_json(text: str) -> list[ToolCall]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return []
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_call_from_obj(o) for o in objs]
    return calls if calls and all(calls) else []  # type: ignore[return-value]


_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


def parse_auto(text: str, final: bool = True) -> Parsed:
    """A reply that may hold tool calls in any of the Hermes, Llama 3.1 or Mistral shapes; text that only looks
    like a call but does not parse stays content (as vLLM's parsers leave it)."""
    if "<tool_call>" in text:
        calls, pieces, pos = [], [], 0
        for m in _TAG.finditer(text):
            closed = m.group(0).rstrip().endswith("</tool_call>")
            if not closed and not final:
                break
            call = _calls_from_json(m.group(1))
            if not call:
                continue  # left in the content
            pieces.append(text[pos:m.start()])
            pos = m.end()
            calls.extend(call)
        pieces.append(text[pos:] if final or "<tool_call>" not in text[pos:] else text[pos:text.index("<tool_call>",
                                                                                                      pos)])
        content = "".join(pieces).strip() if calls else "".join(pieces)
        return Parsed(content or None, tool_calls=calls)
    for marker in ("[TOOL_CALLS]", "<|python_tag|>"):
        if marker in text:
            before, _, rest = text.partition(marker)
            if not final:
                return Parsed(before)
            calls = _calls_from_json(rest.strip()) or [c for part in rest.split(";")
                                                       for c in _calls_from_json(part.strip())]
            return Parsed((before.strip() or None) if calls else text, tool_calls=calls)
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        if not final:
            return Parsed("")  # may be a Llama-style call: held back until the reply ends
        calls = _calls_from_json(stripped)
        return Parsed(None if calls else text, tool_calls=calls)
    if not final:  # hold back a tail that may be the start of a marker
        for k in range(min(len(text), max(map(len, _MARKERS))), 0, -1):
            if any(mk.startswith(text[-k:]) for mk in _MARKERS):
                return Parsed(text[:-k])
    return Parsed(text)


# ---- harmony -------------------------------------------------------------------------------------------

# The assistant's stop tokens (openai_harmony's `stop_tokens_for_assistant_actions`): `<|return|>` after the final
# answer, `<|call|>` after a tool call. gpt-oss's config.json names only `<|return|>` as EOS.
HARMONY_STOP = ("<|return|>", "<|call|>")
HARMONY_JSON = "<|constrain|>json"  # the content type of a function call's arguments, as the model writes it
_ROLES = ("system", "developer", "user", "assistant", "tool")
_END = re.compile(r"<\|(?:end|call|return)\|>")


@dataclass
class HarmonyMessage:
    """One harmony message as openai_harmony parses it: its author (`role`, and `name` for a tool's message), the
    header's channel, recipient and content type, and the body; `done` is False while the body is arriving."""
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    content: str
    name: str | None = None
    done: bool = True


def _harmony_header(header: str, role: str | None) -> tuple[str, str | None, str | None, str | None, str | None]:
    """(role, name, channel, recipient, content_type) of a message header, read as openai_harmony's
    `parse_header_from_string` reads it: `<|channel|>NAME` wherever it stands, then whitespace-separated parts:
    the role (an unknown one is a tool's name: `functions.NAME to=assistant`), and from the end a content type
    (`<|constrain|>json`, or `json`) when a recipient precedes it, and the recipient (`to=` optional when it is
    the only part left). The recipient may thus stand in the role part (`assistant to=functions.f<|channel|>...`)
    or after the channel. `role`: known when the header follows the prompt's `<|start|>assistant`."""
    channel = None
    i = header.find("<|channel|>")
    if i >= 0:
        after = header[i + len("<|channel|>"):]
        value = re.match(r"[^\s<]*", after).group(0)
        channel = value or None  # openai_harmony refuses an empty channel; giants reads the rest of the header
        header = header[:i] + after[len(value):]
    parts = header.strip().replace("<|constrain|>", " <|constrain|>").split()
    name = None
    if role is None:
        if not parts:
            role = "assistant"  # openai_harmony refuses a header without a role; the assistant is writing
        elif parts[0] in _ROLES:
            role = parts[0]
        else:
            role, name = "tool", parts.pop(0)
    if parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        count, last = len(parts), parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif count == 1:
            recipient = last
        else:
            content_type, r = last, parts.pop()
            recipient = r[3:] if r.startswith("to=") else r
    return role, name, channel, recipient, content_type


def harmony_messages(text: str) -> list[HarmonyMessage]:
    """gpt-oss's reply (the text after the prompt's `<|start|>assistant`, special tokens kept) as harmony
    messages: a header, `<|message|>`, the body, ended by `<|end|>` (then `<|start|>` and the next message's
    role) or by a stop token (`<|call|>`, `<|return|>`; usually not in the text: generation ends there). A
    message whose header is still arriving is left out; one whose body is arriving is the last, not done."""
    out: list[HarmonyMessage] = []
    pos, n = 0, len(text)
    role: str | None = "assistant"
    while pos < n:
        if text.startswith("<|start|>", pos):
            pos += len("<|start|>")
            role = None  # the role is the header's first part
        mi = text.find("<|message|>", pos)
        if mi < 0:
            break
        author, name, channel, recipient, ctype = _harmony_header(text[pos:mi], role)
        body_start = mi + len("<|message|>")
        end = _END.search(text, body_start)
        out.append(HarmonyMessage(author, channel, recipient, ctype, text[body_start:end.start() if end else n],
                                  name, end is not None))
        if end is None:
            break
        pos, role = end.end(), None
    return out


def parse_harmony(text: str, final: bool = True) -> Parsed:
    """gpt-oss's reply in OpenAI's fields (vLLM's mapping): a message to `functions.NAME` -> a tool call whose
    arguments are the body (while streaming: the arguments so far); the analysis channel and messages to any
    other recipient (the built-in `browser.*` / `python` tools, which giants does not offer) -> reasoning_content;
    final, and commentary without a recipient (the model's preambles to its calls, meant for the user) ->
    content. Several messages of one kind are joined by a newline. Messages the model writes as another author
    (a tool's reply it should have waited for) are not the assistant's and are dropped."""
    reasoning, content, calls = [], [], []
    for m in harmony_messages(text):
        if m.role != "assistant":
            continue
        if m.recipient is not None and m.recipient.startswith("functions."):
            calls.append(ToolCall(m.recipient[len("functions."):], m.content))
        elif m.channel == "analysis" or m.recipient is not None:
            reasoning.append(m.content)
        else:
            content.append(m.content)
    return Parsed("\n".join(content) if content else None, "\n".join(reasoning) if reasoning else None, calls)


# ---- streaming -----------------------------------------------------------------------------------------


class ChoiceStream:
    """One streamed choice: the reply so far re-read at each step; yields OpenAI delta fields for what is new."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan, self.text = plan, ""
        self.sent_content = self.sent_reasoning = 0
        self.sent_args: list[int] = []
        self.ids: list[str] = []

    def feed(self, new_text: str, final: bool) -> dict[str, Any]:
        """The delta (OpenAI's chunk fields) for `new_text`; {} when nothing can be sent yet."""
        self.text += new_text
        p = self.plan.parse(self.text, final)
        out: dict[str, Any] = {}
        r = p.reasoning or ""
        if len(r) > self.sent_reasoning:
            out["reasoning_content"] = r[self.sent_reasoning:]
            self.sent_reasoning = len(r)
        c = p.content or ""
        if len(c) > self.sent_content:
            out["content"] = c[self.sent_content:]
            self.sent_content = len(c)
        calls = []
        for k, call in enumerate(p.tool_calls):
            if k == len(self.ids):
                self.ids.append(call.id)
                self.sent_args.append(len(call.arguments))
                calls.append({"index": k, "id": call.id, "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}})
            elif len(call.arguments) > self.sent_args[k]:
                calls.append({"index": k, "function": {"arguments": call.arguments[self.sent_args[k]:]}})
                self.sent_args[k] = len(call.arguments)
        if calls:
            out["tool_calls"] = calls
        return out

    @property
    def called(self) -> bool:
        return bool(self.ids)


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's: a reply that ended on its own with tool calls finishes with "tool_calls"."""
    return "tool_calls" if called and reason == "stop" else reason


# ---- the endpoint's helpers ------------------------------------------------------------------------------


def check_tool_calls(calls: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as a client sends them back: OpenAI's shape or 400 naming the field."""
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("arguments", "{}"), str | dict) or c.get("type", "function") != "function":
            raise APIError(400, "a tool call must be {\"id\", \"type\": \"function\", \"function\": {\"name\", "
                           "\"arguments\"}}", f"{param}[{j}]", "invalid_value")
        extra = set(c) - {"id", "type", "function", "index"}
        if extra:
            raise APIError(400, f"unknown tool call field {sorted(extra)[0]!r}", f"{param}[{j}].{sorted(extra)[0]}",
                           "unsupported_parameter")
        out.append({"id": c.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn.get("arguments", "{}")}})
    return out


def harmony_stop_ids(tokenizer: Any, requested: list[int] | None = None) -> list[int]:
    """The request's stop_token_ids and harmony's stop tokens (`<|return|>`, `<|call|>`) in `tokenizer`: a gpt-oss
    checkpoint names only `<|return|>` as EOS (its generation_config adds `<|call|>`), and a reply must end at
    its tool call rather than go on to write the tool's answer itself."""
    lookup = getattr(tokenizer, "token_to_id", None)
    ids = [lookup(t) for t in HARMONY_STOP] if lookup is not None else []
    return list(dict.fromkeys([*(requested or []), *(i for i in ids if isinstance(i, int) and i >= 0)]))


def tool_plan(served: Any, body: Any) -> ToolPlan:
    """The request's ToolPlan, from its tools, tool_choice and the served chat template."""
    template = getattr(served.renderer, "template", None)
    get = getattr(served.tokenizer, "get_chat_template", None)
    if template is None and get is not None:
        try:
            template = get(tools=body.tools)
        except ValueError:  # no chat template: the request fails when it renders
            template = None
    plan = ToolPlan(body.tools, body.tool_choice, template, body.parallel_tool_calls)
    if plan.style == "harmony":
        plan.stop_token_ids = harmony_stop_ids(served.tokenizer, getattr(body, "stop_token_ids", None))
    if plan.mode in ("required", "named") and structured_kwargs(body):
        raise APIError(400, "response_format (or a guided_* field) cannot be combined with a required or named "
                       "tool_choice: the call's own schema constrains the reply", "response_format", "invalid_value")
    if body.parallel_tool_calls is not None and not plan.tools:
        raise APIError(400, "parallel_tool_calls needs tools", "parallel_tool_calls", "invalid_value")
    return plan


def reply_message(plan: ToolPlan, text: str, reason: str | None) -> tuple[Any, str | None]:
    """A finished choice's AssistantMessage and finish_reason."""
    from giants.serve.protocol import AssistantMessage

    if not plan.active:
        return AssistantMessage(content=text), reason
    p = plan.parse(text, True)
    calls = [c.to_openai() for c in p.tool_calls]
    return (AssistantMessage(content=p.content, reasoning_content=p.reasoning, tool_calls=calls or None),
            finish_reason(reason, bool(calls)))
