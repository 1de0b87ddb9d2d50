"""What a run reports: the per-step metrics line (RUN_DIR/metrics.jsonl, TensorBoard), the progress bar, throughput
and MFU, peak memory and the end-of-run summary.

Throughput counts training time only (evaluation and checkpoint writes fall outside the clock). tokens_per_s is
the whole job's: every token of the global batch, once, however many processes computed it. Under scale-out
(giants.train.distributed) each line also carries tokens_per_s_per_gpu and the world size; MFU is the job's
model FLOP/s over the job's peak (world x one device's), which is also each device's share. Only rank 0 writes
files or draws the bar.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from giants.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    from giants.analysis.flops import training_flops_per_token

    return float(training_flops_per_token(cfg, seq_len))


def peak_flops(device: torch.device, bf16: bool, override_tflops: float | None) -> float | None:
    """One device's peak FLOP/s (for MFU): the override, else the bf16 peak of a known GPU, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device).lower()
    from giants.analysis.hardware import GPUS

    for key, gpu in (("h100", GPUS["h100-80gb"]), ("h200", GPUS["h200-141gb"]), ("a100", GPUS["a100-80gb"])):
        if key in name:
            return gpu.bf16_flops
    return None


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda max allocated"}
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "kind": "process peak RSS"}


def json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class Throughput:
    """Training-time clock: tokens and busy seconds since the last logged line."""

    def __init__(self, flops_per_token: float, peak: float | None, world: int = 1) -> None:
        self.flops_per_token, self.peak, self.world = flops_per_token, peak, world
        self.busy, self.tokens, self.since = 0.0, 0, time.perf_counter()

    def work_done(self, end: float, tokens: int) -> None:
        """A step's work ended at `end` (perf_counter) after `tokens` tokens of the global batch."""
        self.busy += end - self.since
        self.since = end
        self.tokens += tokens

    def restart(self) -> None:
        """Nothing is queued: the next step starts now (after an evaluation or a checkpoint write)."""
        self.since = time.perf_counter()

    def report(self, m: dict[str, Any]) -> None:
        """Add tokens_per_s (and MFU, per-GPU rates) to the metrics line `m`; start a new interval."""
        m["tokens_per_s"] = self.tokens / max(self.busy, 1e-9)
        self.busy, self.tokens = 0.0, 0
        if self.world > 1:
            m["tokens_per_s_per_gpu"] = m["tokens_per_s"] / self.world
            m["world_size"] = self.world
        if self.peak:
            m["mfu"] = m["tokens_per_s"] * self.flops_per_token / (self.peak * self.world)


class MetricsLog:
    """metrics.jsonl (one object per logged step) and the optional TensorBoard writer; inert off rank 0."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, writer: Any = None) -> None:
        self.file = None
        self.tb = writer
        if enabled and tensorboard and self.tb is None:  # (before metrics.jsonl: a failed start writes nothing)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(out / "tensorboard"))
        self.file = open(out / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 - closed in close()

    def write(self, m: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.tb is None:
            return
        for k, v in m.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, m["step"])
        for k, vals in m.get("router", {}).items():
            if k in ("aux_loss", "z_loss", "balance"):
                for i, v in enumerate(vals):
                    self.tb.add_scalar(f"router/{k}/layer{i}", v, m["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def trim_metrics(path: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl up to `step` (later lines belong to the lost part of an interrupted run)."""
    kept: list[str] = []
    if not path.exists():
        return kept
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut by the kill
    return kept


def step_info(m: dict[str, Any]) -> str:
    """The metrics of a logged step as the progress bar and the plain log lines show them."""
    info = f"loss {m['train_loss']:.4f}"
    if "margin" in m:  # DPO: the reward margin (chosen - rejected) and how often it is positive
        info += f"  margin {m['margin']:.4f}  acc {100 * m['accuracy']:.0f}%"
    info += f"  {m.get('tokens_per_s', 0):,.0f} tok/s"
    if "tokens_per_s_per_gpu" in m:
        info += f" ({m['tokens_per_s_per_gpu']:,.0f}/GPU)"
    if "mfu" in m:
        info += f"  MFU {100 * m['mfu']:.1f}%"
    if "val_loss" in m:
        info += f"  val {m['val_loss']:.4f}"
    if "val_margin" in m:
        info += f"  val margin {m['val_margin']:.4f}"
    if "router" in m:
        info += f"  balance {min(m['router']['balance']):.2f}"
    return info


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def is_terminal() -> bool:
    """Whether stdout shows a live progress bar (a terminal or a notebook), rather than a file or a pipe."""
    try:
        from rich.console import Console

        console = Console()
        return bool(console.is_terminal or console.is_jupyter)
    except ImportError:
        return sys.stdout.isatty()


class ProgressBar:
    """Progress on stdout: a rich bar showing loss, tokens/s and MFU on a terminal; where stdout is a file or a pipe
    (nohup, CI, Slurm), where a bar would only show at the end, a plain line at the first logged step, then at the
    first logged step `log_seconds` after the previous line, and at the last one. Silent when disabled."""

    def __init__(self, enabled: bool, start: int, total: int, log_seconds: float = 30.0,
                 terminal: bool | None = None) -> None:
        self.progress = None
        self.plain = False
        if not enabled:
            return
        if not (is_terminal() if terminal is None else terminal):
            self.plain, self.start, self.total, self.log_seconds = True, start, total, log_seconds
            self.t0 = time.monotonic()
            self.last_print: float | None = None
            self.unprinted: tuple[int, str] | None = None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"))
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, m: dict[str, Any]) -> None:
        if self.plain:
            now = time.monotonic()
            due = self.last_print is None or now - self.last_print >= self.log_seconds or step >= self.total
            self.unprinted = (step, step_info(m))
            if due:
                self._print(now)
            return
        if self.progress is None:
            return
        self.progress.update(self.task, completed=step, info=step_info(m))

    def _print(self, now: float) -> None:
        step, info = self.unprinted
        self.unprinted, self.last_print = None, now
        elapsed = now - self.t0
        done = step - self.start
        eta = f"  eta {_duration(elapsed / done * (self.total - step))}" if 0 < done and step < self.total else ""
        print(f"train step {step}/{self.total}  {info}  elapsed {_duration(elapsed)}{eta}", flush=True)

    def close(self) -> None:
        if self.plain and self.unprinted is not None:  # the last logged step (a stop between lines) is said too
            self._print(time.monotonic())
        if self.progress is not None:
            self.progress.stop()


def summarize(history: list[dict[str, Any]], *, step: int, tokens: int, last_val: float | None,
              flops_per_token: float, memory: dict[str, Any], last_checkpoint: Path | None) -> dict[str, Any]:
    """The end-of-run summary (RUN_DIR/summary.json): the mean rate leaves out the first (warm-up) line."""
    last = history[-1] if history else {}
    rates = [h["tokens_per_s"] for h in history[1:] if "tokens_per_s" in h] or \
            [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    out = {"step": step, "tokens": tokens, "train_loss": last.get("train_loss"), "val_loss": last_val,
           "tokens_per_s": sum(rates) / len(rates) if rates else None, "flops_per_token": flops_per_token,
           "peak_memory": memory, "last_checkpoint": str(last_checkpoint) if last_checkpoint else None}
    per_gpu = [h["tokens_per_s_per_gpu"] for h in history[1:] if "tokens_per_s_per_gpu" in h]
    if per_gpu:
        out["tokens_per_s_per_gpu"] = sum(per_gpu) / len(per_gpu)
        out["world_size"] = last.get("world_size")
    mfus = [h["mfu"] for h in history[1:] if "mfu" in h]
    if mfus and per_gpu:
        out["mfu"] = sum(mfus) / len(mfus)
    return out
