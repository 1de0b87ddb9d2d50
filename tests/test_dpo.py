"""DPO with a frozen reference raises the chosen-minus-rejected margin on a toy preference set."""

from __future__ import annotations

import json

import pytest
import torch

import giants
from giants.train import TrainConfig, Trainer
from giants.train.finetune_data import collate, dpo_pair, load_dpo
from giants.train.losses import sequence_logprobs

PAIRS = [("Is the sky blue?", "Yes, it is blue.", "No."), ("Is fire hot?", "Yes, fire is hot.", "No."),
         ("Is ice cold?", "Yes, ice is cold.", "No."), ("Is water wet?", "Yes, water is wet.", "No.")]


@pytest.fixture(scope="module")
def tok():
    return giants.load_tokenizer("smollm2-135m")


@pytest.fixture()
def pref_file(tmp_path):
    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return f


def _margin(policy, reference, pairs, pad) -> float:
    ex = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids, labels, _ = collate(ex, 256, pad)
    with torch.no_grad():
        lp, ref = sequence_logprobs(policy(ids), labels), sequence_logprobs(reference(ids), labels)
    n = len(pairs)
    return float(((lp[:n] - ref[:n]) - (lp[n:] - ref[n:])).mean())


def test_dpo_pair_masks_the_prompt(tok):
    pair = dpo_pair(tok, "Is the sky blue?", "Yes.", "No.")
    for ex, answer in ((pair.chosen, "Yes."), (pair.rejected, "No.")):
        trained = [ex.ids[t + 1] for t in range(len(ex.ids) - 1) if ex.labels[t] != -100]
        assert tok.decode(trained) == f"{answer}<|im_end|>\n"
    n_prompt = next(t for t in range(len(pair.chosen.ids)) if pair.chosen.labels[t] != -100)
    assert pair.chosen.ids[:n_prompt + 1] == pair.rejected.ids[:n_prompt + 1]  # same prompt prefix


@pytest.mark.parametrize("lora", [0, 4])
def test_dpo_raises_margin(tmp_path, tok, pref_file, lora):
    """Full finetuning keeps a frozen copy as the reference; with LoRA the reference is the base model
    with adapters switched off."""
    cfg = TrainConfig(out=str(tmp_path / "run"), task="dpo", preset="tiny-llama", data=str(pref_file), steps=10,
                      batch_size=4, seq_len=128, lr=2e-3 if not lora else 1e-2, warmup_steps=1, dpo_beta=0.5,
                      lora_rank=lora, lora_targets=("q_proj", "v_proj", "gate_proj", "down_proj"), progress=False,
                      eval_every=0, checkpoint_at_end=False, save_final=bool(lora))
    tr = Trainer(cfg)
    pairs = load_dpo(pref_file, tok)
    reference = giants.build(tr.model_config, seed=0).eval()  # the initial weights, as the run started
    assert _margin(tr.model, reference, pairs, tok.pad_token_id) == pytest.approx(0.0, abs=1e-5)
    tr.run()
    margins = [h["margin"] for h in tr.history]
    assert abs(margins[0]) < 1e-6  # policy == reference at step 1
    after = _margin(tr.model, reference, pairs, tok.pad_token_id)
    assert after > 1.0 and margins[-1] > 0.3
    assert tr.history[-1]["accuracy"] == 1.0
    assert tr.history[-1]["train_loss"] < 0.69  # below -log sigmoid(0)
    if lora:
        assert tr.reference is None  # no second model in memory
        merged = giants.load(tmp_path / "run" / "final").eval()
        assert _margin(merged, reference, pairs, tok.pad_token_id) == pytest.approx(after, rel=1e-3, abs=1e-3)


def test_dpo_data_errors(tok, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r'bad.jsonl:1: missing field "rejected"'):
        load_dpo(f, tok)
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": ""}) + "\n")
    with pytest.raises(ValueError, match="non-empty strings"):
        load_dpo(f, tok)


def test_dpo_grad_accum_equals_one_batch(tmp_path, pref_file):
    """DPO averages over pairs: 2 micro-batches of 2 pairs give the loss and gradients of one batch of 4."""
    def first_step(tr):
        seen = {}
        step = tr.optimizer.step

        def capture(*a, **kw):
            seen.update({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
            return step(*a, **kw)

        tr.optimizer.step = capture
        m = tr.train_step()
        return m, seen

    def trainer(name, **kw):
        return Trainer(TrainConfig(out=str(tmp_path / name), task="dpo", preset="tiny-llama", data=str(pref_file),
                                   steps=2, seq_len=64, lr=1e-3, grad_clip=0.0, dpo_beta=0.5, progress=False,
                                   eval_every=0, checkpoint_at_end=False, save_final=False,
                                   overrides={"n_layers": 2}, **kw))

    # step 2: policy != reference, so the loss and its gradients are not at their symmetric starting point
    one, many = trainer("one", batch_size=4), trainer("many", batch_size=2, grad_accum=2)
    one.train_step()
    many.train_step()
    (m1, g1), (mn, gn) = first_step(one), first_step(many)
    assert mn["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    assert mn["margin"] == pytest.approx(m1["margin"], rel=1e-4, abs=1e-6)
    assert g1.keys() == gn.keys() and g1
    for n in g1:
        torch.testing.assert_close(gn[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_dpo_progress_shows_margin_and_accuracy(tmp_path, pref_file, capsys):
    """Beside the loss, the progress (here the plain lines of a stdout that is not a terminal) shows the reward
    margin and accuracy."""
    tr = Trainer(TrainConfig(out=str(tmp_path / "run"), task="dpo", preset="tiny-llama", data=str(pref_file), steps=2,
                             batch_size=2, seq_len=64, lr=1e-3, dpo_beta=0.5, progress=True, log_seconds=0,
                             eval_every=0, checkpoint_at_end=False, save_final=False, overrides={"n_layers": 2}))
    tr.run()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train step")]
    assert [ln.split()[2] for ln in lines] == ["1/2", "2/2"]
    m = tr.history[-1]
    assert f"margin {m['margin']:.4f}  acc {100 * m['accuracy']:.0f}%" in lines[-1]
