"""Structured output's request fields: OpenAI's response_format (json_object, json_schema) and vLLM's guided_json /
guided_regex / guided_choice / guided_grammar / structured_outputs, turned into SamplingParams keywords after the
grammar engine has compiled them (a 400 naming the field for a shape it rejects)."""

from __future__ import annotations

from typing import Any

from giants.serve.errors import APIError


def check_grammar(kind: str, spec: Any, param: str) -> None:
    from giants.inference.guided import _compile

    try:
        _compile(kind, spec, param)
    except ValueError as e:
        msg = str(e)
        raise APIError(400, msg if msg.startswith(param) else f"{param}: {msg}", param, "invalid_value") from None


def structured_kwargs(body: Any) -> dict[str, Any]:
    """SamplingParams keyword arguments for response_format, guided_json/regex/choice/grammar and
    structured_outputs (at most one of them); 400 naming the field for a shape the grammar engine rejects."""
    given = {name: getattr(body, name, None) for name in ("response_format", "guided_json", "guided_regex",
                                                          "guided_choice", "guided_grammar", "structured_outputs")}
    rf = given["response_format"]
    if rf is not None and rf.get("type", "text") == "text" and set(rf) <= {"type"}:
        given["response_format"] = None
    set_ = [k for k, v in given.items() if v is not None]
    if not set_:
        return {}
    if len(set_) > 1:
        raise APIError(400, f"only one structured-output constraint per request (got {', '.join(set_)})", set_[1],
                       "invalid_value")
    name = set_[0]
    value = given[name]
    if name == "response_format":
        kind = value.get("type")
        if kind == "json_object":
            if set(value) - {"type"}:
                raise APIError(400, f"response_format: unexpected keys {sorted(set(value) - {'type'})}",
                               "response_format", "invalid_value")
            check_grammar("json_object", True, "response_format")
            return {"guided_decoding": {"json_object": True}}
        if kind == "json_schema":
            js = value.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("name"), str):
                raise APIError(400, "response_format.json_schema must be an object with a name (and a schema)",
                               "response_format.json_schema", "invalid_value")
            unknown = set(js) - {"name", "schema", "strict", "description"}
            if unknown or set(value) - {"type", "json_schema"}:
                bad = sorted(unknown) or sorted(set(value) - {"type", "json_schema"})
                raise APIError(400, f"response_format: unsupported keys {bad}", "response_format", "invalid_value")
            schema = js.get("schema", {"type": "object"})  # OpenAI: no schema means any JSON object
            check_grammar("json", schema, "response_format.json_schema.schema")
            return {"guided_json": schema}
        raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object or json_schema)",
                       "response_format.type", "unsupported_parameter")
    if name == "structured_outputs":
        if not isinstance(value, dict):
            raise APIError(400, "structured_outputs must be an object", name, "invalid_value")
        from giants.inference.guided import GuidedDecodingParams

        try:
            GuidedDecodingParams(**value)
        except (TypeError, ValueError) as e:
            raise APIError(400, f"structured_outputs: {e}", name, "invalid_value") from None
        kind, spec = next((k, v) for k, v in value.items() if v not in (None, False))
        check_grammar(kind, spec, f"structured_outputs.{kind}")
        return {"guided_decoding": value}
    check_grammar(name.removeprefix("guided_"), value, name)
    return {name: value}
