"""The other families' tiny twins through the whole app (routes, bridge, engine thread, SSE), in process:
Starlette's TestClient is an httpx client, so the official `openai` client drives it directly. Sliding
windows (gemma2, mixtral, gpt-oss), soft-caps, sinks and MoE all sit behind the same endpoints; answers
must equal the engine run directly on the same weights. (tiny-llama runs as a real process in
test_serve_api.py.)"""

from __future__ import annotations

import time

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from giants.serve.app import Loaded, create_app

MAX_LEN = 256


@pytest.fixture(scope="module")
def tok():
    import giants

    return giants.load_tokenizer("smollm2-135m")


def _engine(name: str, tok):
    from giants.inference.engine import Engine
    from giants.inference.llm import random_model

    model = random_model(name, torch.device("cpu"), torch.float32, seed=0)
    return Engine(model, tok, max_model_len=MAX_LEN, num_blocks=256, max_num_seqs=8, seed=0)


def _direct(engine, ids, **kw):
    from giants.inference import SamplingParams

    engine.add_request("direct", ids, SamplingParams(**kw))
    final = None
    while engine.has_unfinished_requests():
        for r in engine.step():
            final = r if r.finished else final
    return final.outputs


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss"])
def test_twin_behind_the_api(name, tok):
    served = _engine(name, tok)
    app = create_app(lambda: Loaded(served, tok, MAX_LEN, 8, served.cfg.vocab_size), name)
    messages = [{"role": "user", "content": "A prompt long enough to slide past a window of sixteen tokens."}]
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert len(ids) > 32
    want = _direct(_engine(name, tok), ids, temperature=0, max_tokens=12)[0]
    with TestClient(app) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want.text
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want.token_ids))
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=name, messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices)
        assert streamed == want.text
        kw = dict(model=name, prompt="seeded", max_tokens=6, temperature=1.0, n=2, seed=3)
        a, b = client.completions.create(**kw), client.completions.create(**kw)
        assert [c.text for c in a.choices] == [c.text for c in b.choices]
