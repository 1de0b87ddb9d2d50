"""`giants serve` over HTTP, driven by the official `openai` client against a real server process
(tiny-llama, random weights from seed 0) on a free loopback port.

Outputs are checked against the same engine run in this process on the same weights, so every test
proves the server passes requests through faithfully (template, sampling fields, stops, n, seeds)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from giants.serve.launch import ServerProcess

KEY = "sk-giants-test-key"
MAX_LEN = 256
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("tiny-llama", "--max-model-len", str(MAX_LEN), "--max-body-bytes", str(MAX_BODY),
                        "--log-level", "warning", api_key=KEY)
    srv.start(wait=False)
    # While the model loads the port is already open and answers 503 "loading".
    first = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and first is None:
        try:
            first = srv.health()
        except OSError:
            time.sleep(0.05)
    srv.first_health = first
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref():
    """The engine the server runs, built here from the same preset and seed."""
    import giants
    from giants.inference.engine import Engine
    from giants.inference.llm import random_model

    tok = giants.load_tokenizer("smollm2-135m")
    model = random_model("tiny-llama", torch.device("cpu"), torch.float32, seed=0)
    return Ref(Engine(model, tok, max_model_len=MAX_LEN, seed=0), tok)


class Ref:
    def __init__(self, engine, tok):
        self.engine, self.tok, self.n = engine, tok, 0

    def run(self, ids: list[int], **kw):
        from giants.inference import SamplingParams

        self.n += 1
        rid = f"ref-{self.n}"
        self.engine.add_request(rid, ids, SamplingParams(**kw))
        final = None
        while self.engine.has_unfinished_requests():
            for r in self.engine.step():
                if r.request_id == rid and r.finished:
                    final = r
        return final.outputs

    def chat_ids(self, messages):
        return self.tok.encode(self.tok.apply_chat_template(messages, add_generation_prompt=True),
                               add_special_tokens=False)


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- basics -------------------------------------------------------------------------------------------


def test_health_models_and_loading_state(server, client):
    assert server.first_health is not None
    status, body = server.first_health
    assert status in (200, 503)
    if status == 503:
        assert body["error"]["code"] == "loading"
    assert server.health() == (200, {"status": "ok", "model": "tiny-llama", "in_flight": 0})
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"


def test_completion_equals_engine(client, ref):
    prompt = "The quick brown fox"
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0)
    ids = ref.tok.encode(prompt)
    want = ref.run(ids, temperature=0, max_tokens=12)[0]
    assert r.object == "text_completion" and r.model == "tiny-llama"
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == len(ids) + len(want.token_ids)


def test_completion_stream_equals_non_stream(client):
    kw = dict(model="tiny-llama", prompt="Once upon a time", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("path,extra,obj", [("/completions", {"prompt": "Hi"}, "text_completion"),
                                             ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]},
                                              "chat.completion.chunk")])
@pytest.mark.parametrize("usage", [False, True])
def test_sse_framing_ends_with_done(server, path, extra, obj, usage):
    body = {"model": "tiny-llama", "max_tokens": 5, "temperature": 0, "stream": True, **extra}
    if usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.base_url + path, json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert len(chunks) >= 2 and all(c["object"] == obj for c in chunks)
    if usage:  # usage: null on every chunk but the last, which has no choices and the counts
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
        assert chunks[-1]["usage"]["total_tokens"] == (chunks[-1]["usage"]["prompt_tokens"]
                                                       + chunks[-1]["usage"]["completion_tokens"])
    else:
        assert all("usage" not in c for c in chunks)


def test_chat_applies_template(client, ref):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0)
    ids = ref.chat_ids(messages)
    assert "<|im_start|>" in ref.tok.apply_chat_template(messages)  # the rendered ChatML turns
    want = ref.run(ids, temperature=0, max_tokens=10)[0]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want.token_ids)


def test_chat_stream(client):
    kw = dict(model="tiny-llama", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=14,
              temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_developer_role_and_content_parts(client, ref):
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello"}]
    r = client.chat.completions.create(model="tiny-llama", messages=[{"role": "developer", "content": "Be kind."},
                                                                     {"role": "user", "content": parts}],
                                       max_tokens=4, temperature=0)
    ids = ref.chat_ids([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hello"}])
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == ref.run(ids, temperature=0, max_tokens=4)[0].text


# --- sampling fields ----------------------------------------------------------------------------------


def test_stop_strings_cut_text_across_tokens(client):
    kw = dict(model="tiny-llama", prompt="Stop me if you can", temperature=0, max_tokens=24)
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 20
    # a stop string that starts inside one token and ends inside a later one
    stop = full[len(full) // 2 - 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    r = client.completions.create(**kw, stop=[stop, "never-appears-xyz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == cut
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "go"}],
                                          temperature=0, max_tokens=24)
    text = chat.choices[0].message.content
    stop = text[5:9]
    r = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "go"}],
                                       temperature=0, max_tokens=24, stop=stop)
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_max_tokens(client):
    for m in (1, 7):
        r = client.completions.create(model="tiny-llama", prompt="Count:", max_tokens=m, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == m and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n_choices_and_usage(client):
    r = client.completions.create(model="tiny-llama", prompt="Pick a word:", max_tokens=6, n=3, temperature=1.0,
                                  seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # three samples, not one copied
    s = list(client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, n=2, temperature=1.0, seed=5, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in s:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    whole = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=6, n=2, temperature=1.0, seed=5)
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert s[-1].usage.completion_tokens == whole.usage.completion_tokens <= 12


def test_batched_prompts(client, ref):
    r = client.completions.create(model="tiny-llama", prompt=["first prompt", "second one here"], max_tokens=5,
                                  n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(["first prompt", "second one here"]):
        want = ref.run(ref.tok.encode(p), temperature=0, max_tokens=5)[0].text
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == want
    assert r.usage.prompt_tokens == len(ref.tok.encode("first prompt")) + len(ref.tok.encode("second one here"))
    ids = ref.tok.encode("token ids in")
    r2 = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=5, temperature=0)
    assert r2.choices[0].text == ref.run(ids, temperature=0, max_tokens=5)[0].text


def test_seed_reproducible(client):
    kw = dict(model="tiny-llama", prompt="Random words:", max_tokens=10, temperature=1.0)
    a = client.completions.create(**kw, seed=1234).choices[0].text
    b = client.completions.create(**kw, seed=1234).choices[0].text
    c = client.completions.create(**kw, seed=4321).choices[0].text
    assert a == b and a != c
    msgs = [{"role": "user", "content": "hello"}]
    x = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, temperature=0.9, seed=3)
    y = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, temperature=0.9, seed=3)
    assert x.choices[0].message.content == y.choices[0].message.content


def test_sampling_fields_reach_the_engine(client, ref):
    fields = dict(temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=7)
    extra = dict(top_k=40, min_p=0.01, repetition_penalty=1.2)
    prompt = "Sampling check"
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, extra_body=extra, **fields)
    want = ref.run(ref.tok.encode(prompt), max_tokens=12, **fields, **extra)[0]
    assert r.choices[0].text == want.text
    # top_k=1 (and min_p=1) leave only the argmax: sampling at temperature 1 must give the greedy text
    greedy = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=1.0, seed=99,
                                      extra_body=extra)
        assert r.choices[0].text == greedy.choices[0].text


@pytest.mark.parametrize("fields", [{"presence_penalty": -2.0}, {"frequency_penalty": -2.0},
                                    {"presence_penalty": -2.0, "frequency_penalty": 0.5},
                                    {"repetition_penalty": 0.5}, {"temperature": 0.3, "seed": 7}])
def test_penalties_and_temperature_reach_the_engine(client, ref, fields):
    """Each field alone changes the answer (a random model never repeats a token under greedy, so positive
    penalties would change nothing: negative ones and repetition_penalty < 1 make it repeat), and the server
    gives exactly what the engine gives with that field: dropping or swapping any of them fails here."""
    prompt = "Penalty check"
    ids = ref.tok.encode(prompt)
    base = dict(max_tokens=12, temperature=0, ignore_eos=True)
    kw = {**base, **fields}
    if "seed" in fields:  # the reference for a sampled temperature is the same seed at the default temperature
        base = {**base, "temperature": 1.0, "seed": fields["seed"]}
    without = ref.run(ids, **base)[0].text
    want = ref.run(ids, **kw)[0].text
    assert want != without
    extra = {k: kw.pop(k) for k in ("repetition_penalty", "ignore_eos") if k in kw}
    r = client.completions.create(model="tiny-llama", prompt=prompt, extra_body=extra, **kw)
    assert r.choices[0].text == want


def test_logprobs(client):
    r = client.completions.create(model="tiny-llama", prompt="Log probs", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == r.usage.completion_tokens == 6
    for _tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    c = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert "".join(t.token for t in content) == c.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    plain = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None
    # streamed: the same tokens and values, split over the chunks, offsets continuing across them
    chunks = [c.choices[0] for c in client.completions.create(model="tiny-llama", prompt="Log probs", max_tokens=6,
                                                               temperature=0, logprobs=3, stream=True) if c.choices]
    slp = [ch.logprobs for ch in chunks if ch.logprobs is not None]
    assert [t for x in slp for t in x.tokens] == lp.tokens
    assert [v for x in slp for v in x.token_logprobs] == pytest.approx(lp.token_logprobs)
    assert [o for x in slp for o in x.text_offset] == lp.text_offset
    sc = [c.choices[0] for c in client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2, stream=True) if c.choices and c.choices[0].logprobs is not None]
    streamed = [t for ch in sc for t in ch.logprobs.content]
    assert [(t.token, len(t.top_logprobs)) for t in streamed] == [(t.token, 2) for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content])


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("temperature", 3.0), ("top_p", 0.0), ("n", 0), ("max_tokens", 0),
                                         ("presence_penalty", 9.0), ("logprobs", 50)])
def test_invalid_field_400_names_it(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="x", **{field: value})
    err = _error(e.value)
    assert err["param"] == field and field in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra,param", [({"top_k": -5}, "top_k"), ({"min_p": 2.0}, "min_p"),
                                         ({"repetition_penalty": -1.0}, "repetition_penalty"),
                                         ({"suffix": "tail"}, "suffix"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                                         ({"stop": ""}, "stop")])
def test_invalid_extension_fields(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=2, extra_body=extra)
    assert _error(e.value)["param"] == param


def test_invalid_chat_bodies(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "wizard", "content": "x"}])
    assert _error(e.value)["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[])
    assert _error(e.value)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function"}])  # no function: tests/test_tool_calls.py
    assert _error(e.value)["param"] == "tools[0]"
    r = httpx.post(server.base_url + "/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.base_url + "/completions", json={"model": "tiny-llama"},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.base_url + "/completions", json={"prompt": [1, 2, 10 ** 6]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "vocabulary" in r.json()["error"][
        "message"]


def test_auth_401(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert _error(e.value)["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer " + KEY[:-1]}):
        r = httpx.post(server.base_url + "/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # health and metrics stay open for probes and scrapers
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="x")
    err = _error(e.value)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4o" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_prompt_longer_than_context_400(client, ref):
    long = "word " * 400
    assert len(ref.tok.encode(long)) > MAX_LEN
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt=long, max_tokens=4)
    err = _error(e.value)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt" and str(MAX_LEN) in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": long}])
    assert _error(e.value)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # fits, but not with the completion asked for
        client.completions.create(model="tiny-llama", prompt="short", max_tokens=MAX_LEN)
    assert _error(e.value)["param"] == "max_tokens"


def test_body_too_large_413(server, client):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny-llama", prompt="x" * (MAX_BODY + 10))
    assert e.value.status_code == 413 and _error(e.value)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(MAX_BODY // 1024 + 8):
            yield b" " * 1024

    r = httpx.post(server.base_url + "/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_failing_request_does_not_affect_others(ref):
    """Requests that fail, before the engine (bad ids, bad temperature: 400) and INSIDE an engine step (a
    sampler that raises on one request's row: that request alone ends with a 500 engine_error), beside
    well-formed requests and a stream in the same batch, which finish with the text they have alone. In
    process (TestClient, the app, the bridge and an engine over the same weights), where a sampling failure
    can be made to happen: the server refuses every request it knows would fail the sampler."""
    import concurrent.futures as cf

    from fastapi.testclient import TestClient

    from giants.inference.engine import Engine
    from giants.serve.app import Loaded, create_app

    engine = Engine(ref.engine.model, ref.tok, max_model_len=MAX_LEN, seed=0)
    launch, step = engine.sampler.launch, engine.step

    def failing_launch(logits, rows):
        if any(r.params.seed == 666 for r in rows):
            raise RuntimeError("sampler exploded")
        return launch(logits, rows)

    def slow_step():  # the requests below overlap for certain
        time.sleep(0.01)
        return step()

    engine.sampler.launch, engine.step = failing_launch, slow_step
    app = create_app(lambda: Loaded(engine, ref.tok, MAX_LEN, engine.max_num_seqs, engine.cfg.vocab_size),
                     "tiny-llama")
    kw = dict(model="tiny-llama", prompt="Steady", max_tokens=24, temperature=0, ignore_eos=True)
    with TestClient(app) as c:
        while c.get("/health").status_code != 200:
            time.sleep(0.01)
        alone = c.post("/v1/completions", json=kw).json()["choices"][0]["text"]

        def good():
            return c.post("/v1/completions", json=kw).json()["choices"][0]["text"]

        def stream():
            r = c.post("/v1/completions", json={**kw, "stream": True})
            events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
            assert not [e for e in events if "error" in e], events
            return "".join(ch["text"] for e in events for ch in e["choices"])

        def in_engine(i):  # fails inside the step: 500 alone (a stream: its error event, then [DONE])
            r = c.post("/v1/completions", json={**kw, "seed": 666, "temperature": 1.0, "stream": bool(i % 2)})
            if i % 2:
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
                err = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")][-1]["error"]
            else:
                assert r.status_code == 500
                err = r.json()["error"]
            assert err["code"] == "engine_error" and "sampler exploded" in err["message"], err
            return "failed"

        def refused(i):  # refused before the engine
            r = c.post("/v1/completions", json={**kw, "prompt": [0, 10 ** 7]} if i % 2 else {**kw, "temperature": -1})
            assert r.status_code == 400
            return "failed"

        with cf.ThreadPoolExecutor(8) as ex:
            goods = [ex.submit(good) for _ in range(3)] + [ex.submit(stream) for _ in range(2)]
            time.sleep(0.1)
            bads = [ex.submit(in_engine, i) for i in range(4)] + [ex.submit(refused, i) for i in range(2)]
            assert [f.result() for f in goods] == [alone] * 5
            assert [f.result() for f in bads] == ["failed"] * 6
        assert c.get("/health").json()["in_flight"] == 0
    assert engine.stats()["kv_blocks_used"] == 0


def test_metrics_exposed(server, client):
    client.completions.create(model="tiny-llama", prompt="metrics", max_tokens=3, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-llama", prompt="metrics", temperature=-1)
    assert httpx.post(server.base_url + "/completions", json={"prompt": "x"}).status_code == 401
    m = server.metrics()
    for name in ("giants_prompt_tokens_total", "giants_generation_tokens_total", "giants_queue_depth",
                 "giants_running_sequences", "giants_kv_blocks_used", "giants_kv_blocks_free",
                 "giants_time_to_first_token_seconds_count", "giants_inter_token_latency_seconds_count"):
        assert name in m, name
    assert m['giants_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert m['giants_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert m['giants_requests_total{endpoint="/v1/completions",status="401"}'] >= 1
    assert m["giants_generation_tokens_total"] >= 3 and m["giants_time_to_first_token_seconds_count"] >= 1
    assert m["giants_running_sequences"] == 0 and m["giants_kv_blocks_used"] == 0
