"""One table, four renderings: rich (terminal), Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = ("rich", "md", "json", "csv")


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:g} B"


def human_flops(n: float) -> str:
    return human_count(n).replace("T", " TFLOP").replace("B", " GFLOP").replace("M", " MFLOP").replace("K", " KFLOP")


@dataclass(frozen=True)
class Column:
    header: str
    key: str  # dotted path into a record
    fmt: Callable[[Any], str] = str
    align: str = "right"  # rich only; text columns read better "left" (and may wrap)
    optional: bool = False  # rich only: left out (and said so) when the terminal is too narrow for the table


def get_path(record: dict, key: str) -> Any:
    cur: Any = record
    for part in key.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _cells(records: Sequence[dict], columns: Sequence[Column]) -> list[list[str]]:
    rows = []
    for r in records:
        row = []
        for c in columns:
            v = get_path(r, c.key)
            row.append("-" if v is None else c.fmt(v))
        rows.append(row)
    return rows


def markdown_table(records: Sequence[dict], columns: Sequence[Column]) -> str:
    head = "| " + " | ".join(c.header for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _cells(records, columns)]
    return "\n".join([head, sep, *body])


def render(records: Sequence[dict], columns: Sequence[Column], fmt: str, title: str = "",
           notes: Sequence[str] = (), json_payload: Any = None, transpose: bool = False) -> str:
    """Text for `fmt`; rich returns '' after printing to the terminal itself. `transpose` (rich only) puts
    records in columns and fields in rows, which keeps a few-model comparison inside a terminal."""
    if fmt == "json":
        return json.dumps(records if json_payload is None else json_payload, indent=2)
    if fmt == "csv":
        flat = [flatten(r) for r in records]
        fields: list[str] = []
        for f in flat:
            fields += [k for k in f if k not in fields]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(flat)
        return buf.getvalue().rstrip("\n")
    if fmt == "md":
        parts = [f"### {title}", ""] if title else []
        parts.append(markdown_table(records, columns))
        parts += [""] + [f"- {n}" for n in notes] if notes else []
        return "\n".join(parts)
    if fmt == "rich":
        _print_rich(records, columns, title, notes, transpose)
        return ""
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def _width(cells: Sequence[str], header: str) -> int:
    return max([len(header), *(len(c) for c in cells)])


def _print_rich(records: Sequence[dict], columns: Sequence[Column], title: str, notes: Sequence[str],
                transpose: bool) -> None:
    """Names (the first column, or the records across the top when transposed) are never cut. A table wider than
    the terminal first drops its optional columns (and says so), then wraps its left-aligned text columns; one
    still too wide is shown transposed, the records split over as many tables as the width needs."""
    import os
    import sys

    from rich.console import Console
    from rich.table import Table

    # Piped output is not limited to 80 columns (the table stays readable in a file or a pager), unless
    # COLUMNS says how wide to be.
    console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
    width = console.width
    if title:
        console.print(f"[bold]{title}[/bold]")
    cells = _cells(records, columns)
    dropped: list[str] = []
    keep = list(range(len(columns)))

    def least(i: int) -> int:  # the narrowest a column gets: text columns wrap to a dozen characters
        w = _width([r[i] for r in cells], columns[i].header)
        return min(12, w) if i and columns[i].align == "left" else w

    if not transpose:
        for i in reversed(range(1, len(columns))):
            if 1 + sum(3 + least(j) for j in keep) <= width:
                break
            if columns[i].optional:
                keep.remove(i)
                dropped.append(columns[i].header)
        transpose = 1 + sum(3 + least(j) for j in keep) > width
    cols = [columns[i] for i in keep]
    cells = [[row[i] for i in keep] for row in cells]
    tables = []
    if transpose:
        label_w = _width([c.header for c in cols[1:]], cols[0].header) + 3
        groups: list[list[int]] = [[]]
        used = label_w + 1
        for i, row in enumerate(cells):
            w = _width(row[1:], row[0]) + 3
            if groups[-1] and used + w > width:
                groups.append([])
                used = label_w + 1
            groups[-1].append(i)
            used += w
        for g in groups:
            table = Table()
            table.add_column(cols[0].header, justify="left", no_wrap=True)
            for i in g:
                table.add_column(cells[i][0], justify="right", overflow="fold", min_width=len(cells[i][0]))
            for j, c in enumerate(cols[1:], start=1):
                table.add_row(c.header, *(cells[i][j] for i in g))
            tables.append(table)
    else:
        table = Table()
        for i, c in enumerate(cols):
            if i == 0:
                table.add_column(c.header, justify="left", no_wrap=True, min_width=least(0))
            elif c.align == "left":
                table.add_column(c.header, justify="left", overflow="fold")
            else:
                table.add_column(c.header, justify=c.align, no_wrap=True)  # type: ignore[arg-type]
        for row in cells:
            table.add_row(*row)
        tables.append(table)
    for table in tables:
        console.print(table)
    if dropped:
        console.print(f"({', '.join(reversed(dropped))} left out at {width} columns: widen the terminal or use "
                      "--format md / json)", style="dim")
    for n in notes:
        console.print(n, style="dim")
