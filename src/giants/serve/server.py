"""`giants serve`: build the loader, run uvicorn, drain on SIGTERM/SIGINT, exit 0."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from types import FrameType

import uvicorn

from giants.serve import DEFAULT_MAX_QUEUE, DEFAULT_REQUEST_TIMEOUT
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


def load_model(opts: ServeOptions) -> Loaded:
    """The engine over `opts.model` (preset, HF directory, GGUF file or known name), built by `giants.LLM`."""
    from giants.inference import LLM

    llm = LLM(opts.model, quantization=opts.quantization, dtype=opts.dtype, device=opts.device,
              max_model_len=opts.max_model_len, seed=opts.seed,
              block_size=opts.block_size, num_blocks=opts.num_blocks, max_num_seqs=opts.max_num_seqs,
              cpu_compile=opts.compile, tensor_parallel_size=opts.tensor_parallel_size,
              device_map=opts.device_map, max_memory=opts.max_memory, offload_folder=opts.offload_folder)
    if llm.executor is not None:
        from giants.inference.executor import exit_on_failure

        llm.executor.on_failure(exit_on_failure)
    if llm.tokenizer is None:
        raise ValueError(f"{opts.model}: no tokenizer found; the OpenAI API needs one to read and write text")
    engine = llm.engine
    return Loaded(engine=engine, tokenizer=llm.tokenizer, max_model_len=engine.max_model_len,
                  max_running=engine.max_num_seqs, vocab_size=llm.model.config.vocab_size)


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

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.loop is None or not self.started:
            # not serving yet, or a second signal: stop now, ending whatever is still running
            if self.draining:
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

    def fail_load(self, e: BaseException) -> None:
        self.load_failed = e
        self.should_exit = True


def check_source(model: str) -> None:
    """Fail fast (exit 2, one line) on a model that cannot exist, before a port is opened."""
    from giants.checkpoint.hub import KNOWN_MODELS
    from giants.presets import PRESETS, get_preset

    if os.path.exists(model) or model in KNOWN_MODELS or model in PRESETS:
        return
    if model.endswith(".gguf") or os.sep in model:
        raise FileNotFoundError(f"{model}: no such file or directory")
    get_preset(model)  # ValueError naming close presets


def serve(opts: ServeOptions) -> int:
    check_source(opts.model)
    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    name = opts.served_model_name or opts.model
    holder: dict[str, DrainingServer] = {}
    app = create_app(lambda: load_model(opts), name, aliases=(opts.model,), api_key=opts.api_key,
                     max_queue=opts.max_queue, max_body=opts.max_body, request_timeout=opts.request_timeout,
                     on_load_failed=lambda e: holder["server"].fail_load(e))
    # Idle keep-alive connections are held 65 s, longer than clients pool them (httpx, under the openai
    # client, expires them after 5 s, uvicorn's own default): at equal timeouts the server could close a
    # connection just as a client reuses it, and that request fails with a connection error.
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level, access_log=False,
                            timeout_graceful_shutdown=max(5, int(opts.drain_timeout)), lifespan="on",
                            timeout_keep_alive=65)
    server = holder["server"] = DrainingServer(config, app.state.giants, opts.drain_timeout)
    server.run()
    if server.load_failed is not None:
        print(f"giants serve: error: cannot load {opts.model}: {server.load_failed}", file=sys.stderr)
        return 1
    return 0
