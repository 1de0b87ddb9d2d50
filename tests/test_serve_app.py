"""The app in process (Starlette's TestClient runs its lifespan): the loading / failed states and the order
of the gate's checks, which a real process only shows for a moment."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from giants.serve.app import Loaded, create_app
from giants.serve.errors import _param_from_loc, error_body


def _tiny_engine():
    from giants.inference.engine import Engine
    from giants.inference.llm import random_model

    model = random_model("tiny-llama", torch.device("cpu"), torch.float32, seed=0)
    return Engine(model, None, max_model_len=128, num_blocks=64, max_num_seqs=4)


def _wait_status(c: TestClient, status: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while c.get("/health").status_code != status:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_503_while_loading_then_ready():
    release = threading.Event()

    def loader() -> Loaded:
        assert release.wait(30)
        return Loaded(engine=_tiny_engine(), tokenizer=None, max_model_len=128, max_running=4, vocab_size=49152)

    app = create_app(loader, "tiny-llama", api_key="k")
    with TestClient(app) as c:
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["error"]["code"] == "loading"
        auth = {"Authorization": "Bearer k"}
        r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x"}, headers=auth)
        assert r.status_code == 503
        assert r.json() == {"error": {"message": "the model is still loading; retry shortly",
                                      "type": "service_unavailable", "param": None, "code": "loading"}}
        # the key is checked before availability, so probing without one tells nothing about the server
        assert c.get("/v1/models").status_code == 401
        assert 'giants_server_state{state="loading"} 1.0' in c.get("/metrics").text
        release.set()
        _wait_status(c, 200)
        models = c.get("/v1/models", headers=auth).json()
        assert models["data"][0]["id"] == "tiny-llama" and models["data"][0]["max_model_len"] == 128
        assert 'giants_server_state{state="ready"} 1.0' in c.get("/metrics").text
        # token-id prompts need no tokenizer: the engine runs them as they are
        r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": [1, 2, 3], "max_tokens": 4,
                                            "temperature": 0, "ignore_eos": True}, headers=auth)
        assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                              "total_tokens": 7}


def test_failed_load_is_reported():
    failures = []

    def loader() -> Loaded:
        raise RuntimeError("weights are corrupt")

    app = create_app(loader, "broken", on_load_failed=failures.append)
    with TestClient(app) as c:
        _wait_status(c, 503)
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        h = c.get("/health").json()["error"]
        assert h["code"] == "failed" and "weights are corrupt" in h["message"]
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 503
    assert isinstance(failures[0], RuntimeError)


def test_unknown_routes_and_methods_use_the_error_shape():
    app = create_app(lambda: Loaded(_tiny_engine(), None, 128, 4, 49152), "tiny-llama")
    with TestClient(app) as c:
        _wait_status(c, 200)
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = c.get("/v1/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("loc,param", [(("body", "temperature"), "temperature"),
                                       (("body", "messages", 0, "role"), "messages[0].role"),
                                       (("body", "prompt", "str"), "prompt"), (("body",), None)])
def test_param_names(loc, param):
    assert _param_from_loc(loc) == param


def test_error_body_shape():
    assert error_body(429, "full", None, "queue_full") == {
        "error": {"message": "full", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
