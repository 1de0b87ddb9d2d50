"""Chat templates rendered where they can be stopped.

A chat template is code that comes with the checkpoint, and what it does with the messages is up to it: a loop
nested over the message text can run for hours, `"x" * 10**10` can ask for gigabytes, and jinja2's sandbox
bounds neither. Rendering in the server process would hold one of its threads (and the GIL) for as long as the
template likes. So templates render in worker processes (`python -m giants.serve.template`: jinja2 and the
tokenizer's template environment, nothing else): each render must finish within `timeout` seconds and produce
at most `max_chars` characters, under an address-space limit; a worker that runs over is killed and replaced,
and the request gets a 400 naming the template. Other requests are not held up by it (a few workers render in
parallel; completions never render a template).

Protocol: one JSON line per message over the worker's stdin/stdout. First the parent sends
{"template", "special", "max_chars"} and the worker answers {"ready": true} once it has imported what it needs
(the time limit counts from there); then per render {"messages", "add_generation_prompt", "tools"} -> {"text"} or
{"error", "kind"}.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from giants.serve import DEFAULT_TEMPLATE_TIMEOUT, MAX_TEMPLATE_CHARS


class TemplateError(Exception):
    """The template raised (raise_exception, an undefined name, a sandbox violation): the messages' fault."""


class TemplateLimit(Exception):
    """The template ran over its time or size limit, or its worker died."""


STARTUP_TIMEOUT = 120.0  # seconds for a worker to import jinja2 and the tokenizer module (a loaded machine)


class _Worker:
    def __init__(self, init: bytes):
        self.proc = subprocess.Popen([sys.executable, "-m", "giants.serve.template"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, close_fds=True)
        self.buf = b""
        self.ready = False
        self.proc.stdin.write(init)
        self.proc.stdin.flush()

    def call(self, line: bytes, timeout: float) -> dict[str, Any]:
        if not self.ready:
            try:
                self._read(time.monotonic() + STARTUP_TIMEOUT)
            except TimeoutError:
                raise EOFError(f"the template worker did not start within {STARTUP_TIMEOUT:g} s") from None
            self.ready = True
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        return self._read(time.monotonic() + timeout)

    def _read(self, deadline: float) -> dict[str, Any]:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("the template worker exited")
            self.buf += chunk
        out, _, self.buf = self.buf.partition(b"\n")
        return json.loads(out)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(5)
        except Exception:  # noqa: BLE001 - already gone
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass


class TemplateRenderer:
    """Renders one tokenizer's chat template in up to `workers` worker processes (started on first use, or by
    `start()`). `render()` blocks (call it from a thread) and is thread-safe."""

    def __init__(self, tokenizer: Any, *, timeout: float = DEFAULT_TEMPLATE_TIMEOUT,
                 max_chars: int = MAX_TEMPLATE_CHARS, workers: int = 2):
        if not timeout > 0:
            raise ValueError(f"timeout: must be > 0 (got {timeout})")
        self.template = tokenizer.get_chat_template()  # ValueError when it has none
        self.timeout, self.max_chars = timeout, max_chars
        special = {k: v for k, v in getattr(tokenizer, "special", {}).items() if v is not None}
        self._init = _line({"template": self.template, "special": special, "max_chars": max_chars})
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._count = 0
        self._max = max(1, workers)
        self._closed = False
        self.killed = 0  # workers killed for running over (tests, logs)

    def start(self) -> None:
        """Start the workers now (each takes a fraction of a second to import jinja2 and the tokenizer)."""
        with self._lock:
            while self._count < self._max:
                self._count += 1
                self._idle.put(_Worker(self._init))

    def _take(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._closed:
                raise TemplateLimit("the server is shutting down")
            if self._count < self._max:
                self._count += 1
                try:
                    return _Worker(self._init)
                except BaseException:
                    self._count -= 1
                    raise
        return self._idle.get()

    def _drop(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            self._count -= 1

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        line = _line({"messages": messages, "add_generation_prompt": add_generation_prompt, "tools": tools})
        w = self._take()
        try:
            reply = w.call(line, self.timeout)
        except TimeoutError:
            self.killed += 1
            self._drop(w)
            raise TemplateLimit(f"the model's chat template did not finish rendering within {self.timeout:g} s "
                                "(giants serve --chat-template-timeout)") from None
        except (OSError, EOFError, ValueError) as e:
            self._drop(w)
            raise TemplateLimit(f"the chat template's worker failed ({type(e).__name__}: {e}); it may have run "
                                "out of memory") from None
        except BaseException:
            self._drop(w)
            raise
        if self._closed:
            self._drop(w)
        else:
            self._idle.put(w)
        if "text" in reply:
            return reply["text"]
        if reply.get("kind") == "limit":
            raise TemplateLimit(reply["error"])
        raise TemplateError(reply["error"])

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                self._drop(self._idle.get_nowait())
            except queue.Empty:
                return


def _line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=True).encode() + b"\n"


# ---- the worker ---------------------------------------------------------------------------------------


def _limit_memory(extra: int) -> None:
    """Address space: what the worker maps now plus `extra` bytes (a template's strings live in that)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + extra, vm + extra))
    except (ImportError, OSError, ValueError):  # not Linux: the time limit still holds
        pass


def _worker() -> int:
    # Ctrl-C in a terminal signals the whole process group: the server drains and then closes its workers,
    # so a worker must not die on it first (mid-render, with a KeyboardInterrupt traceback on the console).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from types import SimpleNamespace

    import jinja2

    from giants.tokenizer import Tokenizer

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    init = json.loads(stdin.readline())
    shim = SimpleNamespace(special=init["special"])
    template, max_chars = init["template"], init["max_chars"]
    _limit_memory(max(512 << 20, 8 * max_chars))
    stdout.write(_line({"ready": True}))
    stdout.flush()
    for line in stdin:
        req = json.loads(line)
        try:
            text = Tokenizer.apply_chat_template(shim, req["messages"], req["add_generation_prompt"],
                                                 tools=req.get("tools"), chat_template=template)
            if len(text) > max_chars:
                reply = {"error": f"the model's chat template produced {len(text)} characters, more than the limit "
                                  f"of {max_chars}", "kind": "limit"}
            else:
                reply = {"text": text}
        except MemoryError:
            reply = {"error": "the model's chat template ran out of memory", "kind": "limit"}
        except RecursionError:
            reply = {"error": "the model's chat template recursed too deeply", "kind": "limit"}
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                ZeroDivisionError, OverflowError) as e:
            reply = {"error": f"{type(e).__name__}: {e}" if not isinstance(e, jinja2.TemplateError) else str(e),
                     "kind": "template"}
        except Exception as e:  # noqa: BLE001 - whatever the template does, the worker answers
            reply = {"error": f"{type(e).__name__}: {e}", "kind": "template"}
        stdout.write(_line(reply))
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
