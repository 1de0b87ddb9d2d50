"""TrainConfig.residual_dtype="bf16": the training loss carries the residual stream in bf16 (Megatron-LM's default),
on CPU under bf16 autocast here; the default "fp32" is what autocast over fp32 weights computes."""

from __future__ import annotations

import pytest
import torch

from giants.train import TrainConfig, Trainer
from giants.train import trainer as trainer_mod
from giants.train.tied_head import scatter_embedding_grad
from train_utils import master_cfg


def _cfg(out, data, **kw) -> TrainConfig:
    return master_cfg(out, data, **{"ckpt_every": 0, "save_final": False, **kw})


def _stream_dtypes(tr: Trainer) -> tuple[list[torch.dtype], dict[str, torch.Tensor], float]:
    """The dtype of every block's residual input, the gradients and the loss of one micro-batch."""
    seen: list[torch.dtype] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)) for b in tr.model.layers]
    loss, info, _ = tr._next_micro()
    for h in hooks:
        h.remove()
    loss.backward()
    if "lookup" in info:
        scatter_embedding_grad(*info.pop("lookup"))
    return seen, {n: p.grad.float().clone() for n, p in tr.model.named_parameters()}, float(loss.detach())


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_residual_stream(tmp_path, byte_data, monkeypatch, tied):
    if tied:  # the tied head's path: the rows come from the optimizer's bf16 copy
        monkeypatch.setattr(trainer_mod, "TIED_HEAD_DEVICES", ("cuda", "cpu"))
    over = {"vocab_size": 320, "n_layers": 2, "tie_embeddings": tied}
    ref = Trainer(_cfg(tmp_path / "fp32", byte_data, overrides=over))
    ours = Trainer(_cfg(tmp_path / "bf16", byte_data, overrides=over, residual_dtype="bf16"))
    assert (ours.tied_head is not None) == tied
    dt_ref, g_ref, loss_ref = _stream_dtypes(ref)
    dt, g, loss = _stream_dtypes(ours)
    assert dt_ref == [torch.float32] * 2 and dt == [torch.bfloat16] * 2
    assert loss == pytest.approx(loss_ref, rel=2e-2)
    assert g.keys() == g_ref.keys()
    for n in g:
        assert g[n].dtype == torch.float32 and torch.isfinite(g[n]).all(), n
        cos = torch.nn.functional.cosine_similarity(g[n].flatten(), g_ref[n].flatten(), dim=0)
        assert cos > 0.98, (n, float(cos))
    ours.run()  # trains, and the loss falls
    assert ours.history[-1]["train_loss"] < ours.history[0]["train_loss"]


def test_residual_dtype_checks(tmp_path, byte_data):
    with pytest.raises(ValueError, match="residual_dtype"):
        TrainConfig(out=str(tmp_path / "a"), preset="tiny-llama", residual_dtype="fp16").validate()
    with pytest.raises(ValueError, match="residual_dtype: 'bf16' needs bf16"):
        Trainer(_cfg(tmp_path / "b", byte_data, precision="fp32", master_weights=None, residual_dtype="bf16"))
    with pytest.raises(ValueError, match="residual_dtype: 'bf16' needs bf16 precision"):
        Trainer(_cfg(tmp_path / "c", byte_data, precision="auto", master_weights=None, residual_dtype="bf16"))
