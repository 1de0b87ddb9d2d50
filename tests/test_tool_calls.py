"""Tool calling (giants.serve.tools): the parsers on each family's shapes, gpt-oss's harmony channels, and a
tool-call round trip through a real `giants serve smollm2-135m` with the official client, streaming and not."""

from __future__ import annotations

import json

import openai
import pytest

from giants.serve.errors import APIError
from giants.serve.tools import ChoiceStream, ToolPlan, parse_auto, parse_harmony, template_style

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}
HARMONY_TEMPLATE = "...<|start|>assistant<|channel|>analysis<|message|>... {{ tools }}"  # the style marker only
# What gpt-oss's official chat template renders for an assistant turn (its lines:
#   "<|start|>assistant<|channel|>analysis<|message|>" + thinking + "<|end|>"
#   "<|start|>assistant to=functions." + name + "<|channel|>commentary json<|message|>" + args|tojson + "<|call|>"
#   "<|start|>assistant<|channel|>final<|message|>" + content + "<|return|>" (training only; <|end|> in history))
# and what the model writes after the generation prompt "<|start|>assistant" (the stop token not in the text).
HARMONY_CALL = ('<|channel|>analysis<|message|>User asks weather; call the tool.<|end|><|start|>assistant'
                '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                '{"city":"Paris","unit":"C"}')
HARMONY_CALL_TEMPLATE_ORDER = ('<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.'
                               'get_weather<|channel|>commentary json<|message|>{"city": "Oslo", "unit": "F"}')
HARMONY_ANSWER = ('<|channel|>analysis<|message|>It is sunny.<|end|><|start|>assistant<|channel|>final<|message|>'
                  'Sunny, 21 C in Paris.')


def test_harmony_channels():
    p = parse_harmony(HARMONY_CALL)
    assert p.reasoning == "User asks weather; call the tool." and p.content is None
    assert [(c.name, json.loads(c.arguments)) for c in p.tool_calls] == [("get_weather",
                                                                         {"city": "Paris", "unit": "C"})]
    p = parse_harmony(HARMONY_CALL_TEMPLATE_ORDER)
    assert [(c.name, json.loads(c.arguments)) for c in p.tool_calls] == [("get_weather", {"city": "Oslo", "unit": "F"})]
    p = parse_harmony(HARMONY_ANSWER)
    assert (p.reasoning, p.content, p.tool_calls) == ("It is sunny.", "Sunny, 21 C in Paris.", [])
    # a reply cut off inside the analysis channel: reasoning only, nothing leaks into content
    p = parse_harmony("<|channel|>analysis<|message|>Thinking about")
    assert (p.reasoning, p.content) == ("Thinking about", None)


def test_harmony_stream_keeps_reasoning_out_of_content():
    plan = ToolPlan([WEATHER], "auto", HARMONY_TEMPLATE)
    assert plan.style == "harmony" and plan.sampling_kwargs() == {"skip_special_tokens": False}
    s = ChoiceStream(plan)
    # the text as the detokenizer streams it: special tokens arrive whole
    pieces = ["<|channel|>", "analysis", "<|message|>", "User asks", " weather; call the tool.", "<|end|>",
              "<|start|>", "assistant", "<|channel|>", "commentary to", "=functions.get_weather <|constrain|>",
              "json", "<|message|>", '{"city":', '"Paris","unit":"C"}']
    deltas = [s.feed(p, k == len(pieces) - 1) for k, p in enumerate(pieces)]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == "User asks weather; call the tool." and not any("content" in d for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris", "unit": "C"}
    grammar = ToolPlan([WEATHER], "required", HARMONY_TEMPLATE).sampling_kwargs()["guided_grammar"]
    assert "commentary to=functions.get_weather" in grammar and "%json" in grammar


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}\n</tool_call>', None,
     [("get_weather", {"city": "Rome", "unit": "C"})]),
    ('Let me check.\n<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}</tool_call>', "Let me check.",
     [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Oslo", "unit": "F"})]),
    ('{"name": "get_time", "parameters": {"tz": "CET"}}', None, [("get_time", {"tz": "CET"})]),  # Llama 3.1
    ('<|python_tag|>{"name": "get_time", "parameters": {"tz": "CET"}}', None, [("get_time", {"tz": "CET"})]),
    ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "UTC"}}]', None, [("get_time", {"tz": "UTC"})]),
    ("Plain answer {not json", "Plain answer {not json", []),
    ('<tool_call>{"name": broken</tool_call>', '<tool_call>{"name": broken</tool_call>', []),
])
def test_auto_parsers(text, content, calls):
    p = parse_auto(text)
    assert p.content == content
    assert [(c.name, json.loads(c.arguments)) for c in p.tool_calls] == calls


def test_auto_stream_holds_back_a_marker():
    s = ChoiceStream(ToolPlan([TIME], "auto", None))
    out = [s.feed(t, False) for t in ["Let me", " check.<tool", "_call>{\"name\": \"get_time\", ",
                                      "\"arguments\": {\"tz\": \"UTC\"}}</tool_call>"]]
    out.append(s.feed("", True))
    assert "".join(d.get("content", "") for d in out) == "Let me check."
    calls = [c for d in out for c in d.get("tool_calls", [])]
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"tz": "UTC"}


def test_template_styles_and_plan_errors():
    assert template_style(None) == "none" and template_style("{{ messages }}") == "none"
    assert template_style("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert template_style("{% for t in tools %}{{ t | tojson }}{% endfor %} ipython") == "llama"
    assert template_style("{% if tools %}[AVAILABLE_TOOLS]{% endif %}") == "mistral"
    with pytest.raises(APIError) as e:
        ToolPlan([WEATHER], {"type": "function", "function": {"name": "nope"}}, None)
    assert e.value.param == "tool_choice"
    with pytest.raises(APIError) as e:
        ToolPlan([{"type": "function", "function": {"name": "bad name!"}}], "auto", None)
    assert e.value.param == "tools[0].function.name"
    with pytest.raises(APIError) as e:
        ToolPlan(None, "required", None)
    assert e.value.param == "tool_choice"


# ---- the server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(smollm2_server):
    return smollm2_server


def _round_trip(client, stream: bool, tool_choice) -> None:
    msgs = [{"role": "user", "content": "What is the weather in Paris, in Celsius?"}]
    kw = dict(model=MODEL, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=40, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
        calls = [c for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish == ["tool_calls"]
        call_id, name = calls[0].id, calls[0].function.name
        arguments = "".join(c.function.arguments or "" for c in calls)
        assistant = {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}
    else:
        r = client.chat.completions.create(messages=msgs, **kw)
        assert r.choices[0].finish_reason == "tool_calls"
        call = r.choices[0].message.tool_calls[0]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
        assistant = r.choices[0].message  # the client's own object, sent back as is
    assert name == "get_weather" and call_id.startswith("call_")
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F")
    msgs += [assistant, {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temperature": 21})}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, TIME], tool_choice="none",
                                       max_tokens=24, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_round_trip_named_function(client):
    _round_trip(client, False, {"type": "function", "function": {"name": "get_weather"}})


def test_round_trip_required_streaming(client):
    _round_trip(client, True, "required")


def test_named_function_streams_its_arguments(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER], max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    calls = [c for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
    assert len(calls) > 2 and calls[0].id and all(c.index == 0 for c in calls)  # arguments arrive in pieces
    assert set(json.loads("".join(c.function.arguments or "" for c in calls))) == {"city", "unit"}


def test_auto_returns_content_or_parsed_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}],
                                       tools=[WEATHER], max_tokens=48, temperature=0)
    m = r.choices[0].message
    assert m.content or m.tool_calls
    for c in m.tool_calls or []:
        json.loads(c.function.arguments)


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_requests_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       **kwargs)
    assert e.value.body["param"] == param, e.value.body
