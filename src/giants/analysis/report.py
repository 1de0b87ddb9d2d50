"""`giants report`: one self-contained HTML page and a Markdown twin, with PNG plots and the claims table.

Everything here is computed from the presets on the spot (nothing is fetched, nothing allocated).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Sequence
from pathlib import Path

from giants.analysis.claims import check_claims
from giants.analysis.compare import REAL_PRESETS, compare_columns, compare_record, published_format
from giants.analysis.hardware import GPUS, NODE_SIZE, get_gpu
from giants.analysis.measured_runs import as_records, fit_lines, load_runs
from giants.analysis.memory import kv_cache_bytes, serving_memory, training_memory, weight_bytes
from giants.analysis.params import count_params
from giants.analysis.perf import FitError, decode, fit, prefill_seconds, training_gpu_days
from giants.analysis.tables import Column, get_path, human_bytes, human_count, markdown_table
from giants.presets import ARTICLE_PRESETS, get_config, get_preset

GB = 1e9
FIT_DTYPES = ("bf16", "fp8", "int4", "mxfp4")
COLORS = {"gpt-oss-120b": "#1f77b4", "llama-3-70b": "#d62728", "gemma-2-27b": "#2ca02c",
          "mixtral-8x22b": "#9467bd", "gpt-oss-120b-described": "#ff7f0e"}


def _contexts(max_context: int) -> list[int]:
    out, c = [], 512
    while c < max_context:
        out.append(c)
        c *= 2
    return out + [max_context]


def _shipped_dtype(name: str) -> str:
    return published_format(name)


# ---- plots -----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tokens(v: float, _pos=None) -> str:
    """512, 8K, 128K: context lengths as people write them."""
    return f"{v / 1024:g}K" if v >= 1024 else f"{v:g}"


def _log_axes(ax, x: str = "tokens") -> None:
    """Plain tick labels on log axes (0.2, 5, 100 rather than 2x10^-1): x as token counts or integers."""
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation

    class Plain(LogFormatterSciNotation):
        def __call__(self, v, pos=None):  # keep matplotlib's choice of which ticks get a label
            return f"{v:g}" if super().__call__(v, pos) else ""

    ax.yaxis.set_major_formatter(Plain())
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.6)))
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens if x == "tokens" else lambda v, _p: f"{v:g}"))


DESCRIBED = "gpt-oss-120b-described"
ARTICLE = "a popular comparison article"  # of GPT-OSS-120B, Llama 3 70B, Gemma 2 27B and Mixtral 8x22B
DESCRIBED_NOTE = ("gpt-oss-120b-described builds GPT-OSS-120B as a popular comparison article describes it (dense, "
                  "multi-head attention, T5 relative bias, SwiGLU 4x); the article gives no dimensions, so d_model "
                  "10240, 70 layers and 80 heads are giants' choice (~121.6B parameters)")


def _billions(b: float) -> str:
    return f"{b:.2f}B" if b < 1 else f"{b:.1f}B"


def _label(name: str) -> str:
    return f"{name}*" if name == DESCRIBED else name


def plot_params(path: Path) -> None:
    """Bars on linear axes (a log axis made gpt-oss-120b's 5.1B active look like 70% of its 116.8B): one panel
    for the models above 10B and one for those below, each from zero."""
    plt = _plt()
    names = sorted(REAL_PRESETS, key=lambda n: count_params(get_config(n)).total)
    big = [n for n in names if count_params(get_config(n)).total >= 10e9]
    small = [n for n in names if n not in big]
    fig, axes = plt.subplots(2, 1, figsize=(10, 8.2), gridspec_kw={"height_ratios": [len(big), len(small)]})
    for ax, group, title in ((axes[0], big, "models above 10B parameters"),
                             (axes[1], small, "models below 10B parameters (their own scale)")):
        tot = [count_params(get_config(n)).total / 1e9 for n in group]
        act = [count_params(get_config(n)).active / 1e9 for n in group]
        y = range(len(group))
        ax.barh([i + 0.2 for i in y], tot, height=0.4, label="total", color="#7f7f7f")
        ax.barh([i - 0.2 for i in y], act, height=0.4, label="active per token (no input embedding)",
                color="#1f77b4")
        top = max(tot)
        for i, (t, a) in enumerate(zip(tot, act)):
            ax.text(t + top * 0.01, i + 0.2, _billions(t), va="center", fontsize=8)
            share = f" ({a / t:.0%} of total)" if a < t * 0.98 else ""
            ax.text(a + top * 0.01, i - 0.2, _billions(a) + share, va="center", fontsize=8, color="#1f77b4")
        ax.set_yticks(list(y), [_label(n) for n in group])
        ax.set_xlim(0, top * 1.22)
        ax.set_xlabel("parameters (billions, linear scale)")
        ax.set_ylabel("model (preset)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Total vs active parameters per token")
    fig.text(0.01, 0.005, "* " + DESCRIBED_NOTE, fontsize=7, color="#555", wrap=True)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(plt, n: int):
    """A 2 x 3 grid: one panel per model and a last panel comparing them all."""
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.5))
    axes = list(axes.flat)
    for ax in axes[n + 1:]:
        ax.set_visible(False)
    return fig, axes


def plot_kv(path: Path, names: Sequence[str]) -> None:
    plt = _plt()
    fig, axes = _grid(plt, len(names))
    for ax, name in zip(axes, names):
        cfg = get_config(name)
        ctx = _contexts(min(cfg.max_context, 131072))
        variants = [("as built", cfg, "-")]
        if any(cfg.windows):
            variants.append(("no sliding windows", cfg.replace(layer_windows=()), "--"))
        if cfg.n_kv_heads != cfg.n_heads:
            variants.append(("MHA, no windows", cfg.replace(n_kv_heads=cfg.n_heads, layer_windows=()), ":"))
        for label, c, style in variants:
            ax.plot(ctx, [kv_cache_bytes(c, t) / GB for t in ctx], style, marker="o", ms=3, label=label,
                    color=COLORS.get(name, "k"))
        axes[len(names)].plot(ctx, [kv_cache_bytes(cfg, t) / GB for t in ctx], marker="o", ms=3, label=name,
                              color=COLORS.get(name, "k"))
        ax.set_title(f"{name}: {cfg.n_heads} q / {cfg.n_kv_heads} kv heads", fontsize=10)
        ax.legend(fontsize=8)
    axes[len(names)].set_title("all, as built", fontsize=10)
    axes[len(names)].legend(fontsize=8)
    for ax in axes[:len(names) + 1]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _log_axes(ax)
        ax.set_xlabel("context (tokens, log scale)")
        ax.set_ylabel("KV cache, bf16, batch 1 (GB, log scale)")
        ax.grid(alpha=0.3)
    fig.suptitle("KV cache vs context: what GQA and sliding windows save (curves end at each max_context)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_serving(path: Path, names: Sequence[str]) -> None:
    plt = _plt()
    fig, axes = _grid(plt, len(names))
    last = axes[len(names)]
    for ax, name in zip(axes, names):
        cfg = get_config(name)
        ctx = _contexts(min(cfg.max_context, 131072))
        for dt, style in (("bf16", "-"), ("int4", "--"), ("mxfp4", ":")):
            ys = [serving_memory(cfg, t, 1, dt).total / GB for t in ctx]
            label = {"int4": "int4 (attention + MLP)", "mxfp4": "mxfp4 (MLP only)"}.get(dt, dt)
            ax.plot(ctx, ys, style, marker="o", ms=3, label=label, color=COLORS.get(name, "k"))
            if dt != "int4":
                last.plot(ctx, ys, style, color=COLORS.get(name, "k"), label=name if dt == "bf16" else None)
        ax.set_title(_label(name), fontsize=10)
    last.set_title("all: bf16 solid, MXFP4 dotted", fontsize=10)
    last.legend(fontsize=7.5, loc="lower right", title="model (colour)", title_fontsize=8)
    for ax in axes[:len(names) + 1]:
        for mem in (24, 48, 80, 141, 192):
            ax.axhline(mem, color="grey", lw=0.7, alpha=0.6)
            ax.text(1.0, mem, f" {mem} GB", fontsize=7, color="grey", va="center",
                    transform=ax.get_yaxis_transform())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(5, 1000)
        _log_axes(ax)
        ax.set_xlabel("context (tokens, log scale)")
        ax.set_ylabel("serving memory, batch 1 (GB, log scale)")
        ax.grid(alpha=0.3)
    fig.suptitle("Serving memory vs context (weights + KV cache + workspace, one sequence); grey lines: GPU sizes\n"
                 "mxfp4 quantises only the MLP (experts), as gpt-oss ships; int4 also attention, so a dense model's "
                 "mxfp4 sits above its int4")
    # One legend for the line styles, below the panels: inside each panel it covered the bf16 curve.
    from matplotlib.lines import Line2D

    styles = [Line2D([], [], color="k", ls=ls, marker="o", ms=3, label=lab) for ls, lab in
              (("-", "bf16 weights"), ("--", "int4 weights (attention + MLP)"), (":", "mxfp4 weights (MLP only)"))]
    fig.legend(handles=styles, loc="lower center", bbox_to_anchor=(0.5, 0.02), ncol=3, fontsize=9, frameon=False)
    fig.text(0.01, 0.005, "* " + DESCRIBED_NOTE, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_decode(path: Path, names: Sequence[str], context: int) -> None:
    plt = _plt()
    gpu = get_gpu("h100-80gb")
    batches = [2**i for i in range(10)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        cfg = get_config(name)
        ctx = min(context, cfg.max_context)
        dt = _shipped_dtype(name)
        try:
            n = fit(cfg, gpu, ctx, 1, dt).gpus
        except FitError:
            continue
        xs, agg, per = [], [], []
        for b in batches:
            if serving_memory(cfg, ctx, b, dt, tp=n).total > gpu.memory_bytes:
                break
            d = decode(cfg, gpu, n, ctx, b, dt)
            xs.append(b)
            agg.append(d.tokens_per_s)
            per.append(d.tokens_per_s_per_seq)
        label = f"{name} ({dt}, {n}x H100)"
        a1.plot(xs, agg, marker="o", ms=3, label=label, color=COLORS.get(name, "k"))
        a2.plot(xs, per, marker="o", ms=3, label=label, color=COLORS.get(name, "k"))
    for ax, title in ((a1, "aggregate over the batch"), (a2, "per sequence")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _log_axes(ax, x="int")
        ax.set_xlabel("batch (sequences decoding together, log scale)")
        ax.set_ylabel(f"tokens/s, log scale (roofline bound, context {context})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    # Below both panels: inside one, the legend sat on the fastest model's line.
    handles, labels = a2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Roofline decode on H100 80GB (lines stop where the batch's KV cache no longer fits)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fit_matrix(names: Sequence[str], context: int, dtype: str) -> list[list[int | None]]:
    out = []
    for name in names:
        cfg = get_config(name)
        row = []
        for g in GPUS.values():
            try:
                row.append(fit(cfg, g, min(context, cfg.max_context), 1, dtype).gpus)
            except FitError:
                row.append(None)
        out.append(row)
    return out


def plot_fit(path: Path, names: Sequence[str], context: int) -> None:
    plt = _plt()
    import numpy as np

    dts = ("bf16", "fp8", "int4", "mxfp4")
    fig, axes = plt.subplots(1, len(dts), figsize=(4.4 * len(dts), 0.4 * len(names) + 2.2), sharey=True)
    for ax, dt in zip(axes, dts):
        m = fit_matrix(names, context, dt)
        arr = np.array([[v if v else NODE_SIZE * 2 for v in row] for row in m], dtype=float)
        ax.imshow(np.log2(arr), cmap="YlOrRd", vmin=-0.5, vmax=4.5, aspect="auto")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, str(v) if v else "✗", ha="center", va="center", fontsize=8,
                        color="white" if not v or v >= NODE_SIZE else "black")
        ax.set_xticks(range(len(GPUS)), [g.label.replace(" SXM", "") for g in GPUS.values()], rotation=45,
                      ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"{dt} weights" + (" (MLP/experts only)" if dt == "mxfp4" else ""), fontsize=10)
        ax.set_xlabel("GPU", fontsize=9)
    axes[0].set_ylabel("model", fontsize=9)
    fig.suptitle(f"Fewest GPUs to serve one sequence at context {context} (✗: more than one {NODE_SIZE}-GPU node)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- tables ----------------------------------------------------------------------------------

def _serving_rows(names: Sequence[str], context: int) -> list[dict]:
    gpu = get_gpu("h100-80gb")
    rows = []
    for name in names:
        cfg = get_config(name)
        ctx = min(context, cfg.max_context)
        dt = _shipped_dtype(name)
        try:
            f = fit(cfg, gpu, ctx, 1, dt)
        except FitError as e:
            rows.append({"model": name, "dtype": dt, "gpus": None, "note": str(e)})
            continue
        d1 = decode(cfg, gpu, f.gpus, ctx, 1, dt)
        b = 64
        while b > 1 and serving_memory(cfg, ctx, b, dt, tp=f.gpus).total > gpu.memory_bytes:
            b //= 2
        db = decode(cfg, gpu, f.gpus, ctx, b, dt)
        rows.append({"model": name, "dtype": dt, "context": ctx, "gpus": f.gpus, "layout": f.layout(cfg),
                     "memory": f.memory.total, "tps1": d1.tokens_per_s, "batch": b, "tpsb": db.tokens_per_s,
                     "prefill_ms": prefill_seconds(cfg, gpu, f.gpus, ctx, 1, dt) * 1e3,
                     "measured": fit_lines(name, gpu.name, None)[0].removeprefix("measured: ")})
    return rows


def measured_note(runs: Sequence) -> str:
    n_random = sum(r.random_weights for r in runs)
    return ("What the benchmarks/ scripts measured on real GPUs (giants/analysis/measured_runs.json, written by their "
            f"--record; nothing here is computed). {n_random} of {len(runs)} runs used random weights: a random-weight "
            "run is a speed and memory run (the real model's shapes, bytes and kernels), not a quality run. Memory is "
            "what the run reports (max allocated or weights resident), not the computed fit.")


def _training_rows(names: Sequence[str], tokens: float, mfu: float, seq_len: int) -> list[dict]:
    gpu = get_gpu("h100-80gb")
    rows = []
    for name in names:
        cfg = get_config(name)
        dp = next(d for d in (2**i for i in range(17))
                  if training_memory(cfg, seq_len=seq_len, dp=d).total <= gpu.memory_bytes)
        m = training_memory(cfg, seq_len=seq_len, dp=dp)
        rows.append({"model": name, "fsdp_gpus": dp, "memory": m.total,
                     "gpu_days": training_gpu_days(cfg, gpu, tokens, mfu, seq_len)})
    return rows


def _fit_rows(names: Sequence[str], context: int) -> list[dict]:
    rows = []
    for dt in FIT_DTYPES:
        m = fit_matrix(names, context, dt)
        for name, row in zip(names, m):
            rec = {"model": name, "dtype": dt}
            rec.update({g: (str(v) if v else "✗") for g, v in zip(GPUS, row)})
            rows.append(rec)
    return rows


def _html_table(records: Sequence[dict], columns: Sequence[Column], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in columns)
    body = []
    for r in records:
        cells = []
        for c in columns:
            v = get_path(r, c.key)
            text = "-" if v is None else c.fmt(v)
            extra = f' class="verdict-{html.escape(text)}"' if c.key == "verdict" else ""
            cells.append(f"<td{extra}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1280px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45} h1{font-size:1.7em} h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.86em} th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right;vertical-align:top} th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
table.claims td{text-align:left} .verdict-true{background:#d9f2d9;font-weight:bold}
.verdict-false{background:#f8d7d7;font-weight:bold} .verdict-misleading{background:#fff1c2;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} .note{color:#555;font-size:.9em}
"""


def write_report(out: str | Path = "report", context: int = 8192, tokens: float = 1e12, mfu: float = 0.4,
                 seq_len: int = 4096) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    article = list(ARTICLE_PRESETS)
    plots = {
        "params.png": ("Total vs active parameters", lambda p: plot_params(p)),
        "kv_cache.png": ("KV cache vs context, with and without GQA and windows", lambda p: plot_kv(p, article)),
        "serving_memory.png": ("Serving memory vs context at bf16, int4 and MXFP4",
                               lambda p: plot_serving(p, article)),
        "decode_roofline.png": ("Roofline decode tokens/s vs batch", lambda p: plot_decode(p, article, context)),
        "gpu_fit.png": ("Which GPUs fit", lambda p: plot_fit(p, list(REAL_PRESETS), context)),
    }
    for fname, (_, draw) in plots.items():
        draw(out / fname)

    claims = [c.as_dict() for c in check_claims(context)]
    compare = [compare_record(n, get_config(n), min(context, get_config(n).max_context), "bf16", "bf16",
                              get_preset(n).source) for n in REAL_PRESETS]
    serving = _serving_rows(article, context)
    training = _training_rows(article, tokens, mfu, seq_len)
    fits = _fit_rows(article, context)
    runs = load_runs()
    gpus = [{"gpu": g.label, "memory": g.memory_bytes, "bw": g.bandwidth, "bf16": g.bf16_flops, "fp8": g.fp8_flops,
             "source": g.source} for g in GPUS.values()]

    tf = lambda v: f"{v / 1e12:,.2f}"  # noqa: E731
    sections: list[tuple[str, str, list[dict] | None, list[Column] | None, str]] = [
        ("The article's claims, checked", "Each verdict is computed from the presets' configs (see evidence). "
         + DESCRIBED_NOTE + ".",
         claims, [Column("model", "model"), Column("claim", "claim"), Column("computed evidence", "evidence"),
                  Column("verdict", "verdict")], "claims"),
        (f"Models side by side (context up to {context}, bf16)",
         "active excludes the input embedding table (gpt-oss model card convention); active+emb includes it. "
         "KV cache and FLOPs at min(context, max_context) tokens. Weight formats: fp8, int8 and int4 quantise the "
         "attention and MLP matrices; mxfp4 only the MLP (the experts of an MoE, as gpt-oss ships) while attention "
         "stays bf16, which is why a dense model's mxfp4 column is above its int4 (llama-3-70b: "
         f"{human_bytes(weight_bytes(get_config('llama-3-70b'), 'mxfp4'))} vs "
         f"{human_bytes(weight_bytes(get_config('llama-3-70b'), 'int4'))}). Embeddings and head stay bf16. "
         + DESCRIBED_NOTE + ".",
         compare, compare_columns(context, "bf16", "bf16"), ""),
        (f"Serving the compared models on H100 80GB (context {context}, as published: gpt-oss MXFP4, others bf16)",
         "Roofline upper bounds: decode = max(bytes read / bandwidth, FLOPs / peak); MoE reads only the experts "
         "a batch routes to (uniform routing).",
         serving, [Column("model", "model"), Column("weights", "dtype"), Column("GPUs", "gpus"),
                   Column("layout", "layout"), Column("memory/GPU", "memory", human_bytes),
                   Column("tok/s batch 1", "tps1", lambda v: f"{v:,.0f}"), Column("batch", "batch"),
                   Column("tok/s aggregate", "tpsb", lambda v: f"{v:,.0f}"),
                   Column(f"prefill {context} tok (ms)", "prefill_ms", lambda v: f"{v:,.1f}"),
                   Column("measured on H100 (newest run)", "measured"), Column("note", "note")], ""),
        ("Measured runs", measured_note(runs), as_records(sorted(runs, key=lambda r: (r.model, r.date))),
         [Column("model", "model"), Column("GPU", "gpu"), Column("weights", "weights"), Column("memory", "memory"),
          Column("tok/s batch 1", "tps1", lambda v: f"{v:,.2f}" if v < 10 else f"{v:,.1f}"),
          Column("tok/s 64 concurrent", "tps64", lambda v: f"{v:,.0f}"),
          Column("other concurrency (tok/s @requests)", "other"), Column("offload", "offload"),
          Column("weights kind", "weights_kind"), Column("date (UTC)", "date"), Column("commit", "commit"),
          Column("script", "script")], ""),
        ("Fewest GPUs to serve one sequence", "✗ = more than one 8-GPU node.", fits,
         [Column("model", "model"), Column("weights", "dtype")] + [Column(g.label, k) for k, g in GPUS.items()], ""),
        (f"Training: {human_count(tokens)} tokens at {mfu:.0%} MFU on H100 80GB (seq {seq_len}, FSDP, bf16 + fp32 "
         "AdamW, activation checkpointing)", "fewest FSDP GPUs = smallest power of two whose per-GPU memory fits.",
         training, [Column("model", "model"), Column("fewest FSDP GPUs", "fsdp_gpus"),
                    Column("memory/GPU", "memory", human_bytes),
                    Column("GPU-days", "gpu_days", lambda v: f"{v:,.0f}")], ""),
        ("GPU table", "Dense peaks (no sparsity); memory in 10^9 bytes as on the datasheets.", gpus,
         [Column("GPU", "gpu"), Column("memory", "memory", human_bytes), Column("bandwidth (TB/s)", "bw", tf),
          Column("bf16 TFLOP/s", "bf16", tf), Column("fp8 TFLOP/s", "fp8", tf), Column("source", "source")], ""),
    ]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = "giants report: a popular comparison article's claims, computed"
    intro = ("A popular comparison article sets GPT-OSS-120B beside Llama 3 70B, Gemma 2 27B and Mixtral 8x22B, and "
             "describes GPT-OSS-120B as a dense model with multi-head attention and T5-style relative position "
             "bias, which the published model is not. This report checks its claims with parameter counts, FLOPs, "
             "KV cache, weight and serving memory, GPU fits and roofline speeds, computed from each model's "
             "architecture (giants presets; nothing downloaded). Generated " + stamp + ".")

    md = [f"# {title}", "", intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for head, note, recs, cols, cls in sections:
        md += [f"## {head}", "", note, "", markdown_table(recs, cols), ""]
        body += [f"<h2>{html.escape(head)}</h2>", f'<p class="note">{html.escape(note)}</p>',
                 _html_table(recs, cols, cls)]
        if cls == "claims":  # plots right after the claims
            md += ["## Plots", ""]
            body.append("<h2>Plots</h2>")
            for fname, (caption, _) in plots.items():
                md += [f"### {caption}", "", f"![{caption}]({fname})", ""]
                data = base64.b64encode((out / fname).read_bytes()).decode()
                body += [f"<h3>{html.escape(caption)}</h3>",
                         f'<img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" '
                         f'data-file="{fname}">']
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>" + html.escape(title) +
            f"</title><style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>")
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    return {"html": out / "index.html", "md": out / "report.md", "plots": [out / f for f in plots],
            "claims": claims}
