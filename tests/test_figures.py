"""Issue 25, item 5: every figure readable at a glance. Each figure the report and the arena write is checked as
it is saved: no text cut off at the edge, no two labels on top of each other, annotations inside their panel
with room under the frame, and no legend over the data it explains (the arena's expert legend hid bars, the
serving-memory legends covered the bf16 curves). What a test cannot judge (is the scale honest, is the message
right) was checked by eye; these keep the layout from sliding back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402


def _texts(fig: Figure) -> list[Text]:
    """The visible texts a reader sees: titles, axis labels, the tick labels inside the view, annotations,
    legend entries, figure texts."""
    texts: list[Text] = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            slack = 1e-9 * max(abs(lo), abs(hi))
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                # matplotlib keeps labels for ticks outside the view; they are never drawn
                if lo - slack <= tick.get_loc() <= hi + slack and tick.label1.get_visible():
                    texts.append(tick.label1)
    texts += list(fig.texts) + [t for leg in fig.legends for t in leg.get_texts()]
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    return list({id(t): t for t in texts if t.get_visible() and t.get_text().strip()}.values())


def layout_problems(fig: Figure) -> list[str]:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    fb = fig.bbox
    out = []
    boxes = [(t, t.get_window_extent(r)) for t in _texts(fig)]
    for t, b in boxes:
        if b.x0 < fb.x0 - 1 or b.y0 < fb.y0 - 1 or b.x1 > fb.x1 + 1 or b.y1 > fb.y1 + 1:
            out.append(f"cut off at the edge: {t.get_text()!r}")
    for i, (t1, b1) in enumerate(boxes):
        for t2, b2 in boxes[i + 1:]:
            if t1.get_rotation() and t2.get_rotation():
                continue  # rotated labels: their axis-aligned boxes overlap though the glyphs do not
            if min(b1.x1, b2.x1) - max(b1.x0, b2.x0) > 1 and min(b1.y1, b2.y1) - max(b1.y0, b2.y0) > 1:
                out.append(f"overlap: {t1.get_text()!r} / {t2.get_text()!r}")
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        ab = ax.get_window_extent(r)
        for t in ax.texts:
            if t.get_transform() is not ax.transData:
                continue  # placed relative to the panel on purpose (the GPU-size labels beside it)
            tb = t.get_window_extent(r)
            if not (ab.x0 <= tb.x0 and tb.x1 <= ab.x1 and ab.y0 <= tb.y0 and tb.y1 <= ab.y1 - tb.height / 2):
                out.append(f"annotation outside its panel or on its frame: {t.get_text()!r}")
        leg = ax.get_legend()
        if leg is None:
            continue
        lb = leg.get_window_extent(r)
        for line in ax.get_lines():
            xy = line.get_transform().transform(np.column_stack([np.asarray(v, float) for v in line.get_data()]))
            if any(lb.contains(x, y) for x, y in xy):
                out.append(f"legend over the data of {ax.get_title()!r}: {line.get_label()}")
        if any(p.get_window_extent(r).overlaps(lb) for p in ax.patches):
            out.append(f"legend over a bar of {ax.get_title()!r}")
    for leg in fig.legends:
        lb = leg.get_window_extent(r)
        for ax in fig.axes:
            if ax.get_visible() and lb.overlaps(ax.get_window_extent(r)):
                out.append(f"figure legend over the panel {ax.get_title()!r}")
    return out


@pytest.fixture
def checked_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Every figure saved while the test runs, by file name, with its layout problems."""
    seen: dict[str, list[str]] = {}
    save = Figure.savefig

    def spy(self: Figure, fname: Any, *args: Any, **kw: Any) -> Any:
        seen[Path(str(fname)).name] = layout_problems(self)
        return save(self, fname, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def _arena_report(moe_peak: float = 0.36) -> dict[str, Any]:
    """An arena report shaped like a real run's: five twins, the tallest bar first, MoE routing uneven."""
    from giants.presets import TINY_PRESETS

    results = {}
    for i, name in enumerate(TINY_PRESETS):
        moe = name in ("tiny-mixtral", "tiny-gpt-oss")
        history = []
        for step in range(1, 121):
            h: dict[str, Any] = {"step": step, "tokens": step * 1024, "train_loss": 10.8 - 3.6 * (step / 120) ** 0.5
                                 - 0.02 * i}
            if step % 20 == 0:
                h["val_loss"] = h["train_loss"] + 0.15
            if moe:  # every expert tall in one layer: no free corner for a legend inside the panel
                util = [[moe_peak if (e + layer) % 4 == 0 else (1 - 2 * moe_peak) / 6 for e in range(8)]
                        for layer in range(4)]
                h["router"] = {"utilisation": util, "balance": [0.8] * 4}
            history.append(h)
        results[name] = {"history": history, "flops_per_token": 2.0e7 * (1 + 0.1 * i),
                         "tokens_per_s": 1650.0 / (1 + 0.5 * i), "device": "cpu", "isolated": True,
                         "peak_memory": {"bytes": (1400 + 10 * i) * 2**20, "kind": "process peak RSS"},
                         "memory_estimate": 1500 * 2**20}
    return {"results": results}


def test_arena_figures_lay_out_cleanly(tmp_path: Path, checked_figures: dict[str, list[str]]) -> None:
    from giants.train.arena import plot_arena

    assert plot_arena(_arena_report(), tmp_path) == ["arena.png", "experts.png"]
    assert set(checked_figures) == {"arena.png", "experts.png"}
    assert checked_figures == {"arena.png": [], "experts.png": []}


def test_report_figures_lay_out_cleanly(tmp_path: Path, checked_figures: dict[str, list[str]],
                                        capsys: pytest.CaptureFixture) -> None:
    from giants.cli import main

    assert main(["report", "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs and sorted(checked_figures) == pngs
    assert {k: v for k, v in checked_figures.items() if v} == {}


def test_the_checker_sees_a_legend_over_bars(checked_figures: dict[str, list[str]], tmp_path: Path) -> None:
    """The check itself: the experts figure as it was (a legend inside the panel, over the first bars)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for layer in range(4):
        ax.bar([e + layer * 0.2 for e in range(8)], [0.36] + [0.05] * 7, width=0.2, label=f"layer {layer}")
    ax.text(0, 0.36, "label on the frame", ha="center", va="bottom")
    ax.legend(fontsize=7, loc="upper left")  # where "best" put it on a real run: no free corner was left
    fig.savefig(tmp_path / "old.png")
    plt.close(fig)
    problems = checked_figures["old.png"]
    assert any("legend over a bar" in p for p in problems), problems
    assert any("on its frame" in p for p in problems), problems
