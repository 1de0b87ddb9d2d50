"""LoRA adapters: start equal to the base, train only adapters, merge, save as HF, load in transformers."""

from __future__ import annotations

import pytest
import torch

import giants
from giants.train.lora import apply_lora, has_lora, lora_disabled, lora_parameters, merge_lora


def _randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.05)  # B starts at zero; give it values so the merge is not trivial


@pytest.mark.parametrize("preset,targets", [
    ("tiny-llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("tiny-mixtral", ("q_proj", "v_proj", "router", "w_gate", "w_up", "w_down")),
    ("tiny-gpt-oss", ("q_proj", "o_proj", "w_gate", "w_down")),
    ("tiny-gemma2", ("q_proj", "k_proj", "down_proj")),
])
def test_lora_merge_saves_hf_that_transformers_loads(tmp_path, preset, targets):
    import transformers

    model = giants.build(giants.get_config(preset), seed=0).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        base = model(ids)
    names = apply_lora(model, rank=4, alpha=8.0, targets=targets)
    assert len(names) == len(targets) * model.config.n_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base)  # B = 0: the adapted model starts as the base
    _randomise_adapters(model)
    with torch.no_grad():
        adapted = model(ids)
        with lora_disabled(model):
            torch.testing.assert_close(model(ids), base)
    assert (adapted - base).abs().max() > 1e-3
    merge_lora(model)
    assert not has_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), adapted, rtol=1e-4, atol=1e-4)
    giants.save(model, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, adapted, rtol=1e-4, atol=1e-4)


def test_lora_training_touches_only_adapters(tmp_path):
    from giants.train import TrainConfig, Trainer
    from giants.train.data import prepare

    (tmp_path / "t.txt").write_text("abc def ghi " * 300)
    prepare(tmp_path / "t.txt", "bytes", tmp_path / "ds")
    cfg = TrainConfig(out=str(tmp_path / "run"), preset="tiny-llama", data=str(tmp_path / "ds"), tokenizer="bytes",
                      overrides={"vocab_size": 320}, steps=4, seq_len=32, batch_size=2, lr=1e-2, lora_rank=4,
                      lora_targets=("q_proj", "v_proj", "up_proj"), progress=False, eval_every=0, ckpt_every=2)
    tr = Trainer(cfg)
    frozen = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
    tr.run()
    assert all(torch.equal(p, frozen[n]) for n, p in tr.model.named_parameters() if n in frozen)
    assert all(float(p.detach().abs().sum()) > 0 for n, p in lora_parameters(tr.model).items() if "lora_B" in n)
    # the checkpoint holds only the adapters; resuming restores them exactly
    ck = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert (ck / "adapter.safetensors").is_file() and not (ck / "model").exists()
    again = Trainer(TrainConfig(**{**cfg.__dict__, "resume": True}))
    a, b = lora_parameters(tr.model), lora_parameters(again.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # the final directory is the merged model
    merged = giants.load(tmp_path / "run" / "final")
    ids = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), tr.model.eval()(ids), rtol=1e-4, atol=1e-4)


def test_lora_bad_targets():
    model = giants.build(giants.get_config("tiny-llama"), seed=0)
    with pytest.raises(ValueError, match=r"lora targets \['qproj'\] match no nn.Linear"):
        apply_lora(model, targets=("qproj",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(model, rank=0)
