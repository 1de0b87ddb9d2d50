"""`giants` entry point. Each area registers its own subcommands; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

AREAS = ("giants.analysis.cli", "giants.checkpoint.cli", "giants.inference.cli", "giants.serve.cli",
         "giants.train.cli")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


def _presets(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from giants.analysis.params import count_params
    from giants.presets import PRESETS

    table = Table(title="giants presets")
    for col in ("preset", "family", "params", "active", "layers", "d_model", "heads (q/kv)", "experts", "source"):
        table.add_column(col)
    for name, p in PRESETS.items():
        c = p.config
        pc = count_params(c)
        table.add_row(name, p.family, _fmt(pc.total), _fmt(pc.active), str(c.n_layers), str(c.d_model),
                      f"{c.n_heads}/{c.n_kv_heads}", f"{c.experts_per_token}/{c.n_experts}" if c.is_moe else "-",
                      p.source)
    Console().print(table)
    return 0


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="giants", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="list every preset with its size")
    p.set_defaults(func=_presets)
    for area in AREAS:
        importlib.import_module(area).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"giants {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
