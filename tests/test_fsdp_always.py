"""`--fsdp-always`: FSDP2 over a data-parallel degree of 1 (one process, no torchrun) trains the one-process run's
losses, with its parameters sharded as DTensors (the wrap is real, not skipped because the degree is 1)."""

from __future__ import annotations

import json

import giants
from test_train_distributed import _assert_losses, _train


def test_fsdp_over_one_rank_matches_the_plain_run(tmp_path, byte_data):
    args = ["--steps", "3", "--ckpt-every", "3"]
    _train(tmp_path / "one", byte_data, *args)
    proc = _train(tmp_path / "fsdp1", byte_data, *args, "--fsdp-always")
    # counted from the wrapped model's parameters: tiny-llama's every parameter is a DTensor shard
    n_params = len(list(giants.build(giants.get_config("tiny-llama").replace(vocab_size=320), "meta").parameters()))
    note = f"FSDP2 over one data-parallel rank (--fsdp-always): {n_params} DTensor parameters"
    assert note in proc.stderr
    run = json.loads((tmp_path / "fsdp1" / "run.json").read_text())
    assert note in json.dumps(run)
    # the checkpoint is the sharded (DCP) kind, which only the scale-out path writes
    assert any((tmp_path / "fsdp1" / "checkpoints").glob("step_*/dcp"))
    _assert_losses(tmp_path / "fsdp1", tmp_path / "one", [1, 2, 3])
