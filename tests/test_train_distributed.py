"""`giants train` scaled out under real torchrun processes (CPU, gloo): tensor parallel and FSDP runs give the
one-process losses, DCP checkpoints resume on another layout and in one process, a dead rank stops the job with
that rank named, bad layouts are refused before anything starts, and the exported model loads in giants and
transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from giants.parallel.layout import LayoutError
from giants.train import TrainConfig
from subprocess_utils import together

TINY = ["--preset", "tiny-llama", "--tokenizer", "bytes", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3",
        "--eval-every", "0", "--eval-batches", "1", "--quiet", "--set", "vocab_size=320", "--device", "cpu"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _train(out: Path, data: Path, *args: str, nproc: int = 1, timeout: float = 240, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """`giants train` in one process, or under torchrun with `nproc` processes."""
    launch = [sys.executable, "-m", "giants"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "-m", "giants"]
    cmd = [*launch, "train", *TINY, "--data", str(data), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc



def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_losses(run: Path, ref: Path, steps: list[int], rel: float = 1e-5) -> None:
    got, want = {r["step"]: r for r in _rows(run)}, {r["step"]: r for r in _rows(ref)}
    assert sorted(got) == steps
    for k in steps:
        assert got[k]["train_loss"] == pytest.approx(want[k]["train_loss"], rel=rel), (run.name, k)
        # (the gradient norm after AdamW's first updates, which are about lr x the sign of each gradient entry, carries
        # float rounding of entries near zero further)
        assert got[k]["grad_norm"] == pytest.approx(want[k]["grad_norm"], rel=1e-4), (run.name, k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, byte_data):
    """One process (the reference) and tensor parallel over 2 processes, 4 steps, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("dist")
    args = ["--steps", "4", "--ckpt-every", "2"]
    _, tp = together(_train, ((root / "one", byte_data, *args), {}),
                            ((root / "tp", byte_data, *args, "--tp", "2"), dict(nproc=2)))
    return root, tp


def test_tensor_and_fully_sharded_runs_match_one_process(runs, byte_data):
    root, tp = runs
    _assert_losses(root / "tp", root / "one", [1, 2, 3, 4])
    # the layout and what fell back from the one-device path are said once, by rank 0
    said = [ln for ln in tp.stderr.splitlines() if "scale-out over 2 processes" in ln]
    assert len(said) == 1 and "tp 2" in said[0] and "torch AdamW" in said[0] and "vocab-parallel" in said[0]
    rows = _rows(root / "tp")
    assert all(r["world_size"] == 2 and r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2)
               for r in rows)
    assert rows[-1]["val_loss"] == pytest.approx(_rows(root / "one")[-1]["val_loss"], rel=1e-5)
    assert json.loads((root / "tp" / "run.json").read_text())["parallel"]["tp"] == 2
    fsdp = root / "fsdp"
    _train(fsdp, byte_data, "--steps", "4", "--dp-shard", "2", "--no-final", nproc=2)
    _assert_losses(fsdp, root / "one", [1, 2, 3, 4])


def test_sharded_checkpoint_resumes_on_another_layout_and_in_one_process(runs, byte_data):
    from giants.train.checkpoint import verify

    root, _ = runs
    step2 = root / "tp" / "checkpoints" / "step_00000002"
    assert verify(step2)["sharded"]["tp"] == 2 and (step2 / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (step2 / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    args = ["--steps", "4", "--no-final", "--resume", str(step2)]
    together(_train, ((root / "on-fsdp", byte_data, *args, "--dp-shard", "2"), dict(nproc=2)),
                    ((root / "on-one", byte_data, *args), {}),  # one process, no process group: DCP read whole
                    # and a one-device checkpoint resumes under scale-out
                    ((root / "from-one", byte_data, *args[:-1], str(root / "one" / "checkpoints" / "step_00000002"),
                      "--tp", "2"), dict(nproc=2)))
    _assert_losses(root / "on-fsdp", root / "one", [3, 4])
    _assert_losses(root / "on-one", root / "one", [3, 4])
    # (torch 2.11's tensor-parallel rounding put step 4 at 1.4e-5 relative once)
    _assert_losses(root / "from-one", root / "one", [3, 4], rel=5e-5)


def test_exported_model_loads_in_giants_and_transformers(runs):
    import transformers

    import giants

    root, _ = runs
    final = root / "tp" / "final"
    ours = giants.load(final).eval()
    ref = giants.load(root / "one" / "final").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final), local_files_only=True,
                                                           torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ours(ids), hf(ids).logits, ref(ids)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-4)  # the one-process run's model, to training's rounding


def test_dead_rank_stops_the_job_naming_it(tmp_path, byte_data):
    out = tmp_path / "killed"
    t0 = time.monotonic()
    proc = _train(out, byte_data, "--steps", "6", "--dp-shard", "2", "--dist-timeout", "20", "--no-final", nproc=2,
                  timeout=120, check=False, env=_env(GIANTS_TEST_KILL_RANK="1", GIANTS_TEST_KILL_STEP="3"))
    took = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and took < 90, (proc.returncode, took)
    assert "rank 1 exits during step 3" in text
    assert "rank      : 1 (local_rank: 1)" in text and "exitcode  : 1" in text, text[-3000:]
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step_*"))
    time.sleep(1.0)
    left = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(out).encode() in (p / "cmdline").read_bytes():
                    left.append(p.name)
            except OSError:
                pass
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize("args,world,message", [
    (dict(tp=4), 4, r"tensor parallel size 4 does not divide n_kv_heads=2"),
    (dict(ep=3, preset="tiny-mixtral"), 3, r"--ep 3 does not divide n_experts=8"),
    (dict(pp=5, overrides={"n_layers": 4}), 5, r"--pp 5 .* needs 5 stages, more than n_layers=4"),
    (dict(tp=2, dp_shard=2), 2, r"multiply to .* = 4, but the world size is 2"),
    (dict(dp_shard=2, batch_size=3), 2, r"--batch-size 3 is not divisible by the data-parallel degree"),
    # options the scale-out path cannot honour are refused, not dropped
    (dict(dp_shard=2, residual_dtype="bf16"), 2, r"--residual-dtype bf16 under scale-out"),
    (dict(dp_shard=2, compile="aot_eager"), 2, r"compile backend 'aot_eager' under scale-out"),
    (dict(dp_shard=2, compile=True, compile_mode="max-autotune"), 2, r"--compile-mode max-autotune under scale-out"),
])
def test_bad_layouts_are_refused_before_anything_starts(monkeypatch, tmp_path, args, world, message):
    from giants.presets import get_config
    from giants.train import distributed

    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = TrainConfig(out=str(tmp_path / "x"), **args)
    mc = get_config(cfg.preset).replace(**cfg.overrides)
    with pytest.raises(LayoutError, match=message):
        distributed.plan(cfg, mc)
    assert not torch.distributed.is_initialized()


def test_bad_layout_exits_at_once_under_torchrun(tmp_path, byte_data):
    t0 = time.monotonic()
    proc = _train(tmp_path / "bad", byte_data, "--steps", "2", "--tp", "2", "--set", "vocab_size=321", nproc=2,
                  check=False, timeout=120)
    assert proc.returncode != 0
    # every rank refuses it (torchrun may stop the second before it prints)
    assert "tensor parallel size 2 does not divide vocab_size=321" in proc.stderr
    assert time.monotonic() - t0 < 90
    assert not (tmp_path / "bad").exists()  # refused before the run directory, the process group or the weights


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_finetuning_over_data_parallel_ranks_matches_one_process(tmp_path, task):
    """SFT (micro-batches and ranks holding different numbers of target tokens: the loss is weighted by them) and
    DPO (by pairs) over 2 FSDP ranks with 2 micro-batches a step give the one-process losses."""
    data = tmp_path / "data.jsonl"
    answers = ["7", "The answer is eleven, as anyone who counts on their fingers will find.", "no",
               "Fifteen: eight and seven make fifteen, and that is the whole of it.", "Yes.",
               "Two, since one and one make two.", "Four hundred and twenty, give or take.", "ok"]
    if task == "sft":
        lines = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]}
                 for i, a in enumerate(answers)]
    else:
        lines = [{"prompt": f"Question {i}?", "chosen": a, "rejected": answers[-1 - i]} for i, a in enumerate(answers)]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["--task", task, "--tokenizer", "smollm2-135m", "--set", "vocab_size=49152", "--seq-len", "64",
            "--grad-accum", "2", "--steps", "2", "--no-final", "--grad-clip", "0", "--lr", "1e-5"]  # (a small
    # first AdamW update: it is about lr x the sign of each gradient entry, so float rounding of entries near zero
    # would otherwise show in step 2)
    together(_train, ((tmp_path / "one", data, *args), {}),
                    ((tmp_path / "dp", data, *args, "--dp-shard", "2"), dict(nproc=2)))
    _assert_losses(tmp_path / "dp", tmp_path / "one", [1, 2])


def _procs_with(text: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


def test_job_killed_mid_save_leaves_the_previous_checkpoint(tmp_path, byte_data):
    """SIGKILL of every process while the step-4 sharded checkpoint is half written: step 2 stays the latest, loads,
    and the run resumes from it (in one process) to the uninterrupted run's losses."""
    import signal

    from giants.train.checkpoint import PAUSE_ENV, latest_checkpoint, verify

    run, marker = tmp_path / "run", tmp_path / "paused"
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted reference run, independent of the job: alongside it
        ref = pool.submit(_train, tmp_path / "ref", byte_data, "--steps", "6", "--no-final")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "giants",
               "train", *TINY, "--data", str(byte_data), "--out", str(run), "--steps", "6", "--ckpt-every", "2",
               "--dp-shard", "2", "--no-final"]
        proc = subprocess.Popen(cmd, env=_env(**{PAUSE_ENV: f"4:{marker}"}), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not marker.exists():
                assert proc.poll() is None, "the job ended before its step-4 checkpoint"
                assert time.monotonic() < deadline, "the job never reached its step-4 checkpoint"
                time.sleep(0.2)
            partial = Path(marker.read_text())
            assert (partial / "dcp" / ".metadata").is_file() and not (partial / "manifest.json").exists()
        finally:
            for pid in [proc.pid, *_procs_with(str(run))]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(30)
        time.sleep(1.0)
        assert not _procs_with(str(run))
        assert latest_checkpoint(run).name == "step_00000002" and verify(latest_checkpoint(run))["step"] == 2
        _train(run, byte_data, "--steps", "6", "--no-final", "--resume")
        ref.result()
    _assert_losses(run, tmp_path / "ref", [1, 2, 3, 4, 5, 6])
    assert not partial.exists()  # the next save cleared the leftover


def test_a_signal_to_one_rank_stops_every_rank_with_one_checkpoint(runs, tmp_path, byte_data):
    """SIGTERM reaches rank 1 only, during step 2 of 4: the ranks agree at the step boundary, all stop after step 2
    with one collective sharded checkpoint, and the resume (here in one process) gives the uninterrupted losses."""
    from giants.train.checkpoint import list_checkpoints, verify

    root, _ = runs
    run = tmp_path / "run"
    proc = _train(run, byte_data, "--steps", "4", "--dp-shard", "2", "--no-final", nproc=2, check=False,
                  env=_env(GIANTS_TEST_SIGNAL_RANK="1", GIANTS_TEST_SIGNAL_STEP="2"))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "stopped by SIGTERM at step 2 of 4" in proc.stdout, text[-4000:]
    assert proc.stdout.count("stopped by SIGTERM") == 1  # rank 0 says it
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert verify(run / "checkpoints" / "step_00000002")["sharded"]["dp_shard"] == 2
    assert [r["step"] for r in _rows(run)] == [1, 2]
    _train(run, byte_data, "--steps", "4", "--no-final", "--resume")
    _assert_losses(run, root / "one", [1, 2, 3, 4])
