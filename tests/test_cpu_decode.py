"""The compiled CPU decode (LLM(cpu_compile=True)) against the eager engine and the plain model.

The compiled path runs the steps where exactly one sequence decodes; prefill and batched steps stay eager.
A dense config that switches on every attention variant the compiled layers carry (soft-caps, sinks, QKV bias,
sandwich norms, Gemma's norm, a window shorter than the sequence, embedding scale, YaRN-free rotary) is
checked for logits as well as tokens.
"""

from __future__ import annotations

import pytest
import torch

import giants
from giants.inference import SamplingParams
from giants.inference.engine import Engine
from test_engine import reference_greedy, run_engine

NEW = 24


def everything_dense():
    return giants.get_config("tiny-gemma2").replace(attn_sinks=True, attn_qkv_bias=True, n_layers=2)


def _model(cfg):
    model = giants.build(cfg, seed=0).eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.attn.sinks is not None:
                layer.attn.sinks.normal_(0, 1.0)
            for m in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj):
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
    return model


def _generate(engine: Engine, prompt: list[int], n: int):
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out.outputs[0]
    raise AssertionError("no output")


@pytest.mark.parametrize("cfg", [giants.get_config("tiny-llama"), everything_dense()], ids=["llama", "everything"])
def test_compiled_decode_matches_eager_and_reference(cfg):
    model = _model(cfg)
    g = torch.Generator().manual_seed(3)
    # 21 + 24 tokens: past the window of 16 in the windowed layers
    prompt = torch.randint(3, cfg.vocab_size, (21,), generator=g).tolist()
    ref = reference_greedy(model, prompt, NEW)
    eager = _generate(Engine(model, block_size=4, num_blocks=64), prompt, NEW)
    compiled_engine = Engine(model, block_size=4, num_blocks=64, cpu_compile=True)
    calls = []
    step = compiled_engine.runner.compiled.__call__
    compiled_engine.runner.compiled = lambda inp: calls.append(1) or step(inp)
    comp = _generate(compiled_engine, prompt, NEW)
    assert len(calls) == NEW - 1  # every decode step after the prefill went through the compiled layers
    assert eager.token_ids == ref
    assert comp.token_ids == ref
    for a, b in zip(eager.logprobs, comp.logprobs):
        assert a.keys() == b.keys()
        for t in a:
            assert abs(a[t] - b[t]) < 1e-4, (t, a[t], b[t])


def test_compiled_decode_batched_steps_stay_eager_and_agree():
    model = _model(giants.get_config("tiny-llama"))
    prompts = [[5, 6, 7, 8, 9], list(range(100, 131)), [42] * 3]
    ref = [reference_greedy(model, p, 6) for p in prompts]
    engine = Engine(model, block_size=4, num_blocks=64, cpu_compile=True)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert run_engine(engine, prompts, params, stagger=3) == ref


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-gpt-oss-described"])
def test_compiled_decode_refuses_what_it_does_not_carry(name):
    model = giants.build(giants.get_config(name), seed=0).eval()
    with pytest.raises(ValueError, match="cpu_compile: .*(MLP|relative position bias)"):
        Engine(model, block_size=4, num_blocks=16, cpu_compile=True)


def test_serve_options_compile_reaches_the_engine():
    from giants.serve.server import ServeOptions, load_model

    loaded = load_model(ServeOptions("tiny-llama", device="cpu", compile=True))
    assert loaded.engine.runner.compiled is not None
    assert load_model(ServeOptions("tiny-llama", device="cpu")).engine.runner.compiled is None
