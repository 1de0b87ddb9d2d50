"""The FastAPI app: routes, the gate in front of them (auth, state, body size, status metrics), and the
server's lifecycle (loading -> ready -> draining).

The model loads in a thread after the socket is open, so a client (or a load balancer) sees a clean 503
"loading" instead of a refused connection, and `/health` turns 200 the moment the engine is ready.

A request body must arrive within `body_timeout` seconds of its headers (408 `body_timeout`, and the connection
is closed); the headers' own deadline, the connection cap and keep-alive are the HTTP protocol's (server.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from giants.serve import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SEQS_PER_REQUEST,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TEMPLATE_TIMEOUT,
    api,
)
from giants.serve.bridge import AsyncEngine
from giants.serve.errors import (
    APIError,
    api_error_handler,
    error_bytes,
    error_response,
    http_error_handler,
    unhandled_handler,
    validation_handler,
)
from giants.serve.metrics import Metrics
from giants.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, now

log = logging.getLogger("giants.serve")
access_log = logging.getLogger("giants.serve.access")  # one line a request: client, method, path, status, seconds
DEFAULT_STATS_INTERVAL = 10.0

DEFAULT_MAX_BODY = 4 * 1024 * 1024
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class Loaded:
    engine: Any
    tokenizer: Any
    max_model_len: int
    max_running: int
    vocab_size: int
    random_weights: bool = False  # a preset's random weights: the completions are noise (logged at ready)
    description: str = ""  # how the model runs, for the ready log line (dtype, device, threads)


class BodyTooLarge(StarletteHTTPException):
    """Raised from inside `receive` for chunked bodies; an HTTPException so FastAPI's body reader re-raises it
    as is (anything else there becomes a generic 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodyTimeout(StarletteHTTPException):
    """The body did not arrive in time; the connection is closed (the client is still mid-body)."""

    def __init__(self, limit: float):
        super().__init__(408, f"the request body did not arrive within {limit:g} s (giants serve --body-timeout)",
                         headers={"Connection": "close"})


class ServerState:
    def __init__(self, name: str, aliases: tuple[str, ...], max_queue: int | None, metrics: Metrics,
                 request_timeout: float | None = None, max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST,
                 template_timeout: float = DEFAULT_TEMPLATE_TIMEOUT):
        self.name, self.aliases, self.max_queue, self.metrics = name, aliases, max_queue, metrics
        self.request_timeout = request_timeout
        self.max_seqs_per_request, self.template_timeout = max_seqs_per_request, template_timeout
        self.renderer: Any = None
        self.status = "loading"
        self.error: str | None = None
        self.served: api.Served | None = None
        self.random_weights = False
        self.bridge: AsyncEngine | None = None
        self.created = now()

    def set_status(self, status: str) -> None:
        self.status = status
        self.metrics.set_state(status)

    def ready(self, loaded: Loaded, loop: asyncio.AbstractEventLoop, seconds: float | None = None) -> None:
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        self.random_weights = loaded.random_weights
        log.info("model %s loaded%s%s: ready for requests (max_model_len %d, up to %d sequences at once)",
                 self.name, took, f" ({loaded.description})" if loaded.description else "", loaded.max_model_len,
                 loaded.max_running)
        if loaded.random_weights:
            log.warning("%s is a preset with RANDOM weights: every completion is noise (for sizes and speed only); "
                        "serve a known name (smollm2-135m), a .gguf file or a Hugging Face folder for real text",
                        self.name)
        self.bridge = AsyncEngine(loaded.engine, self.metrics, max_running=loaded.max_running,
                                  max_queue=self.max_queue, request_timeout=self.request_timeout)
        self.bridge.start(loop)
        self.renderer = _renderer(loaded.tokenizer, self.template_timeout)
        self.served = api.Served(self.name, self.aliases, self.bridge, loaded.tokenizer, loaded.max_model_len,
                                 loaded.vocab_size, self.max_seqs_per_request, self.renderer)
        if self.status == "loading":
            self.set_status("ready")
        else:  # a drain began while loading: never admit anything
            self.bridge.draining = True

    def unavailable(self) -> APIError | None:
        if self.status == "ready":
            return None
        msg = {"loading": "the model is still loading; retry shortly",
               "draining": "server is shutting down; not accepting new requests",
               "failed": f"the model failed to load: {self.error}"}[self.status]
        return APIError(503, msg, None, self.status)

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests, let in-flight ones finish for up to `timeout` s, then end the rest cleanly.
        True if everything finished on its own."""
        self.set_status("draining")
        if self.bridge is None:
            return True
        self.bridge.draining = True
        if await self.bridge.wait_idle(timeout):
            return True
        log.warning("drain timeout (%.0f s): ending %d requests", timeout, self.bridge.in_flight)
        self.bridge.abort_all()
        await self.bridge.wait_idle(10.0)
        return False

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.shutdown()
        if self.renderer is not None:
            self.renderer.close()


async def _log_throughput(state: ServerState, interval: float) -> None:
    """Every `interval` seconds in which the engine did something: prompt and generated tokens a second,
    requests running and waiting. Quiet while idle."""
    last: tuple[int, int] | None = None
    while True:
        await asyncio.sleep(interval)
        bridge = state.bridge
        engine = getattr(bridge, "engine", None)
        if engine is None:
            continue
        now_counts = (int(getattr(engine, "prompt_tokens_total", 0)),
                      int(getattr(engine, "generation_tokens_total", 0)))
        if last is not None and now_counts != last:
            gov = getattr(engine, "thread_governor", None)
            threads = f", {gov.threads} CPU thread(s)" if gov is not None else ""
            log.info("throughput: %.1f prompt tok/s, %.1f generated tok/s over %g s; %d running, %d waiting%s",
                     (now_counts[0] - last[0]) / interval, (now_counts[1] - last[1]) / interval, interval,
                     len(getattr(engine, "running", ())), len(getattr(engine, "waiting", ())), threads)
        last = now_counts


def _renderer(tokenizer: Any, timeout: float) -> Any:
    """The chat template in worker processes, for giants' own tokenizers with a template (others, in tests,
    render in the request's thread)."""
    from giants.serve.template import TemplateRenderer
    from giants.tokenizer import Tokenizer

    if not isinstance(tokenizer, Tokenizer) or tokenizer.chat_template is None:
        return None
    try:
        renderer = TemplateRenderer(tokenizer, timeout=timeout)
    except ValueError:  # no default template among named ones: every chat request gets the 400 that says so
        return None
    threading.Thread(target=renderer.start, name="giants-template-start", daemon=True).start()
    return renderer


class Gate:
    """Pure ASGI middleware (streams pass straight through): per-endpoint status counts, and for /v1/*:
    API key (constant-time), availability (503), and the body-size limit (413), in that order."""

    def __init__(self, app: Any, state: ServerState, api_key: str | None, max_body: int,
                 body_timeout: float | None = DEFAULT_BODY_TIMEOUT):
        self.app, self.state, self.max_body, self.body_timeout = app, state, max_body, body_timeout
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = [500]
        started = time.monotonic()

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if path.startswith("/v1/"):
                err = self._check(scope)
                if err is not None:
                    await _send_error(send_status, err)
                    return
                receive = self._limited(receive)
            await self.app(scope, receive, send_status)
        finally:
            endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
            self.state.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            if path not in ("/health", "/metrics"):  # probes would drown the log
                client = scope.get("client") or ("-", 0)
                access_log.info("%s %s %s %d %.3f s", client[0], scope.get("method", "-"), path, status[0],
                                time.monotonic() - started)

    def _check(self, scope: Any) -> APIError | None:
        headers = dict(scope.get("headers") or [])
        if self.key is not None:
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if not auth:
                return APIError(401, "You didn't provide an API key. Provide it in the Authorization header as "
                                "'Bearer YOUR_KEY'.", None, "invalid_api_key")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                return APIError(401, "Incorrect API key provided.", None, "invalid_api_key")
        unavailable = self.state.unavailable()
        if unavailable is not None:
            return unavailable
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return APIError(400, "invalid Content-Length header", None, "invalid_value")
            if n > self.max_body:
                return _too_large(self.max_body)
        return None

    def _limited(self, receive: Any) -> Any:
        """receive with the body's size limit and deadline (until the body is complete; after that, receive
        only reports a disconnect, which may come whenever)."""
        seen = 0
        limit, timeout = self.max_body, self.body_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        done = False

        async def wrapped() -> Any:
            nonlocal seen, done
            if done or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    raise BodyTimeout(timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # chunked upload without Content-Length
                    raise BodyTooLarge(limit)
                done = done or not message.get("more_body", False)
            else:
                done = True
            return message

        return wrapped


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the limit of {limit} bytes", None, "request_too_large")


async def _send_error(send: Any, err: APIError) -> None:
    body = error_bytes(err.status, err.message, err.param, err.code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_app(loader: Callable[[], Loaded], name: str, *, aliases: tuple[str, ...] = (), api_key: str | None = None,
               max_queue: int | None = DEFAULT_MAX_QUEUE, max_body: int = DEFAULT_MAX_BODY,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST,
               body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
               chat_template_timeout: float = DEFAULT_TEMPLATE_TIMEOUT,
               on_load_failed: Callable[[BaseException], None] | None = None,
               stats_interval: float | None = DEFAULT_STATS_INTERVAL) -> FastAPI:
    """max_queue: sequences (prompts x n) allowed to wait beyond the running batch, None for no limit;
    request_timeout: seconds from arrival before a request is ended with 408 and aborted, None for no limit;
    max_seqs_per_request: prompts x n of one request; body_timeout: seconds for a body to arrive after its
    headers, None for no limit; chat_template_timeout: seconds a chat template may take to render.
    api_key: None for no authentication; an empty key is refused (it would turn authentication off unseen)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key: empty; pass None for no authentication")
    if max_queue is not None and max_queue < 0:
        raise ValueError(f"max_queue: must be >= 0 or None (got {max_queue})")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout: must be > 0 or None (got {request_timeout})")
    if body_timeout is not None and not body_timeout > 0:
        raise ValueError(f"body_timeout: must be > 0 or None (got {body_timeout})")
    if not chat_template_timeout > 0:
        raise ValueError(f"chat_template_timeout: must be > 0 (got {chat_template_timeout})")
    if max_seqs_per_request < 1:
        raise ValueError(f"max_seqs_per_request: must be >= 1 (got {max_seqs_per_request})")
    metrics = Metrics(name)
    state = ServerState(name, tuple(a for a in aliases if a != name), max_queue, metrics, request_timeout,
                        max_seqs_per_request, chat_template_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def load() -> None:
            t0 = time.monotonic()
            log.info("loading %s ...", name)
            try:
                loaded = loader()
            except BaseException as e:  # noqa: BLE001 - reported to the client as 503 "failed" and to the CLI
                log.error("loading %s failed: %s", name, e)
                loop.call_soon_threadsafe(_failed, e)
                return
            loop.call_soon_threadsafe(state.ready, loaded, loop, time.monotonic() - t0)

        def _failed(e: BaseException) -> None:
            state.error = f"{type(e).__name__}: {e}"
            state.set_status("failed")
            if on_load_failed is not None:
                on_load_failed(e)

        threading.Thread(target=load, name="giants-load", daemon=True).start()
        stats = asyncio.ensure_future(_log_throughput(state, stats_interval)) if stats_interval else None
        try:
            yield
        finally:
            if stats is not None:
                stats.cancel()
            state.close()

    app = FastAPI(title="giants", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.giants = state
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unhandled_handler)
    app.add_middleware(Gate, state=state, api_key=api_key, max_body=max_body, body_timeout=body_timeout)

    def served() -> api.Served:
        err = state.unavailable()
        if err is not None:
            raise err
        return state.served

    @app.get("/health")
    async def health() -> Response:
        err = state.unavailable()
        if err is not None:
            return error_response(503, err.message, None, err.code)
        return JSONResponse({"status": "ok", "model": name, "in_flight": state.bridge.in_flight})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    def card() -> ModelCard:
        return ModelCard(id=name, created=state.created, max_model_len=state.served.max_model_len,
                         random_weights=state.random_weights)

    @app.get("/v1/models")
    async def list_models() -> Response:
        served()
        return JSONResponse(ModelList(data=[card()]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        api.check_model(served(), model_id)
        return JSONResponse(card().model_dump())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await api.create_completion(served(), body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await api.create_chat_completion(served(), body, request)

    return app
