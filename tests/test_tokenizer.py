"""Tokenizer from the real SmolLM2 GGUF against transformers' own GGUF tokenizer; chat templates; streaming."""

from __future__ import annotations

import json
import random

import jinja2
import pytest

from giants.checkpoint import download
from giants.tokenizer import Tokenizer, load_tokenizer

SAMPLES = [
    "Hello world!",
    "  leading  spaces\n\n\ttabs\r\nand a trailing run     ",
    "naïve café — “curly quotes” … ° ß Ø",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "中文测试，日本語のテキスト、한국어 문장",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    '{"json": [1, 2.5, null], "k": "v\\n"}',
    "numbers 1234567 3.14159 1e-9 0x1F 2024-01-31",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "Ünïcödé ǅ ﬁ ＡＢＣ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\n\n\n",
    "      ",
    "",
    "I'm can't won't they'll we've she'd",
    "a" * 300,
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = ["the", " ", "  ", "\n", "\t", "😀", "中", "é", "ß", "123", "!", "?", "<|im_end|>", "'s", "Ġ", "\u200b",
              "\r\n", "   \n", "def", "(", ")", "{", "}", "🇫🇷", "x" * 7, "ü"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def smollm2_gguf():
    return download("smollm2-135m")


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def ref(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


# llama.cpp (and SmolLM2's own tokenizer.json, Digits(individual_digits=True)) isolate every \\p{N}
# character before the GPT-2 split; transformers' GGUF tokenizer skips that step. The two differ exactly
# where that changes the split: whitespace runs before a digit ("\\n\\t123") and numerals with merges (" ½").
NUMERALS = ["fractions ½ ¾ and powers x² y³", "roman Ⅻ circled ① arabic-indic ٣٤", "x = [\n    1,\n    2]"]
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_SPECIAL = r"(<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>)"


def _pieces(text: str, isolate_numerals: bool) -> list[str]:
    """Pre-tokenization written out with the `regex` module: llama.cpp's `smollm` rule, or plain GPT-2."""
    import regex

    out = []
    for chunk in regex.split(_SPECIAL, text):
        if regex.fullmatch(_SPECIAL, chunk):
            out.append(chunk)
            continue
        for part in (regex.split(r"(\p{N})", chunk) if isolate_numerals else [chunk]):
            out += [m.group() for m in regex.finditer(_GPT2, part)]
    return out


def test_pre_tokenizer_is_llama_cpp_smollm(tok):
    from giants.tokenizer import _byte_alphabet

    spell = _byte_alphabet()
    for text in SAMPLES + NUMERALS + _random_texts(100, seed=3):
        plain = "".join(p for p in __import__("regex").split(_SPECIAL, text) if not p.startswith("<|"))
        got = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(plain)]
        assert got == ["".join(spell[b] for b in p.encode()) for p in _pieces(plain, True)], text


def test_encode_decode_identical_to_transformers(tok, ref):
    same_split, texts = 0, SAMPLES + NUMERALS + _random_texts(200)
    for text in texts:
        ids = tok.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids  # SmolLM2 adds no BOS
        assert tok.decode(ids) == ref.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
        pieces = _pieces(text, True)
        if pieces == _pieces(text, False):
            assert ids == ref.encode(text, add_special_tokens=True), text
            same_split += 1
        else:
            # Only the split differs: BPE on each llama.cpp piece is transformers' BPE, id for id.
            want = [i for p in pieces for i in ref.encode(p, add_special_tokens=False)]
            assert ids == want, text
    assert same_split >= len(texts) // 2  # at least half the sample is compared with transformers directly
    assert tok.decode(tok.encode(SAMPLES[5])) == SAMPLES[5]  # byte-level BPE is lossless


def test_numerals_split_like_llama_cpp(tok, ref):
    text = NUMERALS[0]
    ours = tok.encode(text)
    assert tok.decode(ours) == text
    assert ours != ref.encode(text)  # transformers merges " ½" into one token; llama.cpp never does
    assert [tok.decode([i]) for i in ours].count("½") == 1


def test_special_tokens_match(tok, ref):
    assert tok.vocab_size == len(ref) == 49152
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == (2,)
    assert set(tok.special_tokens) == set(ref.all_special_tokens) | {
        t.content for t in ref.added_tokens_decoder.values() if t.special}
    assert tok.token_to_id("<|im_start|>") == 1 and tok.id_to_token(2) == "<|im_end|>"


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Write\ncode:\n  x = 1"}],
    [{"role": "user", "content": "多语言 test", "name": None}],
]


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_renders_like_transformers(tok, ref, gen):
    for chat in CHATS:
        ours = tok.apply_chat_template(chat, add_generation_prompt=gen)
        assert ours == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == ref.encode(
            ours, add_special_tokens=False)
    assert ours.startswith("<|im_start|>user") is False  # the template inserts the default system prompt


def test_stream_decoder_never_splits_characters(tok):
    for text in SAMPLES + _random_texts(60, seed=1):
        ids = tok.encode(text)
        for skip in (False, True):
            s = tok.stream(skip_special_tokens=skip)
            deltas = [s.add(i) for i in ids]
            tail = s.flush()
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in d for d in deltas), text
    # A 4-byte emoji is spelled with byte tokens: nothing comes out until the character is complete.
    ids = tok.encode("🦙")
    assert len(ids) > 1
    s = tok.stream()
    outs = [s.add(i) for i in ids]
    assert outs[:-1] == [""] * (len(ids) - 1) and outs[-1] == "🦙"


def test_stream_flush_after_partial_character(tok):
    ids = tok.encode("ok 🦙")
    s = tok.stream()
    got = "".join(s.add(i) for i in ids[:-1])
    assert got == "ok" or got == "ok "
    assert s.flush().endswith("\ufffd")


def test_save_and_reload_matches_transformers(tok, ref, tmp_path):
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tok.chat_template and cfg["eos_token"] == "<|im_end|>"
    again = load_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text) == hf.encode(text), text
    assert hf.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True) == \
        again.apply_chat_template(CHATS[1])
    assert (hf.eos_token_id, hf.bos_token_id) == (again.eos_token_id, again.bos_token_id)


def test_hf_dir_with_bos_post_processor(tok, tmp_path):
    # GGUF add_bos_token=True -> the tokenizer inserts BOS, and a saved copy keeps doing so.
    meta_tok = Tokenizer(tok.backend.__class__.from_str(tok.backend.to_str()), special=tok.special,
                         chat_template=tok.chat_template, add_bos_token=True)
    meta_tok._set_post_processor()
    assert meta_tok.encode("hi")[0] == tok.bos_token_id
    assert meta_tok.encode("hi", add_special_tokens=False) == tok.encode("hi")
    meta_tok.save(tmp_path)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("hi")[0] == tok.bos_token_id


def test_chat_template_sandbox_and_helpers(tok):
    user = [{"role": "user", "content": "<b>&"}]
    t = "{{ messages[0].content | tojson }}|{{ bos_token }}|{{ strftime_now('%Y') | length }}"
    assert tok.apply_chat_template(user, chat_template=t) == '"<b>&"|<|im_start|>|4'
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system"):
        tok.apply_chat_template(user, chat_template="{{ raise_exception('no system') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(user, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(user, chat_template="{% set ns = namespace(__x=1) %}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable sandbox: no mutating lists
        tok.apply_chat_template(user, chat_template="{{ messages.append(1) }}")
    # trim_blocks / lstrip_blocks as transformers sets them
    t = "{% for m in messages %}\n  {% if true %}\n{{ m.role }}\n  {% endif %}\n{% endfor %}"
    assert tok.apply_chat_template(user, chat_template=t) == "user\n"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert tok.apply_chat_template(user, tools=tools, chat_template="{{ tools[0].function.name }}") == "f"
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer source"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_reads_directory_saved_by_transformers(tok, ref, tmp_path):
    ref.save_pretrained(tmp_path)  # transformers 5 writes chat_template.jinja beside tokenizer_config.json
    ours = load_tokenizer(tmp_path)
    for text in SAMPLES:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.apply_chat_template(CHATS[1]) == ref.apply_chat_template(CHATS[1], tokenize=False,
                                                                       add_generation_prompt=True)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)


def test_gguf_tokenizer_metadata_of_the_wrong_type_is_a_checkpoint_error():
    """GGUF metadata is untrusted: a value of the wrong type (an array of ints for the tokens, a string for a
    token id, ...) raises the project's error naming the file, never a TypeError from deep inside."""
    from giants.checkpoint import CheckpointError
    from giants.tokenizer import _byte_alphabet

    toks = [_byte_alphabet()[i] for i in range(256)]
    good = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": toks, "tokenizer.ggml.token_type": [1] * 256,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.pre": "gpt-2", "tokenizer.chat_template": "{{ messages[0].content }}"}
    assert Tokenizer.from_gguf_metadata(good, source="m.gguf").encode("hi") == [ord("h"), ord("i")]
    for key, value in (("tokenizer.ggml.tokens", list(range(256))), ("tokenizer.ggml.tokens", [*toks[:-1], None]),
                       ("tokenizer.ggml.token_type", ["1"] * 256), ("tokenizer.ggml.merges", [1, 2]),
                       ("tokenizer.ggml.merges", "a b"), ("tokenizer.ggml.bos_token_id", "1"),
                       ("tokenizer.ggml.eos_token_id", 1.5), ("tokenizer.ggml.eot_token_id", 10**6),
                       ("tokenizer.ggml.pre", 7), ("tokenizer.chat_template", [1, 2]),
                       ("tokenizer.ggml.pre", "gpt-5"), ("tokenizer.ggml.model", "bert"),
                       ("tokenizer.ggml.add_bos_token", "yes"), ("tokenizer.ggml.scores", ["0"] * 256),
                       ("tokenizer.ggml.tokens", [*toks[:-1], toks[0]])):
        with pytest.raises(CheckpointError, match=r"^m\.gguf: "):
            Tokenizer.from_gguf_metadata({**good, key: value}, source="m.gguf")


def test_tokenizer_config_with_malformed_chat_template(tok, tmp_path):
    from giants.checkpoint import CheckpointError

    tok.save(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "default", "template": "{{ 'x' }}"}, {"name": "tool_use", "template": "t"}]
    cfg_path.write_text(json.dumps(cfg))
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "x"
    cfg["chat_template"] = 5
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tokenizer_config.json: chat_template must be"):
        load_tokenizer(tmp_path)
