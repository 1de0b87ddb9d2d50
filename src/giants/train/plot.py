"""`giants plot RUN_DIR`: training curves from metrics.jsonl to a PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a training run directory?)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i}: not a JSON object") from None
    if not rows:
        raise ValueError(f"{path}: empty (no step was logged yet)")
    return rows


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Loss (train and validation), learning rate, throughput and, for MoE runs, router balance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    moe = any("router" in r for r in rows)
    dpo = any("margin" in r for r in rows)
    panels = 3 + int(moe) + int(dpo)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    steps = [r["step"] for r in rows]

    ax = axes[0]
    ax.plot(steps, [r["train_loss"] for r in rows], lw=1, label="train")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1]
    ax.plot(steps, [r["lr"] for r in rows], color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title="schedule")
    ax.grid(alpha=0.3)

    ax = axes[2]
    tps = [(r["step"], r["tokens_per_s"]) for r in rows if "tokens_per_s" in r]
    if tps:
        ax.plot(*zip(*tps), color="tab:purple", lw=1)
    ax.set(xlabel="step", ylabel="tokens / s", title="throughput")
    if any("mfu" in r for r in rows):
        mfu = [r.get("mfu", 0) for r in rows if "tokens_per_s" in r]
        ax.set_title(f"throughput (mean MFU {100 * sum(mfu) / len(mfu):.1f}%)")
    ax.grid(alpha=0.3)

    k = 3
    if moe:
        ax = axes[k]
        k += 1
        routed = [r for r in rows if "router" in r]
        n_layers = len(routed[0]["router"]["balance"])
        for layer in range(n_layers):
            ax.plot([r["step"] for r in routed], [r["router"]["balance"][layer] for r in routed], lw=1,
                    label=f"layer {layer}")
        ax.set(xlabel="step", ylabel="normalised routing entropy", title="expert balance (1 = even)", ylim=(0, 1.02))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if dpo:
        ax = axes[k]
        ax.plot(steps, [r.get("margin", 0) for r in rows], color="tab:red")
        ax.set(xlabel="step", ylabel="reward margin", title="DPO chosen - rejected")
        ax.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).name))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
