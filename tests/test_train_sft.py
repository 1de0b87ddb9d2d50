"""SFT on chat JSONL: the loss sees assistant tokens only, through the chat template."""

from __future__ import annotations

import json

import pytest
import torch

import giants
from giants.train import TrainConfig, Trainer
from giants.train.finetune_data import collate, load_sft, sft_example
from giants.train.losses import IGNORE_INDEX, causal_lm_loss

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."}]


@pytest.fixture(scope="module")
def tok():
    return giants.load_tokenizer("smollm2-135m")


def test_sft_masks_everything_but_assistant_turns(tok):
    ex = sft_example(tok, CHAT)
    # the ids are exactly the tokenised chat template rendering
    full = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert ex.ids == tok.encode(full, add_special_tokens=False)
    trained = [t + 1 for t in range(len(ex.ids) - 1) if ex.labels[t] != IGNORE_INDEX]
    assert all(ex.labels[t - 1] == ex.ids[t] for t in trained)
    assert tok.decode([ex.ids[t] for t in trained]) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    # system, user and the template's headers are never targets
    masked = tok.decode([ex.ids[t + 1] for t in range(len(ex.ids) - 1) if ex.labels[t] == IGNORE_INDEX])
    for text in ("Be brief.", "Capital of France?", "And Italy?", "<|im_start|>assistant", "<|im_start|>user"):
        assert text in masked
    assert "Paris" not in masked and "Rome" not in masked
    assert ex.labels[-1] == IGNORE_INDEX


def test_sft_loss_ignores_non_assistant_tokens(tok):
    """Changing the user's words changes the inputs but not which positions count, and the loss equals a
    cross-entropy over the assistant positions alone."""
    model = giants.build(giants.get_config("tiny-llama"), seed=0)
    ids, labels, mask = collate([sft_example(tok, CHAT)], 256, tok.pad_token_id)
    logits = model(ids)
    pos = (labels != IGNORE_INDEX).nonzero()
    ref = torch.nn.functional.cross_entropy(logits[pos[:, 0], pos[:, 1]], labels[pos[:, 0], pos[:, 1]])
    torch.testing.assert_close(causal_lm_loss(logits, labels), ref)
    assert int((labels != IGNORE_INDEX).sum()) == 8


def test_collate_pads_right_and_truncates(tok):
    a, b = sft_example(tok, CHAT), sft_example(tok, CHAT[1:3])
    ids, labels, mask = collate([a, b], 256, pad_id=tok.pad_token_id)
    assert ids.shape == (2, len(a.ids)) and int(mask[1].sum()) == len(b.ids)
    assert (ids[1, len(b.ids):] == tok.pad_token_id).all() and (labels[1, len(b.ids) - 1:] == IGNORE_INDEX).all()
    ids, labels, mask = collate([a], 10, pad_id=0)
    assert ids.shape == (1, 10) and labels[0, -1] == IGNORE_INDEX


def test_sft_data_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="no assistant message"):
        sft_example(tok, CHAT[:2])
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n" + '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"chat.jsonl:2: every message needs"):
        load_sft(f, tok)
    f.write_text("not json\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: invalid JSON"):
        load_sft(f, tok)
    f.write_text("")
    with pytest.raises(ValueError, match="no examples"):
        load_sft(f, tok)


def test_sft_training_run(tok, tmp_path):
    data = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
             for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    tr = Trainer(TrainConfig(out=str(tmp_path / "run"), task="sft", preset="tiny-llama", data=str(data),
                             val_data=str(data), steps=12, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=1,
                             progress=False, eval_every=0, eval_batches=1, checkpoint_at_end=False))
    first = tr.evaluate()["val_loss"]
    summary = tr.run()
    assert summary["val_loss"] < first - 1.0
    # the final model directory carries the tokenizer with its chat template
    assert giants.load_tokenizer(str(tmp_path / "run" / "final")).chat_template


def _chat_file(tmp_path):
    """Conversations whose answers differ in length, so micro-batches hold different numbers of target tokens."""
    data = tmp_path / "chat.jsonl"
    answers = ["7", "The answer is eleven, as anyone who counts on their fingers will find.", "no",
               "Fifteen: eight and seven make fifteen, and that is the whole of it."]
    convs = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]
             for i, a in enumerate(answers)]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return data


def _first_step(tr: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """The first step's reported loss and the gradients the optimizer applies."""
    seen: dict[str, torch.Tensor] = {}
    step = tr.optimizer.step

    def capture(*a, **kw):
        seen.update({n: p.grad.clone() for n, p in tr.model.named_parameters()})
        return step(*a, **kw)

    tr.optimizer.step = capture
    return tr.train_step()["train_loss"], seen


@pytest.mark.parametrize("accum", [2, 4])
def test_sft_grad_accum_weights_micro_batches_by_target_tokens(tok, tmp_path, accum):
    """grad_accum x batch_size/grad_accum gives the one-batch loss and gradients (the sum of the token losses over
    the whole step / its target tokens), not the mean of the micro-batches' means."""
    data = _chat_file(tmp_path)

    def trainer(name, **kw):
        return Trainer(TrainConfig(out=str(tmp_path / name), task="sft", preset="tiny-llama", data=str(data),
                                   steps=1, seq_len=64, lr=1e-3, grad_clip=0.0, progress=False, eval_every=0,
                                   checkpoint_at_end=False, save_final=False, overrides={"n_layers": 2}, **kw))

    one = trainer("one", batch_size=4)
    many = trainer("many", batch_size=4 // accum, grad_accum=accum)
    # the accumulating run's micro-batches: the one-batch run's items, in order, holding unequal target counts
    # (a mean of their means would weight a short answer's tokens like a long one's)
    state = many.reader.state_dict()
    counts = [int((collate(many.reader.next_items(), 64, tok.pad_token_id)[1] != IGNORE_INDEX).sum())
              for _ in range(accum)]
    many.reader.load_state_dict(state)
    assert len(set(counts)) > 1
    loss1, g1 = _first_step(one)
    lossn, gn = _first_step(many)
    assert lossn == pytest.approx(loss1, rel=1e-5)
    assert g1.keys() == gn.keys()
    for n in g1:
        torch.testing.assert_close(gn[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)
