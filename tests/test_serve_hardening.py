"""Issue 26, hardening the server: each defect reproduced, then bounded.

1. numbers beyond what the engine takes (top_k >= 2^63, seed >= 2^64, ...) are 400 naming the field, and a
   request whose sampling fails inside a step fails alone while the batch goes on;
2. a temperature that underflows float32 samples greedily instead of token 0;
3. stop lists are bounded and matched at a per-token cost independent of their size;
4. prompts x n is bounded, the queue counts sequences, and a small request is admitted beside a large one;
5. lone UTF-16 surrogates are 400 naming the field, on a connection that stays usable;
6. partial requests and idle connections are timed out, connections are capped, repeated log lines dropped;
7. chat templates render in a worker within a time limit;
8. an empty API key is an error, and listening beyond loopback without one warns.

In process (Starlette's TestClient runs the app, the bridge and a real engine over tiny-llama with random
weights) except where the HTTP server itself is under test (a real `giants serve` on a loopback port). Plus
hypothesis over request bodies: every field at and beyond its bounds, beside a well-formed stream that must
finish unharmed. CI replays a fixed set of examples; `make fuzz` explores fresh ones for FUZZ_SECONDS.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import giants
from giants.inference import SamplingParams
from giants.inference.engine import Engine
from giants.serve.app import Loaded, create_app

MAX_LEN = 256
PROMPT = [1, 2, 3, 4, 5]
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "0") or 0)

settings.register_profile("giants-ci", max_examples=30, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("giants-fuzz", max_examples=50, derandomize=False, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = settings.get_profile("giants-fuzz" if FUZZ_SECONDS > 0 else "giants-ci")


def fuzz(test, each_pass=None):
    """CI: one pass over the profile's fixed examples. `make fuzz`: passes of fresh examples until FUZZ_SECONDS
    are up. each_pass(run_one_pass), if given, wraps every pass (a stream beside it)."""
    inner = settings(PROFILE)(test)

    def run(*args, **kwargs):
        deadline = time.monotonic() + FUZZ_SECONDS
        while True:
            if each_pass is None:
                inner(*args, **kwargs)
            else:
                each_pass(lambda: inner(*args, **kwargs))
            if time.monotonic() >= deadline:
                return

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


# ---- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return giants.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def model():
    from giants.inference.llm import random_model

    return random_model("tiny-llama", torch.device("cpu"), torch.float32, seed=0)


def make_engine(model, tok, *, delay: float = 0.0, **kw) -> Engine:
    kw = {"max_model_len": MAX_LEN, "num_blocks": 256, "seed": 0, **kw}
    engine = Engine(model, tok, **kw)
    if delay:
        step = engine.step

        def slow_step():
            time.sleep(delay)
            return step()

        engine.step = slow_step
    return engine


@contextmanager
def app_client(engine, tok, **kw):
    app = create_app(lambda: Loaded(engine, tok, MAX_LEN, engine.max_num_seqs, engine.cfg.vocab_size),
                     "tiny-llama", **kw)
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield c


@pytest.fixture(scope="module")
def client(model, tok):
    with app_client(make_engine(model, tok), tok) as c:
        yield c


def body(**kw) -> dict:
    return {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **kw}


def chat_body(content="hi", **kw) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **kw}


def in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["r"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def sse(raw: str) -> list[dict | str]:
    out = []
    for e in raw.split("\n\n"):
        if e.startswith("data: "):
            data = e[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_text(raw: str) -> str:
    events = sse(raw)
    assert events[-1] == "[DONE]", raw[-500:]
    errors = [e for e in events[:-1] if "error" in e]
    assert not errors, errors
    return "".join(ch["text"] for e in events[:-1] for ch in e["choices"])


def assert_400(r, param: str, code: str | None = "invalid_value"):
    assert r.status_code == 400, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- 1. numbers beyond the engine's range; a sampling failure fails its request alone --------------------


BEYOND = [  # (field, value) a client can send that the engine cannot take
    ("top_k", 2**63), ("top_k", 2**63 + 5), ("top_k", 2**31), ("top_k", -2), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("repetition_penalty", 1e-45), ("repetition_penalty", 1e300), ("repetition_penalty", 0), ("min_p", 1.5),
    ("min_p", -0.1), ("n", 129), ("n", 10**30), ("n", 0), ("temperature", 2.5), ("temperature", -1e-9),
    ("top_p", 0), ("top_p", 1.0000001), ("presence_penalty", 2.0001), ("frequency_penalty", -1e300),
    ("logprobs", 21), ("logprobs", 2**63), ("max_tokens", 0), ("stop_token_ids", [-1]),
]


@pytest.mark.parametrize("field,value", BEYOND)
def test_numbers_beyond_the_engine_range_are_400(client, field, value):
    err = assert_400(client.post("/v1/completions", json=body(**{field: value})), field, None)
    assert field in err["message"] and err["type"] == "invalid_request_error", err
    if field != "logprobs":  # chat's logprobs is a bool (top_logprobs has the same bound)
        assert_400(client.post("/v1/chat/completions", json=chat_body(**{field: value})), field, None)


AT_BOUND = [("top_k", 2**31 - 1), ("top_k", -1), ("top_k", 0), ("seed", 2**64 - 1), ("seed", -(2**63)),
            ("repetition_penalty", 0.01), ("repetition_penalty", 100), ("min_p", 1.0), ("temperature", 2.0),
            ("top_p", 5e-324), ("presence_penalty", -2.0), ("frequency_penalty", 2.0), ("logprobs", 20),
            ("stop_token_ids", [2**70])]


@pytest.mark.parametrize("field,value", AT_BOUND)
def test_numbers_at_the_bound_are_served(client, field, value):
    r = client.post("/v1/completions", json={**body(temperature=1.0, max_tokens=2), field: value})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("raw", ['"temperature": NaN', '"top_p": NaN', '"temperature": Infinity',
                                 '"min_p": NaN', '"repetition_penalty": Infinity', '"presence_penalty": -Infinity'])
def test_non_finite_numbers_are_400(client, raw):
    content = '{"prompt": [1, 2, 3], "max_tokens": 2, ' + raw + '}'
    r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_400(r, raw.split('"')[1], None)


def test_huge_top_k_beside_a_stream_fails_alone(model, tok):
    """The reported defect: top_k >= 2^63 in one request made the engine step raise, and every stream in the
    batch ended with a 500 engine_error."""
    with app_client(make_engine(model, tok, delay=0.01), tok) as c:
        good = body(max_tokens=40, ignore_eos=True)
        alone = c.post("/v1/completions", json=good).json()["choices"][0]["text"]
        t, box = in_thread(lambda: c.post("/v1/completions", json={**good, "stream": True}))
        time.sleep(0.2)
        bad = [c.post("/v1/completions", json=body(top_k=2**63 + i, temperature=1.0)) for i in range(3)]
        t.join(120)
        assert all(b.status_code == 400 and b.json()["error"]["param"] == "top_k" for b in bad)
        assert stream_text(box["r"].text) == alone


def test_a_sampling_failure_fails_its_request_alone(model, tok):
    """Inside the engine: a row whose sampling raises (here, a temperature no float holds, set after validation)
    finishes its request with an error; the other rows of the batch get their tokens."""
    engine = make_engine(model, tok)
    good = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True, n=2)
    bad = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, n=2)
    bad.temperature = 10**400  # past validation, as a library caller could
    alone = {}
    for rid, sp in (("good", good), ("seeded", seeded)):
        engine.add_request(rid, PROMPT, sp)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    alone[rid] = [c.token_ids for c in o.outputs]
    engine.add_request("good", PROMPT, good)
    engine.add_request("bad", [7, 8, 9], bad)
    engine.add_request("seeded", PROMPT, seeded)
    finals = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finals[o.request_id] = o
    assert finals["bad"].error and "OverflowError" in finals["bad"].error
    assert [c.finish_reason for c in finals["bad"].outputs] == ["error", "error"]
    for rid in ("good", "seeded"):
        assert finals[rid].error is None
        assert [c.token_ids for c in finals[rid].outputs] == alone[rid]
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_requests"] == 0


def test_a_failure_in_append_fails_its_request_alone(model, tok):
    """Past sampling, a sequence's own bookkeeping (its detokenizer here) failing ends its request only."""
    engine = make_engine(model, tok)
    engine.add_request("good", PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.add_request("bad", PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))

    def broken(token_id, **kw):
        raise RuntimeError("detokenizer broke")

    engine.requests["bad"].seqs[0].text.add = broken
    finals = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finals[o.request_id] = o
    assert "detokenizer broke" in finals["bad"].error
    assert finals["good"].error is None and len(finals["good"].outputs[0].token_ids) == 6


# ---- 2. temperature that underflows float32 ------------------------------------------------------------


@pytest.mark.parametrize("t", [1e-45, 1e-40, 1e-10, 9e-6])
def test_tiny_temperature_is_greedy(model, tok, client, t):
    from giants.inference.sampling import Sampler, SamplingRow

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 4
    rows = [SamplingRow(SamplingParams(temperature=t), [1], []) for _ in range(3)]
    toks = Sampler(torch.Generator().manual_seed(0))(logits, rows).tokens
    assert toks == logits.argmax(-1).tolist()  # not token 0
    greedy = client.post("/v1/completions", json=body(max_tokens=8, ignore_eos=True)).json()
    tiny = client.post("/v1/completions", json=body(max_tokens=8, ignore_eos=True, temperature=t)).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


# ---- 3. stop strings -----------------------------------------------------------------------------------


def test_stop_lists_are_bounded(client):
    from giants.serve import MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS

    assert (MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS) == (64, 1024, 64)
    err = assert_400(client.post("/v1/completions", json=body(stop=["x"] * 65)), "stop")
    assert "64" in err["message"]
    assert_400(client.post("/v1/completions", json=body(stop=["ok", "y" * 1025])), "stop[1]")
    assert_400(client.post("/v1/completions", json=body(stop="y" * 1025)), "stop")
    assert_400(client.post("/v1/chat/completions", json=chat_body(stop=["x"] * 65)), "stop")
    assert_400(client.post("/v1/completions", json=body(stop_token_ids=list(range(65)))), "stop_token_ids")
    at_bound = [f"{i:04d}" + "z" * 1020 for i in range(64)]
    r = client.post("/v1/completions", json=body(stop=at_bound, n=2, max_tokens=3))
    assert r.status_code == 200, r.text


def test_the_reported_stop_flood_is_refused_at_once(client):
    """The reported body: 200,000 stop strings (3.6 MB) with n=64 stalled the engine for ~64 s."""
    stops = [f"s{i:06d}x" for i in range(200_000)]
    t0 = time.monotonic()
    r = client.post("/v1/completions", json=body(stop=stops, n=64))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert time.monotonic() - t0 < 10


class _CharTokenizer:
    """Token i decodes to one letter: the detokenizer's cost is the stop matching's."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def _per_token(stops: list[str], tokens: int = 1500) -> float:
    from giants.inference.detokenize import IncrementalText

    best = float("inf")
    for _ in range(3):
        text = IncrementalText(_CharTokenizer(), [0], stops, True)
        t0 = time.perf_counter()
        for i in range(tokens):
            assert text.add(i * 7 % 26) is None
        best = min(best, (time.perf_counter() - t0) / tokens)
    return best


def test_stop_matching_cost_per_token_does_not_grow_with_the_list():
    one = _per_token(["Q" * 1024])
    many = _per_token(["Q" * 1000 + f"{i:024d}" for i in range(2000)] + ["abc" * 300])  # never in the text
    # The scan it replaces cost one str.find per stop string per token: 2000x here.
    assert many < 4 * one + 2e-5, (one, many)


def _naive_stop(text: str, stops: list[str]):
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


@fuzz
@given(stops=st.lists(st.text("abc", min_size=1, max_size=5), min_size=1, max_size=8),
       text=st.text("abcd", max_size=40), cuts=st.lists(st.integers(1, 4), min_size=40, max_size=40))
def test_fuzz_stop_matcher_equals_a_scan(stops, text, cuts):
    """Fed in chunks, the automaton stops where a full scan of the text so far finds the earliest stop."""
    from giants.inference.detokenize import StopMatcher

    m, state, pos = StopMatcher(stops), 0, 0
    for k in cuts:
        if pos >= len(text):
            break
        state, found = m.feed(state, text[pos:pos + k], pos)
        pos += k
        ref = _naive_stop(text[:pos], stops)
        if found is not None or ref is not None:
            assert found is not None and ref is not None and found[0] == ref[0], (found, ref)
            assert text[found[0]:].startswith(found[1])
            return
    assert _naive_stop(text, stops) is None


# ---- 4. fan-out ----------------------------------------------------------------------------------------


def test_prompts_times_n_is_bounded(client):
    from giants.serve import DEFAULT_MAX_SEQS_PER_REQUEST

    assert DEFAULT_MAX_SEQS_PER_REQUEST == 128
    err = assert_400(client.post("/v1/completions", json=body(prompt=[PROMPT] * 64, n=128)), "n")
    assert "8192" in err["message"] and "128" in err["message"]
    assert_400(client.post("/v1/completions", json=body(prompt=[PROMPT] * 3, n=43)), "n")
    assert client.post("/v1/completions", json=body(prompt=[PROMPT] * 4, n=2, max_tokens=1)).status_code == 200


def test_fan_out_limit_is_configurable(model, tok):
    with app_client(make_engine(model, tok), tok, max_seqs_per_request=4) as c:
        assert_400(c.post("/v1/completions", json=body(n=5)), "n")
        assert_400(c.post("/v1/chat/completions", json=chat_body(n=5)), "n")
        assert_400(c.post("/v1/completions", json=body(prompt=[PROMPT] * 3, n=2)), "n")
        assert c.post("/v1/completions", json=body(prompt=[PROMPT] * 2, n=2, max_tokens=1)).status_code == 200


def test_the_queue_counts_sequences(model, tok):
    engine = make_engine(model, tok, delay=0.02, max_num_seqs=2)
    with app_client(engine, tok, max_queue=2) as c:  # room for 4 sequences
        big = in_thread(lambda: c.post("/v1/completions", json=body(n=3, max_tokens=30, ignore_eos=True)))
        deadline = time.monotonic() + 30
        while c.get("/health").json()["in_flight"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        r = c.post("/v1/completions", json=body(n=2))  # 3 + 2 > 4 (by prompts it was 1 + 1)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        assert "4 sequences" in r.json()["error"]["message"]
        assert_400(c.post("/v1/completions", json=body(n=5)), "n")  # could never fit: not a 429
        assert c.post("/v1/completions", json=body(n=1)).status_code == 200
        big[0].join(60)
        assert big[1]["r"].status_code == 200
        assert c.post("/v1/completions", json=body(n=4, max_tokens=1)).status_code == 200


def _finish_steps(engine: Engine) -> dict[str, int]:
    done, step = {}, 0
    while engine.has_unfinished_requests():
        step += 1
        for o in engine.step():
            if o.finished:
                done.setdefault(o.request_id, step)
    return done


def test_a_small_request_is_not_starved_behind_a_large_one(model, tok):
    """The reported defect: 64 prompts x n=128 held the engine for minutes while a 4-token request waited.
    Admission is fair between groups (an HTTP request's prompts are one group): the small request joins at
    the next free slot instead of behind every waiting sequence of the large one."""
    engine = make_engine(model, tok, max_num_seqs=4)
    # one large request: n=32 sequences, 8 rounds of the 4-slot batch (an HTTP request's prompts: one group)
    engine.add_request("big", [10, 11, 12], SamplingParams(n=32, max_tokens=10, temperature=0, ignore_eos=True))
    engine.step()
    engine.add_request("small", PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    done = _finish_steps(engine)
    assert done["small"] <= 10 + 4 + 2, done  # FIFO by sequence: after ~8 rounds of 10 steps
    assert done["big"] > 4 * done["small"], done


def test_fair_admission_between_groups(model, tok):
    engine = make_engine(model, tok, max_num_seqs=4)
    sp = SamplingParams(n=8, max_tokens=10, temperature=0, ignore_eos=True)
    for i in range(4):  # 4 prompts x n=8 in one group: admitted as one request, not as four
        engine.add_request(f"big-{i}", [10 + i, 11, 12], sp, group="big")
    engine.step()
    engine.add_request("small", PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    done = _finish_steps(engine)
    assert done["small"] <= 10 + 4 + 2, done
    assert max(v for k, v in done.items() if k.startswith("big")) > 4 * done["small"], done


def test_fair_admission_keeps_arrival_order_for_single_sequences(model, tok):
    engine = make_engine(model, tok, max_num_seqs=2)
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"r{i}", [5 + i, 6, 7], sp)
    done = _finish_steps(engine)
    assert sorted(done, key=lambda k: (done[k], k)) == [f"r{i}" for i in range(6)]


def test_fair_admission_over_http(model, tok):
    engine = make_engine(model, tok, delay=0.01, max_num_seqs=2)
    with app_client(engine, tok, max_queue=64) as c:
        big = in_thread(lambda: c.post("/v1/completions",
                                       json=body(prompt=[PROMPT] * 4, n=4, max_tokens=12, ignore_eos=True)))
        deadline = time.monotonic() + 30
        while c.get("/health").json()["in_flight"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        t0 = time.monotonic()
        small = c.post("/v1/completions", json=body(max_tokens=2))
        small_took = time.monotonic() - t0
        assert small.status_code == 200
        assert big[0].is_alive(), "the large request should still be running"
        big[0].join(120)
        assert big[1]["r"].status_code == 200
        big_left = time.monotonic() - t0  # first-come first-served, the small one finished with the large one
        assert small_took < 0.5 * big_left, (small_took, big_left)


# ---- 5. lone surrogates --------------------------------------------------------------------------------


SURROGATE_BODIES = [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt[1]"),
    ("/v1/completions", '{"prompt": "ok", "stop": ["\\ud800"], "max_tokens": 2}', "stop[0]"),
    ("/v1/completions", '{"prompt": "ok", "user": "\\ud83d", "max_tokens": 2}', "user"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udc00"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}',
     "messages[0].name"),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}', "model"),
]


@pytest.mark.parametrize("path,raw,param", SURROGATE_BODIES)
def test_lone_surrogates_are_400_naming_the_field(client, path, raw, param):
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    err = assert_400(r, param)
    assert "surrogate" in err["message"]
    assert client.post("/v1/completions", json=body(prompt="a \U0001F600 b")).status_code == 200  # a real pair


# ---- the HTTP server itself ----------------------------------------------------------------------------


HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server():
    from giants.serve.launch import ServerProcess

    srv = ServerProcess("tiny-llama", "--max-model-len", str(MAX_LEN), "--log-level", "warning",
                        "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", "1", "--max-connections", "80")
    srv.start()
    yield srv
    assert srv.stop() == 0, srv.log()


def test_lone_surrogate_keeps_the_keep_alive_connection(server):
    """The reported defect: a 500 (TypeError in the tokenizer), and the kept-alive connection then failed the
    next request."""
    with httpx.Client(base_url=server.url, limits=httpx.Limits(max_connections=1), timeout=30) as c:
        ports = set()
        for raw, param in (('{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
                           ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content")):
            path = "/v1/completions" if "prompt" in raw else "/v1/chat/completions"
            r = c.post(path, content=raw.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            ports.add(r.extensions["network_stream"].get_extra_info("socket").getsockname()[1])
            ok = c.post("/v1/completions", json=body())
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
            ports.add(ok.extensions["network_stream"].get_extra_info("socket").getsockname()[1])
        assert len(ports) == 1  # one connection throughout


def _connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return s


def _closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Reads until the server closes the socket; (closed in time, what it sent)."""
    s.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def _health_within(server, seconds: float) -> float:
    t0 = time.monotonic()
    r = httpx.get(server.url + "/health", timeout=seconds)
    assert r.status_code == 200
    return time.monotonic() - t0


def test_partial_requests_are_timed_out_and_health_still_answers(server):
    socks = []
    try:
        for i in range(50):
            s = _connect(server)
            if i % 2:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")  # headers never finish
            socks.append(s)
        assert _health_within(server, 2.0) < 2.0
        t0 = time.monotonic()
        results = [_closed_within(s, HEADER_TIMEOUT + 5) for s in socks]
        assert all(closed for closed, _ in results)
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 5
        partial = [got for (closed, got), i in zip(results, range(50)) if i % 2]
        assert all(got.startswith(b"HTTP/1.1 408") for got in partial), partial[:2]
        assert all(got == b"" for (_, got), i in zip(results, range(50)) if not i % 2)  # never spoke: closed
    finally:
        for s in socks:
            s.close()
    assert _health_within(server, 2.0) < 2.0


def test_slow_headers_are_timed_out_even_while_trickling(server):
    """A byte every 50 ms keeps no timer alive: the headers' deadline counts from their first byte."""
    import select

    s = _connect(server)
    try:
        t0 = time.monotonic()
        for ch in (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 1000):
            if select.select([s], [], [], 0)[0] or time.monotonic() - t0 > HEADER_TIMEOUT + 3:
                break  # the server answered (408) and closed
            try:
                s.sendall(bytes([ch]))
            except OSError:  # closed between the check and the send
                break
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert HEADER_TIMEOUT * 0.8 < took < HEADER_TIMEOUT + 2, took
        closed, got = _closed_within(s, 3)
        assert closed and (got.startswith(b"HTTP/1.1 408") or got == b""), got
    finally:
        s.close()


def test_slow_body_gets_408_and_the_connection_closes(server):
    s = _connect(server)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 200\r\n\r\n{\"prompt\": ")
        closed, got = _closed_within(s, 5)
        assert closed and got.startswith(b"HTTP/1.1 408"), got
        assert b'"body_timeout"' in got
    finally:
        s.close()
    assert _health_within(server, 2.0) < 2.0


def test_keep_alive_between_requests_is_not_the_header_timeout(server):
    """An idle kept-alive connection is held for the keep-alive time (65 s), not the header deadline."""
    with httpx.Client(base_url=server.url, limits=httpx.Limits(max_connections=1)) as c:
        first = c.get("/health")
        time.sleep(HEADER_TIMEOUT + 0.5)
        second = c.get("/health")
        assert first.status_code == second.status_code == 200
        socks = {r.extensions["network_stream"].get_extra_info("socket").getsockname()[1] for r in (first, second)}
        assert len(socks) == 1


def test_connections_beyond_the_cap_are_refused_with_503(server):
    import select

    socks = []
    try:
        for _ in range(85):  # the cap is 80: whichever 5 the server accepts last are refused at once
            socks.append(_connect(server))
        refused, deadline = set(), time.monotonic() + HEADER_TIMEOUT * 0.8
        while time.monotonic() < deadline:
            ready, _, _ = select.select([s for s in socks if s not in refused], [], [], 0.05)
            for s in ready:
                got = s.recv(4096)
                assert got.startswith(b"HTTP/1.1 503") and b"too_many_connections" in got, got
                refused.add(s)
        assert 5 <= len(refused) <= 7, len(refused)
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 5
    while True:  # the server sees the closes on its next loop turns
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_repeated_log_errors_are_rate_limited(server):
    for _ in range(30):
        s = _connect(server)
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        _closed_within(s, 3)
        s.close()
    time.sleep(0.3)
    assert server.log().count("Invalid HTTP request received.") <= 2, server.log()[-3000:]


def test_repeat_filter_counts_what_it_dropped():
    import logging

    from giants.serve.server import RepeatFilter

    f = RepeatFilter(window=0.3)
    rec = lambda: logging.LogRecord("x", logging.ERROR, __file__, 1, "accept failed: %s", ("EMFILE",), None)  # noqa: E731
    assert f.filter(rec()) and not f.filter(rec()) and not f.filter(rec())
    info = logging.LogRecord("x", logging.INFO, __file__, 1, "accept failed: %s", ("EMFILE",), None)
    assert f.filter(info)  # below WARNING: never dropped
    time.sleep(0.35)
    r = rec()
    assert f.filter(r) and "2 more like this" in r.getMessage()


# ---- 7. chat templates ---------------------------------------------------------------------------------


SLOW_TEMPLATE = ("{% for m in messages %}{% if m.content == 'boom' %}{% for i in range(100000) %}"
                 "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                 "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template,content", [
    (SLOW_TEMPLATE, "boom"),  # nested loops over range(): 10^10 iterations
    ("{{ 'x' * 10**10 }}", "hi"),  # a 10 GB string
    ("{{ 'y'|center(10**9) }}", "hi"),
    ("{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{{ '' }}{% endfor %}{% endfor %}", "hi"),
], ids=["nested-range-loops", "huge-string", "huge-center", "nested-list-loops"])
def test_a_runaway_chat_template_is_stopped(model, tok, template, content):
    bad_tok = copy.copy(tok)
    bad_tok.chat_template = template
    with app_client(make_engine(model, bad_tok, delay=0.01), bad_tok, chat_template_timeout=1.5) as c:
        good = body(max_tokens=30, ignore_eos=True)
        alone = c.post("/v1/completions", json=good).json()["choices"][0]["text"]
        stream = in_thread(lambda: c.post("/v1/completions", json={**good, "stream": True}))
        t0 = time.monotonic()
        r = in_thread(lambda: c.post("/v1/chat/completions", json=chat_body(content)))
        r[0].join(30)
        assert not r[0].is_alive(), "the template was not stopped"
        assert time.monotonic() - t0 < 15
        err = assert_400(r[1]["r"], "messages", "chat_template_limit")
        assert "chat template" in err["message"]
        stream[0].join(60)
        assert stream_text(stream[1]["r"].text) == alone
        if template == SLOW_TEMPLATE:  # the same template, other messages: served as before
            ok = c.post("/v1/chat/completions", json=chat_body("hello"))
            assert ok.status_code == 200, ok.text


def test_chat_template_errors_are_400_and_rendering_is_unchanged(tok, client):
    from giants.serve.template import TemplateError, TemplateRenderer

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo \U0001F600"}]
    r = TemplateRenderer(tok, timeout=10)
    try:
        assert r.render(msgs, True) == tok.apply_chat_template(msgs, add_generation_prompt=True)
        assert r.render(msgs, False) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    finally:
        r.close()
    strict = copy.copy(tok)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    r = TemplateRenderer(strict, timeout=10)
    try:
        with pytest.raises(TemplateError, match="roles must alternate"):
            r.render(msgs, True)
    finally:
        r.close()
    assert client.post("/v1/chat/completions", json=chat_body("hello")).status_code == 200


# ---- 8. API key ----------------------------------------------------------------------------------------


def test_an_empty_api_key_is_an_error(monkeypatch, capsys):
    from giants.cli import build_parser
    from giants.serve.server import check_exposure

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "tiny-llama", "--api-key", ""])
    assert e.value.code == 2
    assert "empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="api_key"):
        create_app(lambda: None, "x", api_key="")
    with pytest.raises(ValueError, match="empty"):
        check_exposure("127.0.0.1", " ")

    import giants.serve.server as server_mod

    seen = []
    monkeypatch.setattr(server_mod, "serve", lambda o: seen.append(o) or 0)
    for value in ("", "  "):
        monkeypatch.setenv("GIANTS_API_KEY", value)
        args = build_parser().parse_args(["serve", "tiny-llama"])
        with pytest.raises(SystemExit) as e:
            args.func(args)
        assert e.value.code == 2 and "GIANTS_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("GIANTS_API_KEY", "sk-1")
    args = build_parser().parse_args(["serve", "tiny-llama"])
    assert args.func(args) == 0 and seen[-1].api_key == "sk-1"
    monkeypatch.delenv("GIANTS_API_KEY")
    args = build_parser().parse_args(["serve", "tiny-llama"])
    assert args.func(args) == 0 and seen[-1].api_key is None


def test_listening_beyond_loopback_without_a_key_warns(monkeypatch, capsys):
    import giants.serve.server as server_mod
    from giants.serve.server import ServeOptions, check_exposure

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert check_exposure(host, None) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert "without an API key" in check_exposure(host, None)
        assert check_exposure(host, "sk-1") is None
    # serve() prints it before starting (uvicorn not run here: nothing binds beyond loopback)
    monkeypatch.setattr(server_mod.DrainingServer, "run", lambda self: None)
    monkeypatch.setattr(server_mod, "install_repeat_filter", lambda: None)  # not on pytest's log handlers
    assert server_mod.serve(ServeOptions("tiny-llama", host="0.0.0.0")) == 0
    assert "warning: listening on 0.0.0.0 without an API key" in capsys.readouterr().err


# ---- hypothesis over request bodies --------------------------------------------------------------------


def _numbers():
    return st.one_of(
        st.sampled_from([0, 1, -1, 2, 20, 21, 64, 65, 128, 129, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                         -(2**63), -(2**63) - 1, 10**30, -10**30]),
        st.sampled_from([0.0, -0.0, 1e-45, 1e-5, 0.01, 0.5, 1.0, 1.0000001, 2.0, 2.0001, 100.0, 100.1, 1e300, -1e300,
                         float("nan"), float("inf"), float("-inf")]),
        st.integers(), st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([None, True, "1", [], {}]),
    )


FIELDS = ["temperature", "top_p", "top_k", "min_p", "n", "max_tokens", "seed", "logprobs", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "best_of"]


def _bodies():
    text = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "\x00", "<|im_end|>"]))
    fields = st.dictionaries(st.sampled_from(FIELDS), _numbers(), max_size=5)
    stops = st.one_of(st.none(), text, st.lists(text, max_size=70), st.just(["x" * 1025]))
    stop_ids = st.one_of(st.none(), st.lists(st.one_of(st.integers(-5, 10**20), st.just(2**70)), max_size=70))
    prompt = st.one_of(text, st.lists(st.integers(-1, 49_200), min_size=0, max_size=6),
                       st.lists(text, min_size=0, max_size=70), st.just([PROMPT] * 3))
    completion = st.fixed_dictionaries({"prompt": prompt}, optional={
        "stop": stops, "stop_token_ids": stop_ids, "stream": st.booleans(), "echo": st.booleans(),
        "ignore_eos": st.booleans()}).map(lambda d: ("/v1/completions", d))
    chat = st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                     "content": text}), min_size=0, max_size=3)},
        optional={"stop": stops, "stream": st.booleans(), "top_logprobs": _numbers(), "logprobs": st.booleans(),
                  "max_completion_tokens": _numbers()}).map(lambda d: ("/v1/chat/completions", d))
    return st.tuples(st.one_of(completion, chat), fields).map(lambda t: (t[0][0], {**t[0][1], **t[1]}))


@pytest.fixture(scope="module")
def fuzz_app(model, tok):
    engine = make_engine(model, tok, delay=0.005)
    with app_client(engine, tok, max_seqs_per_request=8, max_queue=64) as c:
        yield c, engine


def test_fuzz_request_bodies_beside_a_stream(fuzz_app):
    """Every field at and beyond its bounds, concurrently with a well-formed stream: each drawn request gets a
    200 or an OpenAI-shaped 4xx (never a 500), and the stream finishes with the text it has alone."""
    c, engine = fuzz_app
    good = body(max_tokens=240, ignore_eos=True)
    alone = c.post("/v1/completions", json=good).json()["choices"][0]["text"]
    seen: dict[int, int] = {}

    def beside_a_stream(one_pass):
        stream = in_thread(lambda: c.post("/v1/completions", json={**good, "stream": True}))
        one_pass()
        stream[0].join(180)
        assert not stream[0].is_alive()
        assert stream_text(stream[1]["r"].text) == alone, seen

    @given(req=_bodies())
    def check(req):
        path, b = req
        if "max_tokens" not in b and path == "/v1/completions":
            b["max_tokens"] = 2
        if b.get("max_tokens") is None or (isinstance(b.get("max_tokens"), int) and b["max_tokens"] > 8):
            b["max_tokens"] = 3  # keep accepted requests short; the bounds are fuzzed through the other fields
        raw = json.dumps(b, allow_nan=True, ensure_ascii=True)
        r = c.post(path, content=raw.encode(), headers={"content-type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400, 404, 429), (r.status_code, raw[:300], r.text[:300])
        if r.status_code != 200:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
        elif b.get("stream") is True:
            events = sse(r.text)
            assert events[-1] == "[DONE]"
            assert not [e for e in events[:-1] if "error" in e], events

    fuzz(check, beside_a_stream)()
    assert seen.get(400, 0) > 0 and seen.get(200, 0) > 0, seen
    deadline = time.monotonic() + 10
    while engine.stats()["num_requests"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.stats()["kv_blocks_used"] == 0
