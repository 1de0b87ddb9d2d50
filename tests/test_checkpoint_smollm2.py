"""The real model: SmolLM2-135M-Instruct Q4_1 GGUF, ours vs transformers loading the same file."""

from __future__ import annotations

import copy

import pytest
import torch

import giants
from giants.checkpoint import download
from giants.checkpoint.hf_map import giants_to_hf

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


@pytest.fixture(scope="module")
def gguf_path():
    return download("smollm2-135m")  # once into the user cache; later runs reuse it


@pytest.fixture(scope="module")
def ours(gguf_path):
    return giants.load("smollm2-135m")


@pytest.fixture(scope="module")
def tok():
    return giants.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def ref(smollm2_transformers):
    """transformers' model from the same GGUF file (conftest's, loaded once a session), with eager attention."""
    model = copy.deepcopy(smollm2_transformers)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    return model


def test_config_is_the_smollm2_preset(ours):
    preset = giants.get_config("smollm2-135m")
    assert ours.config == preset.replace(max_context=ours.config.max_context)
    assert ours.lm_head is None  # tied: the GGUF has no output.weight


def test_weights_equal_transformers_dequantization(ours, ref):
    theirs = ref.state_dict()
    for name, t in giants_to_hf(ours.state_dict(), ours.config):
        assert torch.equal(t, theirs[name]), name


def test_chat_prompt_logits_match_transformers(ours, ref, tok):
    ids = torch.tensor([tok.apply_chat_template(PROMPT, tokenize=True)])
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def greedy(model, ids: torch.Tensor, n: int, eos: tuple[int, ...]) -> list[int]:
    """Plain greedy decoding: one prefill, then one token at a time through the model's KV caches."""
    T = ids.shape[1]
    cache = model.make_cache(1, T + n)
    with torch.no_grad():
        logits = model(ids, torch.arange(T)[None], cache)
        out: list[int] = []
        for i in range(n):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
            logits = model(torch.tensor([[nxt]]), torch.tensor([[T + i]]), cache)
    return out


def test_64_greedy_tokens_identical_to_transformers_generate(ours, ref, tok):
    ids = torch.tensor([tok.apply_chat_template(PROMPT, tokenize=True)])
    mine = greedy(ours, ids, 64, tok.eos_token_ids)
    with torch.no_grad():
        theirs = ref.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(mine) == 64  # the story is long enough that neither side stops early
    assert mine == theirs
    assert "paint" in tok.decode(mine).lower() or "art" in tok.decode(mine).lower()


def test_save_as_hf_dir_transformers_loads(ours, tok, tmp_path):
    """What `giants convert smollm2-135m DIR` writes (the command itself is tested on a small GGUF)."""
    import transformers

    out = tmp_path / "smollm2-hf"
    giants.save(ours, out, tokenizer=tok)
    again = giants.load(out)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids = torch.tensor([tok.apply_chat_template(PROMPT, tokenize=True)])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(PROMPT)
    for text in ("Hello 12 worlds!\n\n  indented", "emoji 🦙 and 中文", "<|im_start|>user\nhi<|im_end|>"):
        assert hf_tok.encode(text) == tok.encode(text), text
    assert hf_tok.eos_token_id == 2 and hf.generation_config.eos_token_id == 2
