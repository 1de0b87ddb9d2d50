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
    align: str = "right"  # rich only; text columns read better "left"


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


def _print_rich(records: Sequence[dict], columns: Sequence[Column], title: str, notes: Sequence[str],
                transpose: bool) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    # Piped output is not limited to 80 columns: the table stays readable in a file or a pager.
    console = Console(width=None if sys.stdout.isatty() else 200)
    if title:
        console.print(f"[bold]{title}[/bold]")
    cells = _cells(records, columns)
    table = Table()
    if transpose:
        table.add_column(columns[0].header, justify="left")
        for row in cells:
            table.add_column(row[0], justify="right")
        for j, c in enumerate(columns[1:], start=1):
            table.add_row(c.header, *(row[j] for row in cells))
    else:
        for i, c in enumerate(columns):
            table.add_column(c.header, justify="left" if i == 0 else c.align)  # type: ignore[arg-type]
        for row in cells:
            table.add_row(*row)
    console.print(table)
    for n in notes:
        console.print(n, style="dim")
