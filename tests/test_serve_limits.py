"""The server's bounds, in process (Starlette's TestClient runs the app's lifespan and the engine thread): a full
queue answers 429 with Retry-After at once, a request past --request-timeout answers 408 and is aborted in the
engine (its KV blocks freed), and the requests beside them are unharmed. The engine is slowed down per step so
the timings are the test's, not the machine's."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from giants.serve import DEFAULT_MAX_QUEUE, DEFAULT_REQUEST_TIMEOUT
from giants.serve.app import Loaded, create_app

PROMPT = [1, 2, 3, 4, 5]
VOCAB = 320  # a small head: the model builds in milliseconds


def _slow_engine(delay: float, max_num_seqs: int):
    import giants
    from giants.inference.engine import Engine

    model = giants.build(giants.get_config("tiny-llama").replace(vocab_size=VOCAB), seed=0).eval()
    engine = Engine(model, None, max_model_len=256, num_blocks=64, max_num_seqs=max_num_seqs)
    step = engine.step

    def slow_step():
        time.sleep(delay)
        return step()

    engine.step = slow_step
    return engine


def _app(engine, **kw):
    return create_app(lambda: Loaded(engine, None, 256, engine.max_num_seqs, VOCAB), "tiny-llama", **kw)


def _ready(c: TestClient) -> None:
    deadline = time.monotonic() + 60
    while c.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _body(max_tokens: int, **kw) -> dict:
    return {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            **kw}


def _in_thread(fn):
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    t.start()
    return t, box


def _wait_in_flight(c: TestClient, n: int) -> None:
    deadline = time.monotonic() + 30
    while c.get("/health").json()["in_flight"] < n:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_queue_full_answers_429_with_retry_after_and_others_finish():
    engine = _slow_engine(0.02, max_num_seqs=1)
    with TestClient(_app(engine, max_queue=1)) as c:  # room for 1 running + 1 waiting
        _ready(c)
        alone = c.post("/v1/completions", json=_body(30)).json()["choices"][0]
        a = _in_thread(lambda: c.post("/v1/completions", json=_body(30)))
        b = _in_thread(lambda: c.post("/v1/completions", json=_body(30)))
        _wait_in_flight(c, 2)
        t0 = time.monotonic()
        full = c.post("/v1/completions", json=_body(2))
        assert time.monotonic() - t0 < 0.5  # refused at once, not queued
        assert full.status_code == 429
        assert full.headers["retry-after"] == "1"
        assert full.json() == {"error": {"message": "server queue is full (2 sequences in flight); retry later",
                                         "type": "rate_limit_error", "param": None, "code": "queue_full"}}
        assert c.post("/v1/completions", json=_body(2, stream=True)).status_code == 429
        for t, box in (a, b):
            t.join(60)
            r = box["r"]
            assert r.status_code == 200
            got = r.json()
            assert got["usage"]["completion_tokens"] == 30 and got["choices"][0]["finish_reason"] == "length"
            assert got["choices"][0]["text"] == alone["text"]
        assert c.post("/v1/completions", json=_body(2)).status_code == 200  # room again
        metrics = c.get("/metrics").text
        assert 'giants_requests_total{endpoint="/v1/completions",status="429"} 2.0' in metrics
    assert engine.stats()["kv_blocks_used"] == 0


def _sse(raw: str) -> list[str]:
    return [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]


def test_request_timeout_answers_408_and_frees_the_engine():
    engine = _slow_engine(0.02, max_num_seqs=4)
    with TestClient(_app(engine, request_timeout=0.6)) as c:
        _ready(c)
        assert c.post("/v1/completions", json=_body(3)).status_code == 200  # well within the limit
        t0 = time.monotonic()
        slow = _in_thread(lambda: c.post("/v1/completions", json=_body(200)))  # ~4 s of steps
        slow_stream = _in_thread(lambda: c.post("/v1/completions", json=_body(200, stream=True)))
        _wait_in_flight(c, 2)
        quick = [c.post("/v1/completions", json=_body(4)) for _ in range(3)]  # beside them, unharmed
        assert all(q.status_code == 200 and q.json()["usage"]["completion_tokens"] == 4 for q in quick)
        slow[0].join(30)
        r = slow[1]["r"]
        took = time.monotonic() - t0
        assert r.status_code == 408, r.text
        err = r.json()["error"]
        assert err["code"] == "request_timeout" and err["type"] == "timeout_error" and "0.6 s" in err["message"]
        assert r.headers["x-should-retry"] == "false"  # the official client would otherwise run it again
        assert took < 3.5  # not the ~4 s the 200 tokens would take
        slow_stream[0].join(30)
        s = slow_stream[1]["r"]
        assert s.status_code == 200  # a stream's status went out with its first byte: the error is an event
        events = _sse(s.text)
        assert events[-1] == "[DONE]"
        errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
        assert [e["code"] for e in errors] == ["request_timeout"]
        deadline = time.monotonic() + 10
        while c.get("/health").json()["in_flight"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stats = engine.stats()
        assert stats["kv_blocks_used"] == 0 and stats["num_requests"] == 0 and stats["num_running"] == 0
        metrics = c.get("/metrics").text
        assert "giants_request_timeouts_total 2.0" in metrics
        assert 'giants_requests_total{endpoint="/v1/completions",status="408"} 1.0' in metrics
        assert c.post("/v1/completions", json=_body(3)).status_code == 200


def test_limits_are_on_by_default_and_configurable():
    from giants.cli import build_parser
    from giants.serve.server import ServeOptions

    assert (DEFAULT_MAX_QUEUE, DEFAULT_REQUEST_TIMEOUT) == (256, 600.0)
    opts = ServeOptions("tiny-llama")
    assert opts.max_queue == 256 and opts.request_timeout == 600.0
    args = build_parser().parse_args(["serve", "tiny-llama"])
    assert args.max_queue == 256 and args.request_timeout == 600.0

    import giants.serve.server as server_mod

    seen = []
    orig = server_mod.serve
    server_mod.serve = lambda o: seen.append(o) or 0
    try:
        for argv, want in ((["serve", "tiny-llama"], (256, 600.0)),
                           (["serve", "tiny-llama", "--max-queue", "0", "--request-timeout", "0"], (0, None)),
                           (["serve", "tiny-llama", "--max-queue", "8", "--request-timeout", "2.5"], (8, 2.5))):
            args = build_parser().parse_args(argv)
            assert args.func(args) == 0
            assert (seen[-1].max_queue, seen[-1].request_timeout) == want
    finally:
        server_mod.serve = orig
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "tiny-llama", "--request-timeout", "-1"])
    with pytest.raises(ValueError, match="request_timeout"):
        create_app(lambda: None, "x", request_timeout=0)
    with pytest.raises(ValueError, match="max_queue"):
        create_app(lambda: None, "x", max_queue=-1)
