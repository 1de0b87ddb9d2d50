"""Runs that stop and start again: Ctrl-C writes a checkpoint that --resume continues exactly, progress lines reach
a pipe while the run goes on, resuming from nothing starts over, a killed final export is finished on resume,
--overwrite, the time-based checkpoint interval, and broken checkpoint files refused with the project's error."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from giants.cli import main
from giants.train import TrainConfig, Trainer
from giants.train import checkpoint as ckpt
from giants.train.checkpoint import TrainCheckpointError, latest_checkpoint, list_checkpoints


def _cli_args(data: Path, steps: int) -> list[str]:
    return ["--preset", "tiny-llama", "--data", str(data), "--tokenizer", "bytes", "--steps", str(steps),
            "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--eval-every", "0", "--eval-batches", "1",
            "--set", "vocab_size=320", "--set", "n_layers=2", "--device", "cpu", "--no-final"]


def _cfg(out, data, **kw) -> TrainConfig:
    base = dict(out=str(out), preset="tiny-llama", data=str(data), tokenizer="bytes", steps=3, seq_len=32,
                batch_size=2, lr=3e-3, progress=False, eval_every=0, eval_batches=1, save_final=False,
                overrides={"vocab_size": 320, "n_layers": 2}, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, byte_data):
    """SIGINT during `giants train` (stdout a pipe): progress lines arrive while it runs, the step finishes, a
    checkpoint is written and the printed command resumes it; the losses equal an uninterrupted run's."""
    steps = 40
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "giants.cli", "train", *_cli_args(byte_data, steps), "--log-seconds", "0",
           "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        deadline = time.time() + 240
        while not any(line.startswith("train step 3/40") for line in seen):
            line = proc.stdout.readline()
            assert line, f"no progress line before the end: {seen} {proc.stderr.read()}"
            seen.append(line)
            assert time.time() < deadline
        assert proc.poll() is None  # the lines came while the run was still going
        assert "loss" in seen[0] and "tok/s" in seen[0]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "SIGINT: finishing this step, then writing a checkpoint" in err
    said = out.splitlines()
    stop = next(ln for ln in said if "stopped by SIGINT" in ln)
    stopped_at = int(stop.split(" at step ")[1].split()[0])
    assert 3 <= stopped_at < steps
    assert [p.name for p in list_checkpoints(run)] == [f"step_{stopped_at:08d}"]  # the stop's, and no other
    assert ckpt.verify(latest_checkpoint(run))["step"] == stopped_at
    assert [r["step"] for r in _rows(run)] == list(range(1, stopped_at + 1))
    resume = said[said.index(stop) + 1].strip()
    assert resume.startswith("giants train ") and resume.endswith(" --resume")
    argv = shlex.split(resume)[1:]
    assert argv[argv.index("--out") + 1] == str(run)
    assert main(argv) == 0
    assert main(["train", *_cli_args(byte_data, steps), "--quiet", "--out", str(tmp_path / "ref")]) == 0
    got, want = _rows(run), _rows(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in want]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]


def test_progress_lines_when_stdout_is_not_a_terminal(capsys):
    from giants.train.metrics import ProgressBar, step_info

    bar = ProgressBar(True, 0, 10, log_seconds=3600, terminal=False)
    dpo = {"train_loss": 0.61, "margin": 0.25, "accuracy": 0.75, "tokens_per_s": 1234.0}
    for k in range(1, 8):
        bar.update(k, dict(dpo, train_loss=1.0 / k))
    bar.close()  # stopped at step 7: its line is said although the interval had not passed
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("train step 1/10  loss 1.0000")
    assert lines[1].startswith("train step 7/10  loss 0.1429  margin 0.2500  acc 75%") and "eta" in lines[1]
    assert "margin 0.2500  acc 75%" in step_info(dpo)  # the terminal's bar shows the same text
    bar = ProgressBar(True, 0, 3, log_seconds=0, terminal=False)
    for k in range(1, 4):
        bar.update(k, {"train_loss": 2.0, "tokens_per_s": 1.0})
    bar.close()
    assert [ln.split()[2] for ln in capsys.readouterr().out.splitlines()] == ["1/3", "2/3", "3/3"]


def test_resume_from_nothing_starts_the_run(tmp_path, byte_data, capsys):
    run = tmp_path / "run"
    # stopped before its first checkpoint: metrics but no checkpoint
    Trainer(_cfg(run, byte_data, ckpt_minutes=0, checkpoint_at_end=False)).run(until=2)
    assert not list_checkpoints(run) and len(_rows(run)) == 2
    with pytest.raises(ValueError, match=r"holds a previous run.*--resume.*step 0.*--overwrite"):
        Trainer(_cfg(run, byte_data))
    tr = Trainer(_cfg(run, byte_data, resume=True))
    assert "no checkpoint to resume from (none written yet); starting the run from step 0" in capsys.readouterr().err
    assert tr.step == 0
    tr.run()
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]
    # a named checkpoint that does not exist is still an error
    with pytest.raises(TrainCheckpointError, match="no such checkpoint directory"):
        Trainer(_cfg(run, byte_data, resume=str(run / "checkpoints" / "step_00000009")))
    # the CLI on an empty directory with --resume trains (here also with --threads: torch.set_num_threads)
    threads = torch.get_num_threads()
    try:
        assert main(["train", *_cli_args(byte_data, 1), "--quiet", "--resume", "--threads", "1", "--out",
                     str(tmp_path / "empty")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in _rows(tmp_path / "empty")] == [1]
    assert main(["train", *_cli_args(byte_data, 1), "--threads", "0", "--out", str(tmp_path / "t0")]) == 2


def test_resume_command_repeats_the_flags_given():
    from giants.cli import build_parser
    from giants.train.cli import resume_command

    argv = ["train", "--preset", "tiny-mixtral", "--set", "n_layers=2", "--set", "vocab_size=320", "--lora-targets",
            "q_proj", "v_proj", "--quiet", "--steps", "50", "--out", "runs/my run", "--overwrite", "--threads", "2"]
    cmd = resume_command(build_parser().parse_args(argv))
    assert cmd == ("giants train --preset tiny-mixtral --set n_layers=2 --set vocab_size=320 --steps 50 "
                   "--lora-targets q_proj v_proj --threads 2 --out 'runs/my run' --quiet --resume")
    again = build_parser().parse_args(shlex.split(cmd)[1:])
    assert again.resume is True and again.steps == 50 and again.set == ["n_layers=2", "vocab_size=320"]


def test_overwrite_discards_only_the_previous_run(tmp_path, byte_data):
    run = tmp_path / "run"
    Trainer(_cfg(run, byte_data, save_final=True)).run()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--overwrite"):
        Trainer(_cfg(run, byte_data))
    with pytest.raises(ValueError, match="cannot go with resume"):
        Trainer(_cfg(run, byte_data, overwrite=True, resume=True))
    tr = Trainer(_cfg(run, byte_data, overwrite=True, steps=2))
    assert not (run / "final").exists() and not list_checkpoints(run) and not (run / "metrics.jsonl").exists()
    tr.run()
    assert [r["step"] for r in _rows(run)] == [1, 2] and (run / "notes.txt").read_text() == "mine"


def test_a_failed_start_leaves_nothing_behind(tmp_path, byte_data):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="pip install tensorboard"):
        Trainer(_cfg(run, byte_data, tensorboard=True))
    assert not run.exists()
    Trainer(_cfg(run, byte_data, steps=1)).run()  # and the same directory starts without --resume or --overwrite


def test_resume_finishes_a_killed_final_export(tmp_path, byte_data, capsys):
    """All steps trained and checkpointed, but final/ never completed (killed mid-export: giants.save's temporary
    directory left behind): resuming writes final/ and clears the leftover, instead of 'already at step 3'."""
    import giants

    run = tmp_path / "run"
    args = ["train", *_cli_args(byte_data, 3), "--quiet", "--out", str(run)]
    assert main(args) == 0  # (--no-final: the state a kill during the export leaves)
    stale = run / ".final.tmp-12345-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    resume = [a for a in args if a != "--no-final"] + ["--resume"]
    assert main(resume) == 0
    out, err = capsys.readouterr()
    assert "already at step" not in out and "writing the final model" in err and "model " in out
    assert not stale.exists()
    assert giants.load(run / "final").config.n_layers == 2
    assert json.loads((run / "summary.json").read_text())["train_loss"] == _rows(run)[-1]["train_loss"]
    assert main(resume) == 0
    assert "already at step 3 of 3" in capsys.readouterr().out


def test_checkpoint_by_time(tmp_path, byte_data):
    assert TrainConfig(out="x").ckpt_minutes == 10  # the default: a checkpoint every 10 minutes
    Trainer(_cfg(tmp_path / "a", byte_data, steps=4, keep_last=0)).run()
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step_00000004"]  # (a short run: at the end)
    Trainer(_cfg(tmp_path / "b", byte_data, steps=3, keep_last=0, ckpt_minutes=1e-9)).run()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == [f"step_{k:08d}" for k in (1, 2, 3)]


def _reseal(path: Path) -> None:
    """Rewrite the manifest to match the files as they are now (a checkpoint altered, but consistently)."""
    mf = path / ckpt.MANIFEST
    manifest = json.loads(mf.read_text())
    manifest["files"] = {str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": ckpt._sha256(p)}
                         for p in ckpt._files(path)}
    mf.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, byte_data):
    root = tmp_path_factory.mktemp("saved")
    Trainer(_cfg(root / "run", byte_data, steps=1)).run()
    return root / "run"


def _copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def _entry(m: dict, value) -> dict:
    """The manifest with its state.json entry replaced by `value`."""
    return dict(m, files=dict(m["files"], **{"state.json": value}))


@pytest.mark.parametrize("change", [
    lambda m: list(m["files"]),
    lambda m: dict(m, files=list(m["files"])),
    lambda m: _entry(m, 5),
    lambda m: _entry(m, {"bytes": "x", "sha256": m["files"]["state.json"]["sha256"]}),
    lambda m: _entry(m, {"bytes": m["files"]["state.json"]["bytes"]}),
    lambda m: dict(m, step="1"),
    lambda m: dict(m, files={("../" if k == "state.json" else "") + k: v for k, v in m["files"].items()}),
], ids=["list", "files-list", "entry-int", "bytes-str", "no-sha256", "step-str", "outside"])
def test_structurally_wrong_manifest_is_named(saved, tmp_path, byte_data, change):
    run = _copy(saved, tmp_path)
    mf = latest_checkpoint(run) / ckpt.MANIFEST
    mf.write_text(json.dumps(change(json.loads(mf.read_text()))))
    with pytest.raises(TrainCheckpointError, match=r"manifest.json: corrupt manifest"):
        Trainer(_cfg(run, byte_data, resume=True))


def test_wrong_rng_files_are_named(saved, tmp_path, byte_data):
    run = _copy(saved, tmp_path)
    path = latest_checkpoint(run)
    rng = path / "rng.safetensors"
    tensors = load_file(str(rng))
    save_file({**tensors, "torch_cpu": tensors["torch_cpu"][:100].clone()}, str(rng))
    _reseal(path)
    with pytest.raises(TrainCheckpointError, match=r"rng.safetensors: unusable generator state .*torch_cpu"):
        Trainer(_cfg(run, byte_data, resume=True))
    save_file(tensors, str(rng))
    state = json.loads((path / "state.json").read_text())
    for garbage in ({"numpy": {"kind": 7}, "python": {}}, "nonsense", {"numpy": state["rng"]["numpy"]}):
        (path / "state.json").write_text(json.dumps(dict(state, rng=garbage)))
        _reseal(path)
        with pytest.raises(TrainCheckpointError, match=r"state.json: unusable generator state under 'rng'"):
            Trainer(_cfg(run, byte_data, resume=True))
    for bad in (dict(state, optimizer=[1]), dict(state, tokens_seen="many"), dict(state, data=None)):
        (path / "state.json").write_text(json.dumps(bad))
        _reseal(path)
        with pytest.raises(TrainCheckpointError, match=r"state.json: unusable"):
            Trainer(_cfg(run, byte_data, resume=True))
    (path / "state.json").write_text(json.dumps(dict(state, run=[])))
    _reseal(path)
    with pytest.raises(TrainCheckpointError, match=r"state.json: 'run' is list"):
        Trainer(_cfg(run, byte_data, resume=True))
