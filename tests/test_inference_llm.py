"""LLM API, stop strings across token boundaries, streaming deltas, the generate CLI."""

from __future__ import annotations

import json

import pytest
import torch

import giants
from giants.inference import LLM, SamplingParams
from giants.inference.engine import Engine


@pytest.fixture(autouse=True)
def _no_default_tokenizer(monkeypatch):
    """Presets would pick up SmolLM2's tokenizer when cached; these tests use token ids or their own."""
    from giants.inference import llm as llm_mod

    monkeypatch.setattr(llm_mod, "_default_tokenizer", lambda m: None)


class ToyTokenizer:
    """Each id decodes to a fixed 1-3 letter piece, so words and stop strings straddle tokens."""

    eos_token_id = None

    def __init__(self, vocab: int = 49152) -> None:
        g = torch.Generator().manual_seed(0)
        letters = "abcde "
        lens = torch.randint(1, 4, (vocab,), generator=g).tolist()
        chars = torch.randint(0, len(letters), (vocab * 3,), generator=g).tolist()
        self.pieces = ["".join(letters[c] for c in chars[3 * i:3 * i + n]) for i, n in enumerate(lens)]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text):
        raise NotImplementedError


def _collect(engine: Engine, rid: str):
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid:
                deltas.append(o.outputs[0].new_text)
                final = o
    return deltas, final


def test_stop_strings_are_never_emitted_even_across_tokens():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    tok = ToyTokenizer()
    prompt = [100, 200, 300]
    engine = Engine(model, tok, block_size=4, num_blocks=128)
    engine.add_request("free", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    deltas, final = _collect(engine, "free")
    text, ids = final.outputs[0].text, final.outputs[0].token_ids
    assert "".join(deltas) == text == tok.decode(ids)
    # a stop string that starts inside one token and ends inside a later one
    ends = [len(tok.decode(ids[:i + 1])) for i in range(len(ids))]
    j = next(i for i in range(3, len(ids)) if len(tok.pieces[ids[i]]) >= 2 and len(tok.pieces[ids[i + 1]]) >= 1)
    start = ends[j] - 1
    stop = text[start:ends[j + 1]]
    first = text.find(stop)
    engine.add_request("stop", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                      stop=["zzzz", stop]))
    deltas, final = _collect(engine, "stop")
    out = final.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first] == "".join(deltas)
    assert all(stop not in d for d in deltas)
    assert out.token_ids == ids[:len(out.token_ids)]


def test_llm_generate_order_errors_and_stream():
    llm = LLM("tiny-gemma2", device="cpu", seed=0, block_size=4, num_blocks=256, max_model_len=64)
    assert llm.engine.max_model_len == 64
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], list(range(3, 100)), [8, 9]], sp)
    assert [o.finished for o in outs] == [True, True, True]
    assert outs[1].error and "max_model_len" in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    assert len(outs[0].outputs[0].token_ids) == 5 and outs[0].metrics.first_token_time is not None
    streamed = [o.outputs[0].new_token_ids for o in llm.stream([5, 6, 7], sp)]
    assert sum(streamed, []) == outs[0].outputs[0].token_ids
    # per-prompt params
    outs = llm.generate([[5, 6, 7], [5, 6, 7]], [sp, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)])
    assert len(outs[1].outputs[0].token_ids) == 2 and outs[1].outputs[0].token_ids == outs[0].outputs[0].token_ids[:2]


def test_llm_preset_is_seeded_and_a_tensor_parallel_size_that_does_not_divide_is_refused():
    a = LLM("tiny-llama", device="cpu", seed=3, num_blocks=64)
    b = LLM("tiny-llama", device="cpu", seed=3, num_blocks=64)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="does not divide n_heads=4"):  # tensor parallelism: test_inference_tp
        LLM("tiny-llama", device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="unknown preset"):
        LLM("tiny-lama", device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        LLM("tiny-llama", device="cpu", dtype="float8")


def test_llm_accepts_a_model_and_tokenizer():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    llm = LLM(model, tokenizer=ToyTokenizer(), num_blocks=64, block_size=4)
    out = llm.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


def test_generate_cli_json(capsys, monkeypatch):
    from giants import cli
    from giants.inference import llm as llm_mod

    monkeypatch.setattr(llm_mod, "_default_tokenizer", lambda m: type("T", (), {
        "encode": staticmethod(lambda s: [ord(c) for c in s]), "decode": ToyTokenizer().decode})())
    assert cli.main(["generate", "tiny-llama", "hello", "--max-tokens", "5", "--temperature", "0", "--json",
                     "--ignore-eos"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"text", "token_ids", "finish_reason", "random_weights"} and len(got["token_ids"]) == 5
    assert got["random_weights"] is True  # a preset: said in the JSON too
    assert got["finish_reason"] == "length"
    model = llm_mod.random_model("tiny-llama", torch.device("cpu"), torch.float32, 0)
    engine = Engine(model, num_blocks=64)
    engine.add_request("x", [ord(c) for c in "hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    _, final = _collect(engine, "x")
    assert final.outputs[0].token_ids == got["token_ids"]
    assert cli.main(["generate", "tiny-llama", "hello", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
