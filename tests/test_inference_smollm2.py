"""Real weights: `giants generate smollm2-135m ... --temperature 0` equals transformers' greedy output on the
same GGUF file (SmolLM2-135M-Instruct Q4_1, dequantized to fp32 by both)."""

from __future__ import annotations

import json

import pytest
import torch

import giants
from giants import cli

PROMPT = "Write a short poem about the sea."
NEW = 40


@pytest.fixture(scope="module")
def hf_greedy(smollm2_transformers):
    """transformers' greedy tokens on the GGUF file (its model loaded once a session, in conftest), and the
    tokenizer: the same for both parametrizations, so generated once."""
    from giants.checkpoint import download

    path = str(download("smollm2-135m"))
    tok = giants.load_tokenizer(path)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = tok.encode(text)
    hf = smollm2_transformers
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
    return tok, out[0, len(ids):].tolist()


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_generate_cli_matches_transformers_greedy_on_the_gguf(capsys, hf_greedy, compile_):
    tok, ref = hf_greedy
    assert cli.main(["generate", "smollm2-135m", PROMPT, "--chat", "--temperature", "0", "--max-tokens", str(NEW),
                     "--json", *(["--compile"] if compile_ else [])]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == ref
    assert len(ref) >= 8  # a real answer, not an immediate stop
    assert got["text"] == tok.decode([t for t in ref if t != tok.eos_token_id], skip_special_tokens=True)
    assert got["finish_reason"] == ("stop" if ref[-1] == tok.eos_token_id else "length")
