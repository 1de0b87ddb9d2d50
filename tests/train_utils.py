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
