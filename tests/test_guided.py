"""Structured output (giants.inference.guided, llguidance): SamplingParams' guided_* fields in the engine, and
response_format / guided_* through a real `giants serve smollm2-135m` driven by the official client."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re

import jsonschema
import openai
import pytest

from giants.inference import SamplingParams
from giants.inference.guided import GuidedDecodingParams

MODEL = "smollm2-135m"
# strict: nested objects, enums, arrays; strings and arrays bounded so every sample closes within max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a user of a web site as JSON."}]


def test_sampling_params_name_the_bad_field():
    with pytest.raises(ValueError, match=r"(?s)SamplingParams.guided_regex: .*unclosed group"):
        SamplingParams(guided_regex="((")
    with pytest.raises(ValueError, match=r"SamplingParams.guided_json: .*Invalid type"):
        SamplingParams(guided_json={"type": "foo"})
    with pytest.raises(ValueError, match=r"SamplingParams.guided_json: only one"):
        SamplingParams(guided_json=SCHEMA, guided_choice=["a"])
    with pytest.raises(ValueError, match=r"guided_choice: must be a non-empty list"):
        SamplingParams(guided_choice=[])
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecodingParams(json=SCHEMA, regex="a")
    sp = SamplingParams(structured_outputs=GuidedDecodingParams(choice=["x", "y"]))
    assert sp.grammar is not None and sp.guided_field == "guided_decoding"
    assert SamplingParams().grammar is None


@pytest.fixture(scope="module")
def smol():
    from giants import LLM

    # 160 blocks: the test's 5 sequences each at max_model_len (no preemption possible, as with the CPU's 1 GiB
    # default, which took seconds to zero-fill)
    return LLM(MODEL, max_model_len=512, num_blocks=5 * 512 // 16)


def test_engine_constraints_and_a_shared_batch(smol):
    """Constrained and free sequences in one batch; each constraint holds, EOS only where the grammar accepts."""
    q = [[{"role": "user", "content": "Capital of France?"}]]
    params = [SamplingParams(temperature=1.0, max_tokens=80, guided_json=SCHEMA, seed=3),
              SamplingParams(temperature=1.0, max_tokens=12, guided_regex=r"[0-9]{3}-[a-z]{2}", seed=1),
              SamplingParams(temperature=1.0, max_tokens=12, guided_choice=["Paris", "London", "Rome"], seed=2),
              SamplingParams(temperature=0, max_tokens=12, guided_grammar='start: "yes" | "no" " way"'),
              SamplingParams(temperature=0, max_tokens=12)]
    outs = smol.chat(q * len(params), params)
    jsonschema.validate(json.loads(outs[0].outputs[0].text), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[1].outputs[0].text)
    assert outs[2].outputs[0].text in ("Paris", "London", "Rome")
    assert outs[3].outputs[0].text in ("yes", "no way")
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[:4])
    alone = smol.chat(q, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert outs[4].outputs[0].text == alone  # the free row is unaffected by its constrained neighbours


def test_guided_survives_preemption_and_prefix_caching():
    """A cache too small for the batch preempts sequences mid-JSON (recomputed from their tokens, prefix-cache
    hits included); each one's grammar state is kept and every output still validates."""
    from giants import LLM

    llm = LLM(MODEL, max_model_len=256, num_blocks=10, block_size=16)
    prompt = "Write a user record as JSON: " * 2
    outs = llm.generate([prompt] * 4, SamplingParams(temperature=1.0, max_tokens=70, guided_json=SCHEMA, seed=5))
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0, stats
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


# ---- the server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(smollm2_server):
    return smollm2_server


def _strict(i: int):
    return {"type": "json_schema", "json_schema": {"name": f"user{i}", "schema": SCHEMA, "strict": True}}


def test_strict_json_schema_validates_100_of_100(client):
    def one(i: int) -> str:
        r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, max_tokens=90, seed=i,
                                           response_format=_strict(i))
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        return r.choices[0].message.content

    with cf.ThreadPoolExecutor(100) as pool:  # concurrent: the 100 sequences share engine steps
        texts = list(pool.map(one, range(100)))
    for t in texts:
        jsonschema.validate(json.loads(t), SCHEMA)
    assert len(set(texts)) > 50  # sampled at temperature 1, not one answer repeated


def test_streamed_json_object_and_completions(client):
    chunks = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, stream=True, seed=0,
                                            response_format={"type": "json_object"})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    r = client.completions.create(model=MODEL, prompt="A user record: ", max_tokens=90, seed=1,
                                  extra_body={"response_format": _strict(0)})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_regex_and_choice(client):
    r = client.completions.create(model=MODEL, prompt="Phone: ", max_tokens=20, n=4, seed=2,
                                  extra_body={"guided_regex": r"\+[0-9]{2} [0-9]{3}-[0-9]{4}"})
    assert all(re.fullmatch(r"\+[0-9]{2} [0-9]{3}-[0-9]{4}", c.text) for c in r.choices), r.choices
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       max_tokens=5, n=4, extra_body={"guided_choice": ["yes", "no"]})
    assert {c.message.content for c in r.choices} <= {"yes", "no"}
    assert all(c.finish_reason == "stop" for c in r.choices)
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8,
                                       extra_body={"structured_outputs": {"choice": ["ok"]}})
    assert r.choices[0].message.content == "ok"


@pytest.mark.parametrize("kwargs,param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format.json_schema"),
    ({"extra_body": {"guided_regex": "(("}}, "guided_regex"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    ({"extra_body": {"guided_json": SCHEMA, "guided_regex": "a"}}, "guided_regex"),
    ({"extra_body": {"structured_outputs": {"json": SCHEMA, "regex": "a"}}}, "structured_outputs"),
])
def test_unsupported_shapes_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)
    assert e.value.body["param"] == param, e.value.body
