"""`giants serve`: build the loader, run uvicorn, drain on SIGTERM/SIGINT, exit 0.

The HTTP side is bounded: a connection must send its request line and headers within `header_timeout` seconds
(of connecting, or of its first byte after an idle keep-alive), at most `max_connections` are open (one more is
answered 503 and closed at once, so descriptors never run out), idle keep-alive connections are closed after
`keep_alive` seconds, headers are at most MAX_HEADER_BYTES, and a log line repeated within a minute is written
once with a count of the ones suppressed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from giants.serve import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SEQS_PER_REQUEST,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TEMPLATE_TIMEOUT,
    MAX_HEADER_BYTES,
)
from giants.serve.app import DEFAULT_MAX_BODY, Loaded, ServerState, create_app

log = logging.getLogger("giants.serve")


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_model_len: int | None = None
    max_queue: int | None = DEFAULT_MAX_QUEUE  # None: no limit
    max_num_seqs: int = 256
    num_blocks: int | None = None
    block_size: int = 16
    served_model_name: str | None = None
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    max_body: int = DEFAULT_MAX_BODY
    drain_timeout: float = 30.0
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT  # None: no limit
    log_level: str = "info"
    compile: bool = False  # CPU: steps where one sequence decodes run compiled (LLM(cpu_compile=True))
    tensor_parallel_size: int = 1  # worker processes (GPUs); a dead worker ends the server (exit 1)
    device_map: str | dict | None = None  # layer placement (giants.inference.placement), with max_memory
    max_memory: dict | None = None
    offload_folder: str | None = None
    quantization: str | None = None  # fp8 / fp8-block (+head) / mxfp4 (LLM(quantization=...))
    max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST  # prompts x n of one request
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT  # None: no limit
    max_connections: int | None = None  # None: DEFAULT_MAX_CONNECTIONS, or fewer where descriptors are fewer
    keep_alive: int = DEFAULT_KEEP_ALIVE
    chat_template_timeout: float = DEFAULT_TEMPLATE_TIMEOUT
    threads: int | None = None  # CPU: intra-op threads (None: giants.inference.cpu_threads decides)
    stats_interval: float = 10.0  # seconds between throughput log lines while busy; 0: none
    speculative_config: dict | None = None  # LLM(speculative_config=...): prompt lookup or a draft model


def load_model(opts: ServeOptions) -> Loaded:
    """The engine over `opts.model` (preset, HF directory, GGUF file or known name), built by `giants.LLM`."""
    from giants.cpu import bulk_threads
    from giants.inference import LLM

    with bulk_threads():  # loading, fusing and packing: no spinning barriers while other jobs hold the cores
        llm = LLM(opts.model, quantization=opts.quantization, dtype=opts.dtype, device=opts.device,
                  max_model_len=opts.max_model_len, seed=opts.seed,
                  block_size=opts.block_size, num_blocks=opts.num_blocks, max_num_seqs=opts.max_num_seqs,
                  cpu_compile=opts.compile, tensor_parallel_size=opts.tensor_parallel_size,
                  device_map=opts.device_map, max_memory=opts.max_memory, offload_folder=opts.offload_folder,
                  cpu_threads=opts.threads, speculative_config=opts.speculative_config)
    if llm.executor is not None:
        from giants.inference.executor import exit_on_failure

        llm.executor.on_failure(exit_on_failure)
    if llm.tokenizer is None:
        raise ValueError(f"{opts.model}: no tokenizer found; the OpenAI API needs one to read and write text")
    engine = llm.engine
    gov = getattr(llm, "thread_governor", None)
    where = f"{next(llm.model.parameters()).dtype}".replace("torch.", "") + f" on {engine.device}"
    if gov is not None:
        where += f", {gov.threads} CPU thread(s)" + ("" if gov.fixed else " (fewer while the cores are busy)")
    return Loaded(engine=engine, tokenizer=llm.tokenizer, max_model_len=engine.max_model_len,
                  max_running=engine.max_num_seqs, vocab_size=llm.model.config.vocab_size,
                  random_weights=getattr(llm, "random_weights", False), description=where)


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain in front of its shutdown: on the first SIGTERM/SIGINT the app refuses new work
    (503), in-flight requests run to completion for up to `drain_timeout` s and are then ended cleanly, and
    only then does uvicorn close the listener. The signal is not re-raised afterwards, so the exit code is 0.
    A second signal skips the wait."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.load_failed: BaseException | None = None
        self._drain_task: asyncio.Future | None = None
        self.stop_signal: str | None = None  # the first SIGTERM/SIGINT, for the closing log line

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stop_signal = self.stop_signal or signal.Signals(sig).name
        if self.draining or self.loop is None or not self.started:
            # not serving yet, or a second signal: stop now, ending whatever is still running
            if self.draining:
                log.info("second %s: ending the requests still running", signal.Signals(sig).name)
                self.force_exit = sig == signal.SIGINT
                self.loop.call_soon_threadsafe(self._abort_all)
            self.should_exit = True
            return
        self.draining = True
        log.info("received %s: draining (up to %.0f s)", signal.Signals(sig).name, self.drain_timeout)
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())  # keep a reference: tasks are weakly held

    def _abort_all(self) -> None:
        bridge = self.state.bridge
        if bridge is not None:
            bridge.abort_all()

    async def _drain(self) -> None:
        try:
            finished = await self.state.drain(self.drain_timeout)
            log.info("drained: %s", "all requests finished" if finished else "remaining requests were ended")
            await asyncio.sleep(0.05)  # let the last SSE frames reach their sockets
        finally:
            self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the app's shutdown on a forced exit (a second Ctrl-C), and the lifespan task it
            # leaves is cancelled when the loop closes and logged as a CancelledError traceback. The requests
            # were already ended, so the shutdown is quick: run it, bounded.
            try:
                async with asyncio.timeout(5):
                    await self.lifespan.shutdown()
            except TimeoutError:
                log.warning("application shutdown took over 5 s; exiting without it")

    def fail_load(self, e: BaseException) -> None:
        self.load_failed = e
        self.should_exit = True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> str | None:
    """The warning to print when the server listens beyond loopback with no API key, else None."""
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key: empty (an empty key would turn authentication off); leave it out to serve "
                         "without one")
    if api_key is None and not is_loopback(host):
        return (f"giants serve: warning: listening on {host} without an API key: anyone who can reach this port "
                "can use the model (set GIANTS_API_KEY or --api-key)")
    return None


def fd_limit(reserve: int = 128) -> int:
    """Raise the soft descriptor limit to the hard one; the descriptors left for connections after `reserve`."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
            except (ValueError, OSError):
                pass
        return max(16, (soft if soft != resource.RLIM_INFINITY else 1 << 20) - reserve)
    except ImportError:
        return DEFAULT_MAX_CONNECTIONS


def guarded_h11(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers and a cap on open connections."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = (b'{"error": {"message": "too many open connections; retry later", "type": "service_unavailable", '
            b'"param": null, "code": "too_many_connections"}}')
    refusal = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
               b"retry-after: 1\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    timeout_reply = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _partial = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(refusal)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                if self._partial:
                    self.transport.write(timeout_reply)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            idle = self.conn.their_state is h11.IDLE
            if idle and self._header_timer is None:
                self._arm()  # the first byte of the next request on a kept-alive connection
            self._partial = idle
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the request line and headers are in
                self._partial = False

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


class RepeatFilter(logging.Filter):
    """Lets the first of a kind of warning or error through and drops its repeats for `window` seconds; the
    first one after that says how many were dropped. A kind: the logger, level, message template and exception
    type (an accept() failing with EMFILE, a flood of malformed requests)."""

    def __init__(self, window: float = 60.0, max_kinds: int = 1024):
        super().__init__()
        self.window, self.max_kinds = window, max_kinds
        self.seen: dict[tuple, list] = {}  # kind -> [time let through, dropped since]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        kind = (record.name, record.levelno, str(record.msg), exc)
        now = time.monotonic()
        entry = self.seen.get(kind)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.msg = f"{record.msg} [{entry[1]} more like this in the last {self.window:g} s not logged]"
        if len(self.seen) >= self.max_kinds:
            self.seen.clear()
        self.seen[kind] = [now, 0]
        return True


def install_repeat_filter(window: float = 60.0) -> None:
    """On every handler of the root and uvicorn loggers (a filter per handler: a record that reaches two
    handlers is not a repeat at the second)."""
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio"):
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(f, RepeatFilter) for f in h.filters):
                h.addFilter(RepeatFilter(window))


def check_source(model: str) -> None:
    """Fail fast (exit 2, one line) on a model that cannot exist, before a port is opened."""
    from giants.checkpoint.hub import KNOWN_MODELS
    from giants.presets import PRESETS, get_preset

    if os.path.exists(model) or model in KNOWN_MODELS:
        return
    if model in PRESETS:  # random weights: the API needs a tokenizer, known before a byte is built
        from giants.inference.cli import _check_preset_tokenizer

        _check_preset_tokenizer(model)
        return
    from giants.inference.preflight import hub_id, real_weights_hint

    if hub_id(model) and not model.endswith(".gguf"):
        raise FileNotFoundError(f"{model}: not a local file or folder; it looks like a Hugging Face Hub id, and giants "
                                f"does not download from the Hub itself. {real_weights_hint(model)}")
    if model.endswith(".gguf") or os.sep in model:
        raise FileNotFoundError(f"{model}: no such file or directory")
    get_preset(model)  # ValueError naming close presets


def serve(opts: ServeOptions) -> int:
    check_source(opts.model)
    warning = check_exposure(opts.host, opts.api_key)
    if warning is not None:
        print(warning, file=sys.stderr)
    level = getattr(logging, opts.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # torch's own INFO lines (FakeTensor cache statistics at exit) are not the server's news
    logging.getLogger("torch").setLevel(max(level, logging.WARNING))
    name = opts.served_model_name or opts.model
    holder: dict[str, DrainingServer] = {}
    app = create_app(lambda: load_model(opts), name, aliases=(opts.model,), api_key=opts.api_key,
                     max_queue=opts.max_queue, max_body=opts.max_body, request_timeout=opts.request_timeout,
                     max_seqs_per_request=opts.max_seqs_per_request, body_timeout=opts.body_timeout,
                     chat_template_timeout=opts.chat_template_timeout,
                     on_load_failed=lambda e: holder["server"].fail_load(e),
                     stats_interval=opts.stats_interval or None)
    fds = fd_limit()
    max_connections = min(opts.max_connections or DEFAULT_MAX_CONNECTIONS, fds)
    # Idle keep-alive connections are held 65 s, longer than clients pool them (httpx, under the openai
    # client, expires them after 5 s, uvicorn's own default): at equal timeouts the server could close a
    # connection just as a client reuses it, and that request fails with a connection error.
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level, access_log=False,
                            timeout_graceful_shutdown=max(5, int(opts.drain_timeout)), lifespan="on",
                            timeout_keep_alive=opts.keep_alive, http=guarded_h11(opts.header_timeout, max_connections),
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    install_repeat_filter()
    server = holder["server"] = DrainingServer(config, app.state.giants, opts.drain_timeout)
    server.run()
    if server.load_failed is not None:
        print(f"giants serve: error: cannot load {opts.model}: {server.load_failed}", file=sys.stderr)
        return 1
    log.info("stopped%s", f" on {server.stop_signal}" if server.stop_signal else "")
    return 0
