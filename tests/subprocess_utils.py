"""Test scripts in fresh interpreters, several at once (the Triton interpreter runs on one core; the machine has more):
start each, then collect each one's exit code and output."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Started:
    """A script started with its output going to temporary files (no pipe to fill while another one is awaited)."""

    def __init__(self, argv: list[str], env: dict, timeout: float) -> None:
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, text=True, env=env)
        self._deadline = time.monotonic() + timeout
        self._result: tuple[int, str, str] | None = None

    def result(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr), waiting for the end (killed at the timeout: exit code negative)."""
        if self._result is None:
            try:
                rc = self._proc.wait(timeout=max(1.0, self._deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._proc.kill()
                rc = self._proc.wait()
            texts = []
            for f in (self._out, self._err):
                f.seek(0)
                texts.append(f.read())
                f.close()
            self._result = (rc, texts[0], texts[1])
        return self._result


    def close(self) -> None:
        """Stop it if still running (its result no longer wanted)."""
        if self._result is None:
            self._proc.kill()
            self._proc.wait()
            self._out.close()
            self._err.close()
            self._result = (self._proc.returncode, "", "")


def run_concurrently(argvs: list[list[str]], env: dict, timeout: float) -> list[tuple[int, str, str]]:
    """Each argv in its own process, all at once: (exit code, stdout, stderr) of each."""
    started = [Started(a, env, timeout) for a in argvs]
    return [s.result() for s in started]


def together(fn: Callable[..., Any], *runs: tuple[tuple, dict]) -> list[Any]:
    """fn(*args, **kwargs) for each (args, kwargs) at the same time, in threads (for independent command runs: most of
    a tiny one is starting Python and torch, which overlaps on two cores); results in order, the first error raised."""
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(fn, *args, **kw) for args, kw in runs]
        return [f.result() for f in futures]
