"""No option is silently ignored: an LLM / SamplingParams / server option that would not take effect raises (or
answers 400) naming the option and its value, rather than running as if it had not been given."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

import giants
from giants.inference import LLM, SamplingParams

VOCAB = 320


def _model(name: str = "tiny-llama"):
    return giants.build(giants.get_config(name).replace(vocab_size=VOCAB), seed=0).eval()


def _llm(**kw):
    return LLM(_model(), device="cpu", num_blocks=32, max_model_len=64, max_num_seqs=2, **kw)


# --- LLM ------------------------------------------------------------------------------------------


def test_quantization_of_a_checkpoint_is_applied(tmp_path):
    """LLM(path, quantization="mxfp4") once loaded the checkpoint with dense experts and said nothing; then it was
    refused; now the experts are packed as they are read (giants.checkpoint.quantized)."""
    from giants.inference.mxfp4 import MXFP4MoE

    giants.save(_model("tiny-mixtral"), tmp_path / "ckpt")
    llm = LLM(str(tmp_path / "ckpt"), quantization="mxfp4", device="cpu", num_blocks=32, max_model_len=64)
    assert all(isinstance(layer.mlp, MXFP4MoE) for layer in llm.model.layers)
    llm = LLM(str(tmp_path / "ckpt"), device="cpu", num_blocks=32, max_model_len=64)  # without it: loads
    assert llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="quantization: one of"):
        LLM(str(tmp_path / "ckpt"), quantization="int4", device="cpu")


def test_quantization_of_a_dense_model_raises():
    with pytest.raises(ValueError, match=r"quantization: 'mxfp4' quantizes mixture-of-experts layers.*n_experts=0"):
        LLM(_model("tiny-llama"), quantization="mxfp4", device="cpu", num_blocks=32)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        LLM("tiny-llama", quantization="mxfp4", device="cpu", num_blocks=32)
    from giants.inference.mxfp4 import MXFP4MoE

    llm = LLM(_model("tiny-mixtral"), quantization="mxfp4", device="cpu", num_blocks=32, max_model_len=64)
    assert all(isinstance(layer.mlp, MXFP4MoE) for layer in llm.model.layers)  # applied where it can be


def test_gpu_memory_utilization_and_cuda_graphs_off_cuda_raise():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization: sizes the KV cache on a CUDA device.*'cpu'.*0\.5"):
        LLM(_model(), device="cpu", gpu_memory_utilization=0.5)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization: .*num_blocks=32"):
        LLM(_model(), device="cpu", num_blocks=32, gpu_memory_utilization=0.9)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization: must be in \(0, 1\]"):
        LLM(_model(), device="cpu", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"use_cuda_graphs: CUDA graphs need a CUDA device"):
        LLM(_model(), device="cpu", num_blocks=32, use_cuda_graphs=True)
    _llm(use_cuda_graphs=False)  # asking for none is what the CPU does
    _llm()  # the defaults stay quiet


def test_stop_strings_without_a_tokenizer_raise():
    """Stop strings are matched in decoded text: with no tokenizer they could never match, and ran unstopped."""
    llm = _llm()
    assert llm.tokenizer is None
    sp = SamplingParams(temperature=0, max_tokens=4, stop=["\n"])
    with pytest.raises(ValueError, match=r"SamplingParams.stop: .*no tokenizer; use stop_token_ids"):
        llm.generate([[1, 2, 3]], sp)
    with pytest.raises(ValueError, match=r"SamplingParams.stop"):
        next(llm.stream([1, 2, 3], sp))
    with pytest.raises(ValueError, match=r"SamplingParams.stop"):
        llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=2), sp])
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[7]))
    assert out[0].error is None


# --- the server -----------------------------------------------------------------------------------


class _Tok:
    """A stand-in tokenizer: records what the chat template was given."""

    def __init__(self):
        self.seen: list = []

    def apply_chat_template(self, messages, add_generation_prompt=True):
        self.seen.append(messages)
        return "hi"

    def encode(self, text, add_special_tokens=True):
        return [1, 2, 3]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def _client(tokenizer):
    from giants.inference.engine import Engine
    from giants.serve.app import Loaded, create_app

    engine = Engine(_model(), tokenizer, max_model_len=64, num_blocks=32, max_num_seqs=2)
    app = create_app(lambda: Loaded(engine, tokenizer, 64, 2, VOCAB), "tiny-llama")
    c = TestClient(app)
    c.__enter__()
    deadline = time.monotonic() + 60
    while c.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return c


@pytest.fixture(scope="module")
def server():
    tok = _Tok()
    c = _client(tok)
    yield c, tok
    c.__exit__(None, None, None)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": [1, 2], "max_token": 5}, "max_token"),  # a misspelt max_tokens
    ("/v1/completions", {"prompt": [1, 2], "min_token": 3}, "min_token"),  # a misspelt min_tokens
    ("/v1/completions", {"prompt": [1, 2], "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "topk": 3}, "topk"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "weight": 2}]}, "messages[0].weight"),
])
def test_unknown_request_fields_400(server, path, body, param):
    c, _ = server
    r = c.post(path, json={"model": "tiny-llama", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": f"Unrecognized request argument supplied: {param}",
                                 "type": "invalid_request_error", "param": param, "code": "unsupported_parameter"}


def test_chat_message_fields(server):
    c, tok = server
    base = {"model": "tiny-llama", "max_tokens": 2, "temperature": 0}
    # an earlier response's message copied back as is (its empty fields included) is accepted
    reply = {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None, "function_call": None,
             "audio": None, "annotations": []}
    r = c.post("/v1/chat/completions", json={**base, "messages": [{"role": "user", "content": "a"}, reply,
                                                                  {"role": "user", "content": "b"}]})
    assert r.status_code == 200, r.text
    assert tok.seen[-1][1] == {"role": "assistant", "content": "ok"}
    # a tool message's id reaches the template
    r = c.post("/v1/chat/completions", json={**base, "messages": [{"role": "tool", "content": "42",
                                                                   "tool_call_id": "call_1"}]})
    assert r.status_code == 200 and tok.seen[-1][0]["tool_call_id"] == "call_1"
    for key, value, param in (("tool_calls", [{"id": "c", "type": "function"}], "tool_calls[0]"),
                              ("refusal", "no", "refusal")):
        r = c.post("/v1/chat/completions", json={**base, "messages": [{"role": "assistant", "content": "",
                                                                       key: value}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"messages[0].{param}", r.text
    r = c.post("/v1/chat/completions", json={**base, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].cache_control"
    # max_tokens and max_completion_tokens: one was silently dropped when both were sent
    r = c.post("/v1/chat/completions", json={**base, "max_tokens": 3, "max_completion_tokens": 5,
                                             "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = c.post("/v1/chat/completions", json={**base, "max_tokens": 3, "max_completion_tokens": 3, "ignore_eos": True,
                                             "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_stop_strings_need_the_servers_tokenizer():
    c = _client(None)
    try:
        r = c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "stop": ["a"]})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "stop" and "stop_token_ids" in err["message"]
        r = c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "stop_token_ids": [5]})
        assert r.status_code == 200
    finally:
        c.__exit__(None, None, None)

