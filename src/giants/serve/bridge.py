"""The async bridge: one engine thread steps the continuous batch; the asyncio HTTP loop awaits results.

The engine is not thread-safe, so only its own thread ever touches it. HTTP handlers post commands
(add, abort) to a locked list and wake the thread with a condition variable; the thread applies them
between steps, which is exactly where continuous batching lets requests join and leave. Results go back
with one `loop.call_soon_threadsafe` per step that fans them out to per-request asyncio queues, so a
64-stream batch costs one loop wake-up per step, not 64.

Limits: at most `max_running + max_queue` sequences (prompts x n) are in flight; more are refused at once with
429 (and a Retry-After header). The prompts of one HTTP request join the engine as one admission group, so the
engine's fair admission shares the batch between HTTP requests, not between their prompts. A request still
unfinished `request_timeout` seconds after it arrived is aborted by the engine thread (its KV blocks are freed
in that turn, whether or not its HTTP handler is reading) and its handler gets a 408.

Failure isolation: a request the engine refuses (too long, bad parameters) fails alone, and so does one whose
sampling fails inside a step (the engine finishes it with an error; the batch goes on). If a whole
engine step raises, the requests of that batch are failed with a 500 and aborted, and the loop carries on
serving new ones; it never dies with requests left hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from giants.serve.errors import APIError
from giants.serve.metrics import Metrics

log = logging.getLogger("giants.serve")


class Aborted(Exception):
    """The server cancelled this request (drain timeout, shutdown); the stream ends cleanly."""


@dataclass
class _Tracked:
    queue: asyncio.Queue
    arrival: float
    prompt_len: int
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)


class RequestGroup:
    """The engine requests of one HTTP request (one per prompt), sharing one queue.

    Iterating yields `(prompt_index, RequestOutput)` until every request has finished; an engine-side
    error raises (APIError or Aborted). `cancel()` aborts whatever has not finished."""

    def __init__(self, bridge: AsyncEngine, request_ids: list[str], queue: asyncio.Queue, num_seqs: int = 0):
        self.bridge = bridge
        self.request_ids = request_ids
        self.num_seqs = num_seqs or len(request_ids)
        self._index = {rid: i for i, rid in enumerate(request_ids)}
        self._queue = queue
        self._open = set(request_ids)
        self._released = False

    @property
    def finished(self) -> bool:
        return not self._open

    def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[tuple[int, Any]]:
        while self._open:
            rid, item = await self._queue.get()
            if rid not in self._open:
                continue
            if isinstance(item, BaseException):
                self._open.discard(rid)
                self.cancel()
                raise item
            if item.finished:
                self._open.discard(rid)
                if not self._open:
                    self.release()
            yield self._index[rid], item

    def cancel(self) -> None:
        """Client gone or a sibling failed: abort in the engine (frees KV blocks on the engine thread's next turn)."""
        for rid in self._open:
            self.bridge.abort(rid)
        self._open.clear()
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.bridge._release(len(self.request_ids), self.num_seqs)


RETRY_AFTER_S = 1  # the 429's Retry-After: a running batch frees slots within about a second of steps


class AsyncEngine:
    def __init__(self, engine: Any, metrics: Metrics, *, max_running: int, max_queue: int | None = None,
                 request_timeout: float | None = None):
        self.engine = engine
        self.metrics = metrics
        self.capacity = None if max_queue is None else max_running + max_queue
        self.request_timeout = request_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._cv = threading.Condition()
        self._cmds: list[tuple[str, Any]] = []
        self._stop = False
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._in_flight = 0  # engine requests (one per prompt); event-loop thread only
        self._seqs_in_flight = 0  # their sequences (prompts x n): what the queue limit counts
        self._idle: asyncio.Event | None = None
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.draining = False

    # --- event-loop side -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="giants-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, prompts: list[list[int]], params: Any) -> RequestGroup:
        """Queue one engine request per prompt; APIError 503 while draining, 429 when the queue is full."""
        if self.draining:
            raise APIError(503, "server is shutting down; not accepting new requests", None, "draining")
        seqs = len(prompts) * max(params.n, params.best_of or 0)  # best_of > n runs best_of sequences
        if self.capacity is not None and seqs > self.capacity:  # would never fit: no use retrying
            raise APIError(400, f"this request asks for {seqs} sequences (prompts x n); the server holds at most "
                           f"{self.capacity} (--max-num-seqs + --max-queue)", "n", "invalid_value")
        if self.capacity is not None and self._seqs_in_flight + seqs > self.capacity:
            raise APIError(429, f"server queue is full ({self.capacity} sequences in flight); retry later", None,
                           "queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"req-{next(self._ids)}" for _ in prompts]
        group = ids[0]
        self._in_flight += len(prompts)
        self._seqs_in_flight += seqs
        self.metrics.in_flight.set(self._in_flight)
        self._idle.clear()
        arrival = time.monotonic()
        with self._cv:
            for rid, prompt in zip(ids, prompts):
                self._cmds.append(("add", (rid, list(prompt), params, queue, arrival, group)))
            self._cv.notify()
        return RequestGroup(self, ids, queue, seqs)

    def abort(self, request_id: str, notify: bool = False) -> None:
        self._post(("abort", (request_id, notify)))

    def abort_all(self) -> None:
        """Drain timeout: end every request cleanly (its group raises `Aborted`)."""
        self._post(("abort_all", None))

    async def wait_idle(self, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _release(self, k: int, seqs: int) -> None:
        self._in_flight -= k
        self._seqs_in_flight -= seqs
        self.metrics.in_flight.set(self._in_flight)
        if self._in_flight == 0:
            self._idle.set()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _post(self, cmd: tuple[str, Any]) -> None:
        with self._cv:
            self._cmds.append(cmd)
            self._cv.notify()

    # --- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        while True:
            with self._cv:
                while not self._cmds and not busy and not self._stop:
                    self._cv.wait()
                if self._stop:
                    break
                cmds, self._cmds = self._cmds, []
            out: list[tuple[asyncio.Queue, Any]] = []
            try:
                busy = self._turn(cmds, out)
            except Exception as e:  # never let the thread die with requests waiting on it
                log.exception("engine loop failed")
                self._fail_all(APIError(500, f"engine error: {type(e).__name__}: {e}", None, "engine_error"), out)
                busy = False
            if out:
                self.loop.call_soon_threadsafe(_fan_out, out)

    def _turn(self, cmds: list[tuple[str, Any]], out: list) -> bool:
        """Apply commands, run one engine step; True while the engine has work left."""
        engine = self.engine
        for kind, arg in cmds:
            self._apply(kind, arg, out)
        if self.request_timeout is not None:
            self._expire(time.monotonic(), out)
        if engine.has_unfinished_requests():
            try:
                results = engine.step()
            except Exception as e:  # the whole batch failed: fail its requests, keep serving
                log.exception("engine step failed")
                self._fail_all(APIError(500, f"engine error: {type(e).__name__}: {e}", None, "engine_error"), out)
                results = []
            now = time.monotonic()
            for r in results:
                self._deliver(r, now, out)
            n = sum(1 for r in results for c in r.outputs if c.new_token_ids)
            if n:
                self.metrics.step_sequences.observe(n)
        self._update_metrics()
        return engine.has_unfinished_requests()

    def _apply(self, kind: str, arg: Any, out: list) -> None:
        if kind == "add":
            request_id, prompt, params, queue, arrival, group = arg
            try:
                self.engine.add_request(request_id, prompt, params, group=group)
            except ValueError as e:
                out.append((queue, (request_id, APIError(400, str(e), _param_of(str(e)), "invalid_request"))))
                return
            except Exception as e:
                log.exception("add_request failed")
                out.append((queue, (request_id, APIError(500, f"engine error: {type(e).__name__}: {e}", None,
                                                               "engine_error"))))
                return
            self._tracked[request_id] = _Tracked(queue, arrival, len(prompt))
            self.metrics.prompt_tokens.inc(len(prompt))
        elif kind == "abort":
            request_id, notify = arg
            t = self._tracked.pop(request_id, None)
            if t is not None:
                self._safe_abort(request_id)
                self.metrics.aborted.inc()
                if notify:
                    out.append((t.queue, (request_id, Aborted("request aborted by the server"))))
        elif kind == "abort_all":
            for request_id in list(self._tracked):
                self._apply("abort", (request_id, True), out)

    def _expire(self, now: float, out: list) -> None:
        """Abort every request older than request_timeout (frees its KV blocks now); its handler gets a 408."""
        limit = self.request_timeout
        for request_id, t in list(self._tracked.items()):
            if now - t.arrival < limit:
                continue
            del self._tracked[request_id]
            self._safe_abort(request_id)
            self.metrics.aborted.inc()
            self.metrics.timeouts.inc()
            out.append((t.queue, (request_id, APIError(
                408, f"request timed out: not finished within the server's request timeout of {limit:g} s "
                     "(giants serve --request-timeout)", None, "request_timeout",
                # the official client retries 408s by default: the same request would only time out again
                headers={"x-should-retry": "false"}))))

    def _safe_abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:  # already finished inside the engine; nothing left to free
            log.debug("abort of %s ignored", request_id, exc_info=True)

    def _fail_all(self, err: APIError, out: list) -> None:
        for request_id, t in list(self._tracked.items()):
            self._safe_abort(request_id)
            out.append((t.queue, (request_id, err)))
        self._tracked.clear()

    def _deliver(self, r: Any, now: float, out: list) -> None:
        t = self._tracked.get(r.request_id)
        if t is None:  # aborted while this step ran
            return
        m = self.metrics
        for c in r.outputs:
            k = len(c.new_token_ids or ())
            if not k:
                continue
            m.generation_tokens.inc(k)
            if t.first_token is None:
                t.first_token = now
                m.ttft.observe(now - t.arrival)
            last = t.last_token.get(c.index)
            if last is not None:
                for _ in range(k):
                    m.itl.observe((now - last) / k)
            t.last_token[c.index] = now
        if r.finished:
            del self._tracked[r.request_id]
            m.e2e.observe(now - t.arrival)
        if getattr(r, "error", None):  # this request alone failed inside the engine
            out.append((t.queue, (r.request_id, APIError(500, f"engine error: {r.error}", None, "engine_error"))))
            return
        out.append((t.queue, (r.request_id, r)))

    def _update_metrics(self) -> None:
        try:
            stats = self.engine.stats()
        except Exception:
            log.debug("engine.stats failed", exc_info=True)
            return
        with self._cv:
            pending = sum(1 for k, _ in self._cmds if k == "add")
        self.metrics.update_engine(stats, pending)


def _fan_out(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _param_of(message: str) -> str | None:
    """The engine's ValueErrors name the field first ("temperature must be ..."); pass it on as `param`."""
    head = message.split(" ", 1)[0].strip(":'\"`")
    return head if head.isidentifier() else None
