"""`giants train --init` under scale-out (giants.parallel.init_checkpoint): the model is built on the meta device,
parallelized there, and each rank fills only its shards from the checkpoint, one full tensor at a time. Each rank's
shards equal the matching slices of `giants.load(path, dtype=float32)` for HF exports (bf16 on disk, tied
embeddings, stacked Mixtral experts, MXFP4 gpt-oss experts), giants-named directories and GGUF; through the
trainer, a tensor-parallel run from --init gives the one-process losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import giants
from dist_utils import run_ranks
from parallel_init_workers import VOCAB, checkpoint_cases_worker
from subprocess_utils import together

# name -> (twin, how it is saved, layout)
CASES = {
    "fsdp/tiny-llama/hf-bf16": ("tiny-llama", "hf-bf16", {}),
    "tp/tiny-gemma2/hf (tied)": ("tiny-gemma2", "hf", dict(tp=2)),
    "ep/tiny-mixtral/hf": ("tiny-mixtral", "hf", dict(ep=2)),
    "pp/tiny-llama/hf": ("tiny-llama", "hf", dict(pp=2)),
    "pp/tiny-gemma2/hf (tied)": ("tiny-gemma2", "hf", dict(pp=2)),
    "ep/tiny-gpt-oss/mxfp4": ("tiny-gpt-oss", "mxfp4", dict(ep=2)),
    "tp/tiny-llama/giants-names": ("tiny-llama", "giants", dict(tp=2)),
    "tp/tiny-llama/gguf": ("tiny-llama", "gguf", dict(tp=2)),
}


def _save(twin: str, how: str, root: Path) -> Path:
    cfg = giants.get_config(twin).replace(vocab_size=VOCAB)
    model = giants.build(cfg, seed=5)
    with torch.no_grad():  # norms away from 1 and zero biases away from 0, so a wrong copy shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = root / f"{twin}-{how}"
    if how == "gguf":
        from test_gguf import write_gguf

        path.mkdir()
        return write_gguf(model, path / "m.gguf", "llama")
    if how == "hf-bf16":
        giants.save(model, path, dtype="bfloat16", max_shard_size="100KB")  # several shards + an index
    elif how == "mxfp4":
        giants.save(model, path, quantize="mxfp4")
    else:
        giants.save(model, path, format="giants" if how == "giants" else "hf")
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("init-ckpt")
    saved = {(t, h): _save(t, h, root) for t, h, _ in set((t, h, None) for t, h, _ in CASES.values())}
    cases = [dict(path=str(saved[t, h]), dims=d) for t, h, d in CASES.values()]
    per_rank = run_ranks(checkpoint_cases_worker, 2, cases, timeout=600)
    return {k: [r[i] for r in per_rank] for i, k in enumerate(CASES)}


@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_fills_its_shards_from_the_checkpoint(results, name):
    ranks = results[name]
    for rank, r in enumerate(ranks):
        where = f"{name} rank {rank}"
        assert r["meta_after_build"] and r["meta_after_plan"], f"{where}: a weight was allocated before the plan"
        assert r["worst"] == 0.0, f"{where}: shards differ from giants.load(path, dtype=float32) by {r['worst']}"
        # one full parameter at a time, never the model (nor a fused tensor bigger than a parameter)
        assert r["largest_op_bytes"] <= r["largest_param_bytes"], where
        assert r["largest_scratch"] <= r["largest_param"], where
        assert r["local_numel"] <= 0.6 * r["full_numel"] + 0.05 * r["full_numel"], where
    assert set().union(*(r["names"] for r in ranks)) == set(ranks[0]["all_names"]), name
    if not name.startswith("pp/"):
        assert all(r["n_dtensor"] for r in ranks), name
        assert all(r["read_numel"] == r["full_numel"] for r in ranks), name  # every rank holds a part of each
    else:  # a pipeline stage reads its own parameters from the file, no other stage's
        for r in ranks:
            assert r["read_numel"] == r["pp_numel"] < r["full_numel"], (name, r["read_numel"], r["pp_numel"])


def test_fp8_checkpoint_is_refused_by_name(tmp_path):
    from giants.parallel.init_checkpoint import InitRefused, checkpoint_tensors

    path = _save("tiny-llama", "hf", tmp_path)
    conf = json.loads((path / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(InitRefused, match="--init FP8 checkpoint under scale-out"):
        checkpoint_tensors(path, giants.get_config("tiny-llama").replace(vocab_size=VOCAB))


def test_bad_checkpoint_is_refused_before_any_shard_exists(tmp_path):
    from giants.checkpoint.errors import CheckpointError
    from giants.parallel.init_checkpoint import materialize_from_checkpoint

    path = _save("tiny-llama", "hf", tmp_path)
    cfg = giants.get_config("tiny-llama").replace(vocab_size=VOCAB)
    model = giants.build(cfg.replace(d_model=32, head_dim=8), device="meta")
    with pytest.raises(CheckpointError):
        materialize_from_checkpoint(model, path, cfg.replace(d_model=32, head_dim=8), "cpu")
    assert all(p.is_meta for p in model.parameters())


# ---- through the trainer ------------------------------------------------------------------------------------
def _train(out: Path, data: Path, init: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    from test_train_distributed import _env

    launch = [sys.executable, "-m", "giants"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "-m", "giants"]
    cmd = [*launch, "train", "--init", str(init), "--tokenizer", "bytes", "--seq-len", "32", "--batch-size", "4",
           "--lr", "3e-3", "--eval-every", "0", "--quiet", "--device", "cpu", "--steps", "2", "--no-final",
           "--data", str(data), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc



def test_trainer_init_under_tensor_parallel_matches_one_process(tmp_path, byte_data):
    from test_train_distributed import _assert_losses

    cfg = giants.get_config("tiny-llama").replace(vocab_size=320)
    init = tmp_path / "init"
    giants.save(giants.build(cfg, seed=3), init)
    _, tp = together(_train, ((tmp_path / "one", byte_data, init), {}),
                            ((tmp_path / "tp", byte_data, init, "--tp", "2"), dict(nproc=2)))
    _assert_losses(tmp_path / "tp", tmp_path / "one", [1, 2])
    assert "fills them from the checkpoint" in tp.stderr


def test_dpo_from_init_over_fsdp_ranks_matches_one_process(tmp_path):
    """DPO's frozen reference takes the same path (meta build, plan, shards filled from --init)."""
    from test_train_distributed import _assert_losses

    data = tmp_path / "data.jsonl"
    answers = ["7", "The answer is eleven, as anyone who counts on their fingers will find.", "no",
               "Fifteen: eight and seven make fifteen, and that is the whole of it.", "Yes.",
               "Two, since one and one make two.", "Four hundred and twenty, give or take.", "ok"]
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": a, "rejected": answers[-1 - i]}) + "\n"
                            for i, a in enumerate(answers)))
    init = tmp_path / "init"
    giants.save(giants.build(giants.get_config("tiny-llama"), seed=3), init)
    args = ["--task", "dpo", "--tokenizer", "smollm2-135m", "--seq-len", "64", "--grad-accum", "2",
            "--grad-clip", "0", "--lr", "1e-5"]
    together(_train, ((tmp_path / "one", data, init, *args), {}),
                    ((tmp_path / "dp", data, init, *args, "--dp-shard", "2"), dict(nproc=2)))
    _assert_losses(tmp_path / "dp", tmp_path / "one", [1, 2])
