"""Imported for its effect: puts benchmarks/ on sys.path, so that the scripts here can import the user-facing
benchmark scripts beside it (bench_train, bench_decode) when run as `python benchmarks/investigations/X.py`."""

import sys
from pathlib import Path

_DIR = str(Path(__file__).resolve().parents[1])
if _DIR not in sys.path:
    sys.path.insert(0, _DIR)
