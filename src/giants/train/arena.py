"""The architecture arena: the tiny twins of every family trained on the same tokens at the same active
parameter budget, compared on validation loss vs FLOPs, throughput, memory and expert balance.

Budget matching: all twins get the same depth, then each one's ffn_dim (the expert width for MoE twins)
is chosen so its active non-embedding parameters (attention + the experts a token uses + router + norms +
position tables) come within `tolerance` of the reference twin's; if no width gets there the depth moves
too. Every twin shares d_model, vocabulary, data, batch, sequence length, steps and schedule.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from giants.analysis.params import count_params
from giants.config import ModelConfig
from giants.presets import TINY_PRESETS, get_preset

REFERENCE = "tiny-llama"


@dataclass
class ArenaConfig:
    out: str = "arena"
    presets: tuple[str, ...] = TINY_PRESETS
    n_layers: int = 4
    steps: int = 120
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    scale: int = 1  # GPU: multiplies d_model and head_dim (and the starting ffn_dim) by this
    data: str = "shakespeare"
    tokenizer: str = "smollm2-135m"
    device: str = "auto"
    eval_every: int = 20
    eval_batches: int = 4
    tolerance: float = 0.03
    # Router losses for every MoE twin alike (Mixtral's load-balancing coefficient, ST-MoE's z-loss one),
    # whatever their preset carries, so balance is compared under the same pressure.
    aux_loss_coef: float = 0.02
    z_loss_coef: float = 0.001
    seed: int = 0
    isolate: bool = True  # one process per twin: measured peak memory and no cross-talk
    progress: bool = True
    train_overrides: dict[str, Any] = field(default_factory=dict)


def active_body(cfg: ModelConfig) -> int:
    """Active parameters without the embedding/unembedding table: what the family choices change."""
    pc = count_params(cfg)
    return pc.active - (pc.unembedding or pc.embedding)


def scale_config(cfg: ModelConfig, s: int) -> ModelConfig:
    if s == 1:
        return cfg
    if s < 1:
        raise ValueError(f"scale must be >= 1 (got {s})")
    kw: dict[str, Any] = {"d_model": cfg.d_model * s, "head_dim": cfg.head_dim * s, "ffn_dim": cfg.ffn_dim * s}
    if cfg.embed_scale is not None:
        kw["embed_scale"] = math.sqrt(cfg.d_model * s)
    if cfg.query_scale is not None:
        kw["query_scale"] = cfg.query_scale * s
    return cfg.replace(**kw)


def match_budget(cfg: ModelConfig, target: int, n_layers: int, tolerance: float) -> ModelConfig:
    """cfg with n_layers and the ffn_dim whose active body is within `tolerance` of target, preferring widths
    that are multiples of 8 (aligned rows for tensor-core grouped GEMMs), moving depth only if no width fits."""
    best: tuple[float, ModelConfig] | None = None
    for layers in sorted(range(1, 4 * n_layers + 1), key=lambda L: (abs(L - n_layers), L)):
        fits: list[tuple[bool, float, ModelConfig]] = []
        for ffn in range(4, 64 * cfg.d_model + 1, 4):
            c = cfg.replace(n_layers=layers, ffn_dim=ffn)
            body = active_body(c)
            err = abs(body - target) / target
            if best is None or err < best[0]:
                best = (err, c)
            if err <= tolerance:
                fits.append((ffn % 8 != 0, err, c))
            if body > target:
                break
        if fits:
            return min(fits, key=lambda f: (f[0], f[1]))[2]
    assert best is not None
    raise ValueError(f"cannot match the active budget {target:,} for {cfg}: closest is {best[0]:.1%} off")


def arena_configs(ac: ArenaConfig) -> dict[str, ModelConfig]:
    ref = scale_config(get_preset(REFERENCE).config, ac.scale).replace(n_layers=ac.n_layers)
    target = active_body(ref)
    out = {}
    for name in ac.presets:
        cfg = scale_config(get_preset(name).config, ac.scale)
        out[name] = ref if name == REFERENCE else match_budget(cfg, target, ac.n_layers, ac.tolerance)
        if ac.seq_len > out[name].max_context:
            raise ValueError(f"seq_len={ac.seq_len} is beyond {name}'s max_context={out[name].max_context}")
    return out


def _train_one(args: dict[str, Any]) -> dict[str, Any]:
    """Train one twin (runs in a child process when isolated)."""
    import torch

    from giants.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.pop("threads"))
    tc = TrainConfig(**args)
    t0 = time.perf_counter()
    tr = Trainer(tc)
    summary = tr.run()
    if summary.get("stopped"):  # Ctrl-C: the arena stops too (a twin cut short is no result)
        raise KeyboardInterrupt
    summary["wall_s"] = time.perf_counter() - t0
    summary["history"] = tr.history
    summary["device"] = str(tr.device)
    summary["memory_estimate"] = int(_estimate(tr))
    return summary


def _estimate(tr: Any) -> int:
    from giants.train.trainer import estimate_memory

    return estimate_memory(tr.model_config, tr.cfg, tr.bf16)


def run_arena(ac: ArenaConfig) -> dict[str, Any]:
    import torch

    out = Path(ac.out)
    configs = arena_configs(ac)
    # Prepare the corpus once, in this process, before any child starts.
    from giants.train.corpus import resolve_data

    resolve_data(ac.data, ac.tokenizer, progress=ac.progress)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, cfg in configs.items():
        run_dir = out / "runs" / name
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        args = dict(out=str(run_dir), preset=None, model_config=None, overrides={}, data=ac.data,
                    tokenizer=ac.tokenizer, steps=ac.steps, batch_size=ac.batch_size, seq_len=ac.seq_len, lr=ac.lr,
                    device=ac.device, eval_every=ac.eval_every, eval_batches=ac.eval_batches, seed=ac.seed,
                    progress=ac.progress, save_final=False, aux_loss_coef=ac.aux_loss_coef,
                    z_loss_coef=ac.z_loss_coef, checkpoint_at_end=False, ckpt_minutes=0,
                    threads=torch.get_num_threads(),
                    **ac.train_overrides)
        cfg_file = out / "runs" / f"{name}.config.json"
        cfg_file.parent.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(json.dumps(cfg.to_dict(), indent=1))
        args["model_config"] = str(cfg_file)
        if ac.progress:
            print(f"arena: {name} (layers {cfg.n_layers}, ffn {cfg.ffn_dim}, active body {active_body(cfg):,})")
        if ac.isolate:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(1) as pool:
                summary = pool.apply(_train_one, (args,))
        else:
            summary = _train_one(args)
        pc = count_params(cfg)
        summary.update(preset=name, family=get_preset(name).family, n_layers=cfg.n_layers, ffn_dim=cfg.ffn_dim,
                       n_experts=cfg.n_experts, experts_per_token=cfg.experts_per_token, total_params=pc.total,
                       active_params=pc.active, active_body=active_body(cfg), isolated=ac.isolate)
        results[name] = summary
    report = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ac.__dict__.items()},
              "reference": REFERENCE, "target_active_body": active_body(configs[REFERENCE]),
              "tokens_per_twin": ac.steps * ac.batch_size * ac.seq_len, "results": results,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plots = plot_arena(report, out)
    (out / "report.md").write_text(render_report(report, plots))
    return report


def _final_balance(summary: dict[str, Any]) -> tuple[float | None, list[list[float]] | None]:
    routed = [h for h in summary["history"] if "router" in h]
    if not routed:
        return None, None
    last = routed[-1]["router"]
    return sum(last["balance"]) / len(last["balance"]), last["utilisation"]


def _memory(summary: dict[str, Any]) -> tuple[float, str]:
    pm = summary["peak_memory"]
    if summary["device"].startswith("cuda") or summary.get("isolated"):
        return pm["bytes"] / 2**20, pm["kind"]
    return summary["memory_estimate"] / 2**20, "estimate (giants.analysis.memory)"


def _short(name: str) -> str:
    """A twin's bar label: without the shared 'tiny-', on two lines where long (horizontal labels never
    run into each other or off the panel)."""
    short = name.replace("tiny-", "")
    if len(short) > 10 and "-" in short:
        head, _, tail = short.rpartition("-")
        return f"{head}-\n{tail}"
    return short


def plot_arena(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    names = list(res)
    colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    ax = axes[0]
    for n, s in res.items():
        pts = [(h["tokens"] * s["flops_per_token"], h["val_loss"]) for h in s["history"] if "val_loss" in h]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, color=colors[n], label=n)
    ax.set(xscale="log", xlabel="training FLOPs (log scale)", ylabel="validation loss (nats/token)",
           title="validation loss vs compute")
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    for n, s in res.items():
        h = s["history"]
        k = max(1, len(h) // 30)
        xs = [h[i]["step"] for i in range(0, len(h), k)]
        ys = [sum(r["train_loss"] for r in h[i:i + k]) / len(h[i:i + k]) for i in range(0, len(h), k)]
        ax.plot(xs, ys, color=colors[n], lw=1.2, label=n)
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss (mean over windows)")
    ax.grid(alpha=0.3)
    ax = axes[2]
    tps = [res[n]["tokens_per_s"] or 0 for n in names]
    ax.bar(range(len(names)), tps, color=[colors[n] for n in names])
    ax.set_xticks(range(len(names)), [_short(n) for n in names], fontsize=8)
    kinds = set()
    for i, (n, v) in enumerate(zip(names, tps)):
        mem, kind = _memory(res[n])
        kinds.add(kind)
        ax.text(i, v, f"{mem:,.0f} MiB", ha="center", va="bottom", fontsize=7)
    # Headroom above the tallest bar for its memory label (it ran into the frame and the title).
    ax.set_ylim(0, max(tps + [1]) * 1.15)
    kind = "" if len(kinds) > 1 else f", {kinds.pop()}"
    ax.set(ylabel="tokens / s (training)")
    ax.set_title(f"throughput on {res[names[0]]['device']}\nlabels: peak memory{kind}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    # One legend for all three panels, below them: inside a loss panel it sat on the curves.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    main = out / "arena.png"
    fig.savefig(main, dpi=110)
    plt.close(fig)
    files = [main.name]

    moe = [n for n in names if _final_balance(res[n])[1] is not None]
    if moe:
        fig, axes = plt.subplots(1, len(moe), figsize=(5 * len(moe), 3.8), squeeze=False)
        for ax, n in zip(axes[0], moe):
            util = _final_balance(res[n])[1]
            E = len(util[0])
            width = 0.8 / len(util)
            for layer, row in enumerate(util):
                # each expert's group of per-layer bars centred on its tick
                ax.bar([e + (layer - (len(util) - 1) / 2) * width for e in range(E)], row, width=width,
                       label=f"layer {layer}")
            ax.axhline(1 / E, color="k", lw=0.8, ls="--", label=f"even (1/{E})")
            ax.set_xticks(range(E))
            ax.set_ylim(0, max(max(r) for r in util) * 1.1)
            ax.set(xlabel="expert", ylabel="share of routed tokens", title=f"{n}: final expert utilisation")
        handles, labels = axes[0][0].get_legend_handles_labels()
        # Below the panels: inside one, the legend hid the bars under it.
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        p = out / "experts.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p.name)
    return files


def render_report(report: dict[str, Any], plots: list[str]) -> str:
    res = report["results"]
    c = report["config"]
    lines = [
        "# Architecture arena", "",
        f"{report['date']}, torch {report['torch']}, device {next(iter(res.values()))['device']}. "
        f"Every twin: d_model {64 * c['scale']}, {report['tokens_per_twin']:,} training tokens "
        f"({c['steps']} steps x batch {c['batch_size']} x seq {c['seq_len']}) of `{c['data']}`, lr {c['lr']} "
        f"(warmup + cosine), AdamW, seed {c['seed']}. Budget: active non-embedding parameters matched to "
        f"{report['reference']}'s {report['target_active_body']:,} (tolerance {c['tolerance']:.0%}).", "",
        "| twin | family | layers | ffn/expert width | experts | active body | active (with head) | total params "
        "| GFLOP/token | final val loss | best val loss | tokens/s | peak memory | expert balance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, s in res.items():
        vals = [h["val_loss"] for h in s["history"] if "val_loss" in h]
        bal, _ = _final_balance(s)
        mem, kind = _memory(s)
        experts = f"{s['experts_per_token']}/{s['n_experts']}" if s["n_experts"] else "-"
        off = (s["active_body"] - report["target_active_body"]) / report["target_active_body"]
        lines.append(
            f"| {n} | {s['family']} | {s['n_layers']} | {s['ffn_dim']} | {experts} | {s['active_body']:,} "
            f"({off:+.1%}) | {s['active_params']:,} | {s['total_params']:,} | {s['flops_per_token'] / 1e9:.4f} "
            f"| {vals[-1]:.4f} | {min(vals):.4f} | {s['tokens_per_s']:,.0f} | {mem:,.0f} MiB ({kind}) "
            f"| {'-' if bal is None else f'{bal:.3f}'} |" if vals else f"| {n} | (no validation) |")
    lines += ["", "Expert balance: normalised entropy of the final step's routing shares, averaged over layers "
              "(1 = every expert gets the same share).", ""]
    lines += [f"![{p}]({p})" for p in plots]
    best = min(res, key=lambda n: min((h["val_loss"] for h in res[n]["history"] if "val_loss" in h),
                                      default=float("inf")))
    lines += ["", f"Lowest validation loss at this budget: **{best}**. At width {64 * c['scale']} the 49,152-entry "
              "output head is most of every twin's FLOPs, so throughput differences come mostly from attention "
              "variants (soft-caps and sinks take the exact math path; T5 bias adds a bias tensor) and MoE routing.",
              ""]
    return "\n".join(lines)

