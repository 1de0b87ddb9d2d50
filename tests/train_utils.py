"""Helpers shared by the training tests on CPU and CUDA."""

from __future__ import annotations

import pytest
import torch


def assert_nan_stop_keeps_masters(tr) -> None:
    """`tr` (a master-weights Trainer) has run 2 of its steps: a NaN put into a q_proj master stops the next
    step with TrainingDiverged, and every master is left as it was (the device skipped the queued updates)."""
    from giants.train import TrainingDiverged

    q_proj = tr.model.layers[0].attn.q_proj.weight
    i = next(i for i, p in enumerate(tr.optimizer.model_params) if p is q_proj)
    with torch.no_grad():
        tr.optimizer.masters[i][0, 0] = float("nan")
        tr.optimizer.sync_model()
    before = [q.clone() for q in tr.optimizer.masters]
    with pytest.raises(TrainingDiverged, match="at step 3"):
        tr.run()
    assert tr.step == 2
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(tr.optimizer.masters, before))


def master_cfg(out, data, **kw):
    """A 2-layer tiny-llama run on byte tokens with bf16 compute and master weights, on CPU."""
    from giants.train import TrainConfig

    base = dict(out=str(out), preset="tiny-llama", data=str(data), tokenizer="bytes", steps=4, seq_len=32,
                batch_size=2, lr=3e-3, progress=False, eval_every=0, eval_batches=1, ckpt_every=2,
                save_final=True, device="cpu", precision="bf16", master_weights=True,
                overrides={"vocab_size": 320, "n_layers": 2})
    base.update(kw)
    return TrainConfig(**base)


def assert_resume_bit_exact(cfg, tmp_path):
    """Runs cfg(out_dir, **kw) to the end, and again interrupted after step 3 (last checkpoint: step 2) and resumed:
    the logged losses and gradient norms and the final masters are equal bit for bit. Returns (full, resumed)."""
    import json

    from giants.train import Trainer

    full = Trainer(cfg(tmp_path / "full"))
    full.run()
    part = Trainer(cfg(tmp_path / "part"))
    part.run(until=3)
    del part
    resumed = Trainer(cfg(tmp_path / "part", resume=True))
    assert resumed.step == 2
    resumed.run()

    def col(run, key):
        return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]

    for key in ("train_loss", "grad_norm"):
        assert col(tmp_path / "full", key) == col(tmp_path / "part", key)
    for x, y in zip(full.optimizer.masters, resumed.optimizer.masters):
        assert torch.equal(x, y)
    return full, resumed


def first_step_grads(tr) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as the optimizer applies it in the Trainer's first step."""
    from giants.train.optim import MasterAdamW

    seen: dict[str, torch.Tensor] = {}
    step = tr.optimizer.step

    def capture(*a, **kw):
        for n, p in tr.model.named_parameters():
            g = tr.optimizer.grad_of(p) if isinstance(tr.optimizer, MasterAdamW) else p.grad
            seen[n] = g.clone()
        return step(*a, **kw)

    tr.optimizer.step = capture
    tr.train_step()
    return seen


def random_ids_dataset(root, vocab: int = 320, docs: int = 8, tokens: int = 3000):
    """A prepared dataset of `docs` documents of random token ids under root / "ds" (the CUDA trainer tests)."""
    import numpy as np

    from giants.train.data import prepare_documents

    class Ids:
        vocab_size, eos_token_id = vocab, vocab - 1

        def encode_batch(self, texts, add_special_tokens=False):
            rng = np.random.default_rng(0)
            return [rng.integers(0, vocab - 1, int(t)).tolist() for t in texts]

    prepare_documents([(f"d{i}", str(tokens)) for i in range(docs)], Ids(), root / "ds", tokenizer_name="ids",
                      val_fraction=0.1)
    return root / "ds"
