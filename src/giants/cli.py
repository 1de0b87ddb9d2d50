"""giants: build, verify, analyse, train and serve Llama 3, Gemma 2, Mixtral and gpt-oss from one model definition.

Start here:
  giants presets                                 every model shape giants knows, with its size
  giants compare                                 the compared models side by side (params, KV cache, memory)
  giants fit gpt-oss-120b                        how many GPUs serving a model needs, and why
  giants download smollm2-135m                   a small real model (98 MB GGUF) into ~/.cache/giants
  giants generate smollm2-135m "Hello" --chat    text from it on the CPU (~10 s)
  giants chat smollm2-135m                       talk to it in the terminal
  giants train --preset tiny-llama --data shakespeare --steps 20 --out runs/first

`giants COMMAND --help` shows each command's options with their defaults and examples.
Presets (`giants presets`) have the real models' shapes but random weights: use them for sizes and speed;
for text, load real weights (a known name such as smollm2-135m, a .gguf file or a Hugging Face folder).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

AREAS = ("giants.analysis.cli", "giants.checkpoint.cli", "giants.inference.cli", "giants.serve.cli",
         "giants.train.cli")

# Shown under each command's --help (commands registered by any area).
EXAMPLES = {
    "presets": ["giants presets", "giants presets --format json"],
    "compare": ["giants compare", "giants compare llama-3.1-8b gemma-2-9b --context 32768",
                "giants compare --format json | head"],
    "fit": ["giants fit gpt-oss-120b                  # as published (MXFP4 experts): 1 x H100",
            "giants fit llama-3-70b --dtype fp8 --gpu h200-141gb",
            "giants fit --budget '2x a100-80gb'",
            "giants fit llama-3.1-8b --train --tokens 1e11"],
    "report": ["giants report --out report    # writes report/index.html and report/report.md (~20 s)"],
    "download": ["giants download smollm2-135m", "giants download --list"],
    "inspect": ["giants inspect smollm2-135m", "giants inspect path/to/model.gguf --json"],
    "convert": ["giants convert smollm2-135m out/smollm2-hf    # GGUF -> HF folder transformers loads"],
    "generate": ["giants generate smollm2-135m \"Write a haiku about the sea\" --chat",
                 "giants generate smollm2-135m \"Once upon a time\" -n 3 --max-tokens 40 --stop '.'",
                 "echo \"Name three rivers\" | giants generate smollm2-135m - --chat --system 'Answer briefly.'",
                 "giants generate tiny-llama \"hi\" --max-tokens 8    # a preset: random weights, for speed only"],
    "serve": ["giants serve smollm2-135m --port 8000",
              "curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
              "-d '{\"model\": \"smollm2-135m\", \"prompt\": \"Hello\", \"max_tokens\": 16}'"],
    "chat": ["giants chat smollm2-135m", "giants chat smollm2-135m --system 'You are terse.' --threads 1"],
    "prepare": ["giants prepare --help    # tokenise your own text files for giants train --data"],
    "train": ["giants train --preset tiny-llama --data shakespeare --steps 20 --out runs/first   # ~1 min on 2 cores",
              "giants plot runs/first"],
    "plot": ["giants plot runs/first"],
    "arena": ["giants arena --out arena    # the five tiny twins at a matched budget (< 10 min on 2 CPU cores)"],
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and example epilogs keep their line breaks; every option shows its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if ("default" in help or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return help
        return f"{help} (default: %(default)s)" if help else "default: %(default)s"

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "default: %(default)s"  # an option with a default but no help still shows it
        return super()._format_action(action)


def _presets(args: argparse.Namespace) -> int:
    from giants.analysis.params import count_params
    from giants.analysis.tables import Column, human_count, render
    from giants.presets import PRESETS

    records = []
    for name, p in PRESETS.items():
        c = p.config
        pc = count_params(c)
        records.append({"preset": name, "family": p.family, "params": pc.total, "active": pc.active,
                        "layers": c.n_layers, "d_model": c.d_model, "heads": f"{c.n_heads}/{c.n_kv_heads}",
                        "experts": f"{c.experts_per_token}/{c.n_experts}" if c.is_moe else "-",
                        "max_context": c.max_context, "source": p.source})
    cols = [Column("preset", "preset"), Column("family", "family", optional=True),
            Column("params", "params", human_count), Column("active", "active", human_count),
            Column("layers", "layers"), Column("d_model", "d_model"), Column("heads (q/kv)", "heads"),
            Column("experts", "experts"), Column("source", "source", align="left", optional=True)]
    text = render(records, cols, args.format, title="giants presets (shapes of real models; built with random "
                  "weights: see `giants download` for real ones)")
    if text:
        print(text)
    return 0


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _version() -> str:
    from importlib import metadata

    from giants import __version__

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"giants {__version__} (torch {torch}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    from giants.analysis.tables import FORMATS

    parser = argparse.ArgumentParser(prog="giants", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    add = sub.add_parser

    def add_parser(name: str, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        if "description" not in kw and "help" in kw:
            kw["description"] = kw["help"][:1].upper() + kw["help"][1:] + "."
        if name in EXAMPLES and "epilog" not in kw:
            kw["epilog"] = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[name])
        return add(name, **kw)

    sub.add_parser = add_parser  # every area's commands get the formatter and their examples
    p = sub.add_parser("presets", help="list every preset with its size")
    p.add_argument("--format", choices=FORMATS, default="rich", help="output format")
    p.set_defaults(func=_presets)
    for area in AREAS:
        importlib.import_module(area).register(sub)
    return parser


def _quiet_broken_pipe() -> int:
    """`giants ... | head`: the reader went away. Exit like a process SIGPIPE ended, without a traceback (and
    without Python's second complaint when it flushes stdout at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, MemoryError) as e:
        try:
            print(f"giants {args.command}: error: {e}", file=sys.stderr)
        except BrokenPipeError:
            pass
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
