"""The other families' tiny twins behind a real `giants serve` process on a free loopback port, driven by
the official `openai` client. Sliding windows (gemma2, mixtral, gpt-oss), soft-caps, sinks and MoE all sit
behind the same endpoints; answers must equal the engine run in this process on the same weights (random,
seed 0). (tiny-llama gets the full treatment in test_serve_api.py.)"""

from __future__ import annotations

import openai
import pytest
import torch

from giants.serve.launch import ServerProcess

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

    engine.add_request(f"direct-{len(ids)}-{sorted(kw.items())}", ids, SamplingParams(**kw))
    final = None
    while engine.has_unfinished_requests():
        for r in engine.step():
            final = r if r.finished else final
    return final.outputs


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss"])
def test_twin_behind_the_api(name, tok):
    messages = [{"role": "user", "content": "A prompt long enough to slide past a window of sixteen tokens."}]
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert len(ids) > 32
    engine = _engine(name, tok)
    want = _direct(engine, ids, temperature=0, max_tokens=12)[0]
    prompt = "Stop strings across tokens"
    full = _direct(engine, tok.encode(prompt), temperature=0, max_tokens=16, ignore_eos=True)[0].text
    assert len(full) > 12
    stop = full[len(full) // 2 - 2:len(full) // 2 + 2]
    with ServerProcess(name, "--max-model-len", str(MAX_LEN), "--num-blocks", "256", "--max-num-seqs", "8",
                       "--log-level", "warning") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [name]
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want.text  # the chat template applied, as the engine saw it
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want.token_ids))
        chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[-1].usage == r.usage
        # completions: stop strings, max_tokens, n, seeds
        r = client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
        r = client.completions.create(model=name, prompt=prompt, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        kw = dict(model=name, prompt="seeded", max_tokens=6, temperature=1.0, n=2, seed=3)
        a, b = client.completions.create(**kw), client.completions.create(**kw)
        assert [c.index for c in a.choices] == [0, 1]
        assert [c.text for c in a.choices] == [c.text for c in b.choices]
        assert a.usage.completion_tokens == b.usage.completion_tokens <= 12
        # errors
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="tiny-llama", prompt="x")
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=name, prompt="x", temperature=5)
        assert e.value.response.json()["error"]["param"] == "temperature"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "word " * 400}])
        assert e.value.response.json()["error"]["code"] == "context_length_exceeded"
        assert srv.stop() == 0, srv.log()
