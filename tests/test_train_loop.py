"""The training loop on the tiny twins: learning, bit-exact resume, checkpoints that survive SIGKILL,
refusal of corrupt or mismatched checkpoints, NaN stops, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from giants.cli import main
from giants.presets import get_config
from giants.train import TrainConfig, Trainer, TrainingDiverged
from giants.train.checkpoint import PAUSE_ENV, TrainCheckpointError, latest_checkpoint, list_checkpoints, verify

from conftest import ALL_TINY

SMALL_VOCAB = {"vocab_size": 320}  # byte data needs 257 ids; keeps the mechanics tests' models and checkpoints small


def _cfg(out, data, **kw) -> TrainConfig:
    base = dict(out=str(out), preset="tiny-mixtral", data=str(data), tokenizer="bytes", steps=6, seq_len=32,
                batch_size=2, lr=3e-3, progress=False, eval_every=3, eval_batches=1, ckpt_every=2,
                z_loss_coef=1e-3, save_final=False, overrides=dict(SMALL_VOCAB))
    base.update(kw)
    return TrainConfig(**base)


def _losses(run: Path, key: str = "train_loss") -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_shakespeare(tmp_path):
    tr = Trainer(TrainConfig(out=str(tmp_path / "run"), preset="tiny-llama", data="shakespeare", steps=20,
                             seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2, progress=False, eval_every=0,
                             eval_batches=4, save_final=False, checkpoint_at_end=False))
    before = tr.evaluate()["val_loss"]
    summary = tr.run()
    losses = [h["train_loss"] for h in tr.history]
    assert before > 10.0  # ln(49152) = 10.8 at initialisation
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert summary["val_loss"] < before - 1.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all({"step", "train_loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert "val_loss" in rows[-1] and rows[-1]["val_ppl"] == pytest.approx(2.718281828 ** rows[-1]["val_loss"])


# The T5 twin at 128 tokens x 2: its bias gradient has 2*4*128*128 >= 32768 elements, where the CPU's indexing
# backward went parallel (racing atomic adds) and the resumed run drifted from the uninterrupted one.
_RESUME_SEQ = {"tiny-gpt-oss-described": 128}


@pytest.mark.parametrize("preset", ALL_TINY)
def test_resume_is_bit_exact(tmp_path, byte_data, preset):
    """Every family's twin (the MoE ones with router aux + z losses), with grad accumulation, interrupted after
    step 3 (checkpoint at 2) and resumed in the same process (2 threads) gives the uninterrupted run's losses and
    weights bit for bit."""
    moe = get_config(preset).n_experts > 0
    kw = dict(preset=preset, grad_accum=2, steps=4, seq_len=_RESUME_SEQ.get(preset, 32))
    if not moe:
        kw["z_loss_coef"] = None
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        full = Trainer(_cfg(tmp_path / "full", byte_data, **kw))
        full.run()
        part = Trainer(_cfg(tmp_path / "part", byte_data, **kw))
        part.run(until=3)
        del part
        resumed = Trainer(_cfg(tmp_path / "part", byte_data, resume=True, **kw))
        assert resumed.step == 2
        resumed.run()
    finally:
        torch.set_num_threads(threads)
    keys = ("train_loss", "grad_norm", "lr") + (("aux_loss", "z_loss") if moe else ())
    for key in keys:
        assert _losses(tmp_path / "full", key) == _losses(tmp_path / "part", key)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["step_00000002", "step_00000004"]
    if preset == "tiny-mixtral":
        row = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
        assert len(row["router"]["utilisation"]) == 2 and len(row["router"]["utilisation"][0]) == 8
        assert len(row["router"]["aux_loss"]) == 2 and all(0 < b <= 1 for b in row["router"]["balance"])


def test_activation_checkpointing_and_grad_accum(tmp_path, byte_data):
    kw = dict(preset="tiny-llama", steps=3, eval_every=0, ckpt_every=0, checkpoint_at_end=False, z_loss_coef=None)
    plain = Trainer(_cfg(tmp_path / "a", byte_data, batch_size=4, **kw))
    plain.run()
    ckpt = Trainer(_cfg(tmp_path / "b", byte_data, batch_size=4, activation_checkpointing=True, **kw))
    assert ckpt.model.gradient_checkpointing
    ckpt.run()
    torch.testing.assert_close(_losses(tmp_path / "a"), _losses(tmp_path / "b"), rtol=1e-6, atol=1e-6)
    accum = Trainer(_cfg(tmp_path / "c", byte_data, batch_size=2, grad_accum=2, **kw))
    accum.run()
    # same 4 sequences per step, in two micro-batches: equal up to summation order
    torch.testing.assert_close(_losses(tmp_path / "a"), _losses(tmp_path / "c"), rtol=1e-4, atol=1e-4)


def test_sigkill_mid_checkpoint_leaves_previous_loadable(tmp_path, byte_data):
    run = tmp_path / "run"
    marker = tmp_path / "paused"
    env = dict(os.environ, **{PAUSE_ENV: f"4:{marker}"})
    cmd = [sys.executable, "-m", "giants.cli", "train", "--preset", "tiny-mixtral", "--data", str(byte_data),
           "--tokenizer", "bytes", "--steps", "6", "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3",
           "--eval-every", "3", "--eval-batches", "1", "--ckpt-every", "2", "--z-loss-coef", "1e-3", "--quiet",
           "--no-final", "--set", "vocab_size=320", "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "training never reached the step-4 checkpoint"
            time.sleep(0.2)
        partial = Path(marker.read_text())
        assert partial.is_dir() and (partial / "model").is_dir()  # step 4 is half written
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert latest_checkpoint(run).name == "step_00000002"
    assert verify(latest_checkpoint(run))["step"] == 2
    resumed = Trainer(_cfg(run, byte_data, resume=True))
    assert resumed.step == 2
    resumed.run()
    assert not partial.exists()  # the next save cleared the leftover
    # and the interrupted run, resumed in another process, matches an uninterrupted one exactly
    ref = Trainer(_cfg(tmp_path / "ref", byte_data))
    ref.run()
    assert _losses(run) == _losses(tmp_path / "ref")


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path, byte_data):
    run = tmp_path / "run"
    Trainer(_cfg(run, byte_data, steps=4)).run()
    step4 = run / "checkpoints" / "step_00000004"
    with pytest.raises(ValueError, match="holds a previous run"):
        Trainer(_cfg(run, byte_data, steps=4))
    # mismatches, named
    with pytest.raises(TrainCheckpointError, match=r"model config: .*n_experts"):
        Trainer(_cfg(run, byte_data, preset="tiny-llama", resume=True))
    with pytest.raises(TrainCheckpointError, match=r"run settings: batch_size: checkpoint 2 != this run 3"):
        Trainer(_cfg(run, byte_data, batch_size=3, resume=True))
    # an explicit older checkpoint resumes
    assert Trainer(_cfg(run, byte_data, resume=str(run / "checkpoints" / "step_00000002"))).step == 2
    # corruption: one flipped byte
    opt = step4 / "optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    with pytest.raises(TrainCheckpointError, match=r"optimizer.safetensors: sha256 does not match"):
        Trainer(_cfg(run, byte_data, resume=True))
    # truncation of the weights
    weights = step4 / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TrainCheckpointError, match=r"model.safetensors: 1000 bytes, manifest says"):
        verify(step4)
    # no manifest: an incomplete write
    (step4 / "manifest.json").unlink()
    with pytest.raises(TrainCheckpointError, match="incomplete checkpoint"):
        Trainer(_cfg(run, byte_data, resume=True))
    # nothing to resume from starts the run, saying so (tests/test_train_stop.py); a named checkpoint must exist
    assert Trainer(_cfg(tmp_path / "empty", byte_data, resume=True)).step == 0
    assert main(["train", "--out", str(tmp_path / "empty2"), "--data", str(byte_data), "--tokenizer", "bytes",
                 "--resume", str(tmp_path / "empty2" / "checkpoints" / "step_00000001"), "--quiet"]) == 2


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path, byte_data):
    run = tmp_path / "run"
    tr = Trainer(_cfg(run, byte_data, preset="tiny-llama", steps=6, z_loss_coef=None))
    tr.run(until=2)
    good = latest_checkpoint(run)
    with torch.no_grad():
        tr.model.layers[0].attn.q_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match=rf"non-finite loss \(nan\) at step 3.*{good.name}"):
        tr.run()
    assert tr.step == 2 and latest_checkpoint(run) == good
    # step 4 was already queued when step 3's loss came back: the found_inf flag skipped both updates
    after = tr.model.state_dict()
    assert all(torch.equal(after[k], v, ) or k.endswith("q_proj.weight") for k, v in before.items())
    assert torch.equal(after["layers.0.attn.q_proj.weight"].nan_to_num(), before["layers.0.attn.q_proj.weight"]
                       .nan_to_num())
    assert verify(good)["step"] == 2
    resumed = Trainer(_cfg(run, byte_data, preset="tiny-llama", steps=6, z_loss_coef=None, resume=True))
    assert torch.isfinite(resumed.model.layers[0].attn.q_proj.weight).all()


def test_pipelined_run_matches_step_by_step(tmp_path, byte_data):
    """run() reads step k's scalars after queueing step k+1 (no host sync inside a step); its metrics and
    weights equal those of calling train_step() one step at a time."""
    kw = dict(steps=5, eval_every=0, ckpt_every=0, checkpoint_at_end=False)
    piped = Trainer(_cfg(tmp_path / "a", byte_data, **kw))
    assert piped._fused_optimizer()
    piped.run()
    stepped = Trainer(_cfg(tmp_path / "b", byte_data, **kw))
    rows = [stepped.train_step() for _ in range(5)]
    assert [r["step"] for r in piped.history] == [1, 2, 3, 4, 5]
    for key in ("train_loss", "grad_norm", "lr", "tokens", "aux_loss", "router"):
        assert [h[key] for h in piped.history] == [r[key] for r in rows], key
    b = stepped.model.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in piped.model.state_dict().items())


def test_compile_mode_checks(tmp_path, byte_data):
    with pytest.raises(ValueError, match="compile_mode.*needs compile"):
        Trainer(_cfg(tmp_path / "a", byte_data, compile_mode="reduce-overhead"))
    with pytest.raises(ValueError, match="compile_mode.*needs grad_accum=1"):
        Trainer(_cfg(tmp_path / "b", byte_data, compile=True, compile_mode="reduce-overhead", grad_accum=2))
    with pytest.raises(ValueError, match="compile_mode: must be one of"):
        Trainer(_cfg(tmp_path / "c", byte_data, compile=True, compile_mode="fast"))


def test_bad_configs_fail_early(tmp_path, byte_data):
    with pytest.raises(ValueError, match=r"seq_len=4096 is beyond the model's max_context=2048"):
        Trainer(_cfg(tmp_path / "a", byte_data, seq_len=4096))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"needs about \d+\.\d GiB .* only \d+\.\d GiB"):
        Trainer(_cfg(tmp_path / "b", byte_data, preset="llama-3-70b", overrides={}))
    assert time.perf_counter() - t0 < 5  # refused from the estimate, before allocating 70B parameters
    with pytest.raises(ValueError, match="needs about"):
        Trainer(_cfg(tmp_path / "c", byte_data, memory_limit_gb=0.01))
    with pytest.raises(FileNotFoundError, match="not a prepared token dataset"):
        Trainer(_cfg(tmp_path / "d", tmp_path))
    with pytest.raises(ValueError, match="unknown preset"):
        Trainer(_cfg(tmp_path / "e", byte_data, preset="tiny-lama"))
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        Trainer(_cfg(tmp_path / "f", byte_data, overrides={"n_layer": 3}))
    with pytest.raises(ValueError, match="vocabulary of 257 but the model has vocab_size=200"):
        Trainer(_cfg(tmp_path / "h", byte_data, overrides={"vocab_size": 200}))
    with pytest.raises(ValueError, match="TrainConfig.task"):
        Trainer(_cfg(tmp_path / "g", byte_data, task="rlhf"))


def test_cli_train_plot_resume(tmp_path, byte_data, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny-gpt-oss", "--data", str(byte_data), "--tokenizer", "bytes", "--steps", "3",
            "--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--quiet",
            "--schedule", "wsd", "--peak-tflops", "1", "--set", "n_layers=1", "--set", "layer_windows=[16]",
            "--set", "vocab_size=320", "--out", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step 3" in out and "final" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] == pytest.approx(r["tokens_per_s"] * json.loads((run / "run.json").read_text())
                                         ["flops_per_token"] / 1e12) for r in rows)
    assert json.loads((run / "run.json").read_text())["model_config"]["n_layers"] == 1
    import giants

    model = giants.load(run / "final")
    assert model.config.n_layers == 1 and model.config.is_moe
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*args, "--resume"]) == 0
    assert "already at step 3" in capsys.readouterr().out
    assert main([*args[:-2], "--steps", "4", "--resume", "--out", str(run)]) == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_tensorboard_flag(tmp_path, byte_data):
    try:
        import torch.utils.tensorboard  # noqa: F401
        has_tb = True
    except ImportError:
        has_tb = False
    cfg = _cfg(tmp_path / "tb", byte_data, preset="tiny-llama", steps=1, tensorboard=True, z_loss_coef=None,
               checkpoint_at_end=False)
    if has_tb:
        Trainer(cfg).run()
        assert list((tmp_path / "tb" / "tensorboard").glob("events.*"))
    else:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            Trainer(cfg).run()


def test_compiled_loss_matches_eager(tmp_path, byte_data):
    """--compile traces forward + losses as one graph; with the graph-capturing 'eager' backend (no code
    generation, so it is quick on CPU) the MoE losses equal the uncompiled run's."""
    kw = dict(steps=2, eval_every=0, ckpt_every=0, checkpoint_at_end=False)
    plain = Trainer(_cfg(tmp_path / "a", byte_data, **kw))
    plain.run()
    compiled = Trainer(_cfg(tmp_path / "b", byte_data, compile="eager", **kw))
    compiled.run()
    for key in ("train_loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(_losses(tmp_path / "a", key), _losses(tmp_path / "b", key), rtol=1e-5, atol=1e-6)


def test_compiled_dense_loss_is_one_graph(tmp_path, byte_data):
    """The rotary tables come in as an input, so the compiled loss has no graph break: the embedding and the tied
    head share one graph (on a GPU a break cost ~0.7 ms a step summing their gradients outside it)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tr = Trainer(_cfg(tmp_path / "a", byte_data, preset="tiny-llama", compile="eager", steps=2, eval_every=0,
                      ckpt_every=0, checkpoint_at_end=False, overrides={**SMALL_VOCAB, "tie_embeddings": True}))
    assert tr.model.output_weight is tr.model.embed.weight
    tr.run()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
