"""Tensor-parallel execution: the caller's process is rank 0, N-1 spawned worker processes the other ranks.

Why rank 0 in the caller (vLLM's "driver worker") rather than N workers plus a driver: the scheduler, the KV
block tables and sampling live in one process anyway, and rank 0's forward runs right there with no extra hop:
a step's inputs go out once over pipes to the N-1 workers and the logits never leave rank 0's memory (the
vocab-parallel head is all-gathered there). N workers plus a driver would add a process and a copy of every
step's logits, for isolation the engine does not need.

Per step rank 0 encodes the scheduled chunks (token ids, positions, block tables: the engine's ids, the same
on every rank) into one int64 message, writes it to each worker's pipe, then runs its own share; the ranks
meet in the collectives of the forward (giants.inference.tp_runner). Collectives use a private c10d group
(gloo over 127.0.0.1 on the CPU, NCCL on GPUs) rendezvoused through a TCPStore that rank 0 hosts on a free
port; control goes over pipes, so an idle server's workers wait on a pipe, not on a collective that would
time out.

Failure: a watcher thread waits on every worker's process sentinel. When one exits unasked (killed, OOM,
an exception) it records "tensor-parallel worker rank R (pid P) died: ...", kills the other workers and
runs the failure callbacks (the server exits); rank 0's waits check that record every half second, so a
step in flight raises that error within about a second and every later call raises it at once. Workers are
daemon processes, end on their pipe's end-of-file and watch their parent's pid: none outlives rank 0.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from giants.inference import wire
from giants.inference.runner import Chunk, ModelRunner
from giants.inference.tp_model import ShardSpec, slice_params
from giants.inference.tp_runner import Comm, encode_chunks, make_group, make_runner
from giants.inference.tp_worker import load_shard, rss_stats
from giants.model.transformer import Transformer
from giants.parallel.layout import check_tp


def share_gpu() -> bool:
    """GIANTS_TP_SHARE_GPU=1: every rank on the one GPU given, gloo collectives (NCCL refuses two ranks on a
    device) and the fused kernels run eagerly (gloo cannot be captured in CUDA graphs). For checking the
    local-shape kernels on a one-GPU machine; it is no way to run fast."""
    return os.environ.get("GIANTS_TP_SHARE_GPU", "") == "1"


def cuda_fast() -> bool:
    """GIANTS_TP_CUDA_FAST=1: CudaModelRunner on each rank's local shapes (fused Triton decode, NCCL inside the
    CUDA graphs). Opt-in until it has run on a machine of several GPUs; by default a CUDA rank runs the generic
    runner (eager PyTorch, NCCL all-reduces), which the CPU tests cover but for the backend."""
    return os.environ.get("GIANTS_TP_CUDA_FAST", "") == "1"


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker died or failed; the message names its rank."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Proc:
    """A worker process (subprocess.Popen) with what the watcher needs: a pidfd sentinel, exitcode, join."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen, self.pid = popen, popen.pid
        self.sentinel = os.pidfd_open(popen.pid)

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()


def _spawn(rank: int, args: tuple) -> tuple[_Proc, Any]:
    """`python -m giants.inference.tp_worker FD`: a fresh interpreter (what the spawn start method gives,
    without re-running the caller's __main__, so scripts without a main guard, notebooks and the server's
    loader thread all work), its arguments sent as a giants.inference.wire message over a socket pair that then
    carries the messages."""
    from multiprocessing.connection import Connection

    import giants

    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(giants.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    popen = subprocess.Popen([sys.executable, "-m", "giants.inference.tp_worker", str(theirs.fileno())],
                             pass_fds=(theirs.fileno(),), env=env, close_fds=True)
    theirs.close()
    conn = Connection(ours.detach())
    conn.send_bytes(wire.dumps(args))
    return _Proc(popen), conn


class _Workers:
    """The worker processes, their pipes and the failure record (no reference to the executor, so the
    executor can be garbage collected and its finalizer stop them)."""

    def __init__(self) -> None:
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}
        self.lock = threading.Lock()
        self.failure: str | None = None
        self.closing = False
        self.callbacks: list[Callable[[str], None]] = []
        self.errors: dict[int, str] = {}
        self.abort: Callable[[], None] | None = None
        self._stop_r, self._stop_w = os.pipe()

    def check(self, wait_s: float = 0.0) -> None:
        """Raise the named error if a worker died; wait_s: keep looking that long (a collective that failed
        with a reset connection: the peer's exit shows a moment after its sockets close)."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.failure is None and not self.closing:
                for r, p in self.procs.items():
                    if p.exitcode is not None:
                        with self.lock:
                            self.read_error(r, 0.2)
                        self.fail(r, f"died ({_describe_exit(p.exitcode)})")
                        break
            if self.failure is not None:
                raise TPWorkerError(self.failure)
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def fail(self, rank: int, what: str) -> None:
        with self.lock:
            if self.failure is not None or self.closing:
                return
            err = self.errors.get(rank)
            last = f"; its error:\n{err.rstrip()}" if err else ""
            pid = self.procs[rank].pid if rank in self.procs else "?"
            self.failure = f"tensor-parallel worker rank {rank} (pid {pid}) {what}{last}"
        self.kill_all()
        if self.abort is not None:
            try:
                self.abort()
            except Exception:  # noqa: BLE001 - best effort: the group is unusable anyway
                pass
        for cb in list(self.callbacks):
            try:
                cb(self.failure)
            except Exception:  # noqa: BLE001
                pass

    def read_error(self, rank: int, timeout: float = 0.0) -> None:
        """Pick up an ("error", traceback) the worker sent before exiting (if any)."""
        conn = self.conns.get(rank)
        try:
            while conn is not None and conn.poll(timeout):
                msg = wire.loads(conn.recv_bytes())
                if isinstance(msg, (tuple, list)) and msg and msg[0] == "error":
                    self.errors[rank] = msg[1]
                    return
        except (EOFError, OSError, wire.WireError):
            return

    def watch(self) -> None:
        from multiprocessing.connection import wait

        sentinels = {p.sentinel: r for r, p in self.procs.items()}
        while True:
            ready = wait([*sentinels, self._stop_r])
            if self._stop_r in ready or self.closing:
                return
            rank = min(sentinels[s] for s in ready if s in sentinels)
            p = self.procs[rank]
            p.join(1.0)
            with self.lock:
                self.read_error(rank, 0.2)
            self.fail(rank, f"died ({_describe_exit(p.exitcode)})")
            return

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(5.0)

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        for conn in self.conns.values():
            try:
                conn.send_bytes(b"Q")
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        self.kill_all()
        for conn in self.conns.values():
            conn.close()
        for fd in (self._stop_r, self._stop_w, *(p.sentinel for p in self.procs.values())):
            try:
                os.close(fd)
            except OSError:
                pass


class TPExecutor:
    """Starts the workers, loads rank 0's shard here, and drives every step (see the module docstring)."""

    def __init__(self, spec: ShardSpec, device: torch.device, timeout_s: float = 600.0,
                 startup_timeout_s: float = 1800.0) -> None:
        import torch.distributed as dist

        self.spec, self.world, self.device, self.timeout_s = spec, spec.tp, device, timeout_s
        self.workers = w = _Workers()
        self._finalizer = weakref.finalize(self, w.close)
        store = dist.TCPStore("127.0.0.1", 0, self.world, True, timedelta(seconds=startup_timeout_s),
                              wait_for_workers=False)
        threads = max(1, (os.cpu_count() or 1) // self.world)
        for r in range(1, self.world):
            mine = spec if spec.states is None else dataclasses.replace(
                spec, states=[s if i == r else {} for i, s in enumerate(spec.states)])
            # always an indexed cuda device: a worker's torch.cuda.set_device refuses a bare "cuda"
            dev = ("cpu" if device.type == "cpu" else
                   f"cuda:{device.index or 0}" if share_gpu() else f"cuda:{(device.index or 0) + r}")
            w.procs[r], w.conns[r] = _spawn(r, (r, self.world, store.port, mine, os.getpid(), dev, threads,
                                                timeout_s, share_gpu()))
        threading.Thread(target=w.watch, name="giants-tp-watch", daemon=True).start()
        self.stats: dict[int, dict[str, int]] = {}
        try:
            own = dataclasses.replace(spec, states=[spec.states[0]]) if spec.states is not None else spec
            self.stats[0] = load_shard(own, 0, device)
            self.model = self.stats[0].pop("model")
            self.spec = dataclasses.replace(spec, states=None)  # the slices are in the workers now
            for r in range(1, self.world):
                self.stats[r] = self._expect(r, "loaded", startup_timeout_s)
            self.pg = make_group(0, self.world, store.port, device, timeout_s, store=store, gloo=share_gpu())
        except BaseException:
            w.close()
            raise
        self.store = store
        if device.type == "cuda" and not share_gpu():
            w.abort = getattr(self.pg, "abort", None)
        self.comm = Comm(self.pg, 0, self.world, device, health=w.check, timeout_s=timeout_s)

    # ---- pipes ---------------------------------------------------------------------------------------
    def _expect(self, rank: int, what: str, timeout: float) -> dict[str, int]:
        """The next message from `rank`, which must be (what, payload); a death or error raises, naming it."""
        w = self.workers
        deadline = time.monotonic() + timeout
        while True:
            w.check()
            with w.lock:
                conn = w.conns[rank]
                msg = wire.loads(conn.recv_bytes()) if conn.poll(0.1) else None
            if msg is not None:
                if msg[0] == what:
                    return msg[1]
                if msg[0] == "error":
                    w.errors[rank] = msg[1]
                    w.procs[rank].join(2.0)
                    w.fail(rank, "failed")
                    w.check()
                raise TPWorkerError(f"tensor-parallel worker rank {rank}: expected {what!r}, got {msg[0]!r}")
            if time.monotonic() > deadline:
                raise TPWorkerError(f"tensor-parallel worker rank {rank} sent no {what!r} within {timeout:.0f} s")

    def send(self, buf: bytes) -> None:
        """One message to every worker; a closed pipe means a dead worker: raise its named error."""
        w = self.workers
        w.check()
        for r, conn in w.conns.items():
            try:
                conn.send_bytes(buf)
            except OSError:
                p = w.procs[r]
                p.join(2.0)
                w.fail(r, f"died ({_describe_exit(p.exitcode)})")
                w.check()
                raise

    # ---- public ------------------------------------------------------------------------------------
    def on_failure(self, callback: Callable[[str], None]) -> None:
        """callback(message) runs on the watcher thread when a worker dies (the server exits with it)."""
        self.workers.callbacks.append(callback)

    def worker_stats(self) -> dict[int, dict[str, int]]:
        """Per rank: bytes of checkpoint read, peak and current RSS (KiB), pid; asked of the workers now."""
        out = {0: {**self.stats[0], **rss_stats()}}
        self.send(b"R")
        for r in range(1, self.world):
            out[r] = self._expect(r, "stats", 60.0)
        return out

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.workers.procs.values()]

    def close(self) -> None:
        self._finalizer()

    def make_runner(self, engine: Any) -> DriverRunner:
        """The engine's runner (Engine(make_runner=...)): sends the KV layout to the workers, which build
        their pools and runners, and returns rank 0's driver."""
        kv = engine.kv
        layout = {"block_size": kv.block_size, "num_blocks": [g.pool.num_blocks for g in kv.groups],
                  "max_model_len": engine.max_model_len, "dtype": kv.dtype, "max_num_seqs": engine.max_num_seqs,
                  "cuda_graphs": engine.use_cuda_graphs and cuda_fast(), "share_gpu": share_gpu()}
        self.send(b"I" + wire.dumps(layout))
        local = make_runner(engine.model, kv, self.comm, 0, cuda_graphs=layout["cuda_graphs"],
                            max_num_seqs=layout["max_num_seqs"], max_model_len=layout["max_model_len"],
                            share_gpu=layout["share_gpu"])
        for r in range(1, self.world):
            self.stats[r].update(self._expect(r, "ready", 600.0))
        return DriverRunner(self, local)


class DriverRunner:
    """Rank 0's runner: broadcasts each step's chunks, then runs its own share (the ranks meet in the
    collectives); returns the full-vocabulary logits of the sampled rows."""

    supports_ahead = True
    use_graphs = False

    def __init__(self, executor: TPExecutor, local: ModelRunner) -> None:
        self.executor, self.local = executor, local
        self.block_size = local.kv.block_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)

    def can_run_ahead(self, chunks: list[Chunk]) -> bool:
        return True

    def execute(self, chunks: list[Chunk], ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is not None:
            chunks = [Chunk(c.blocks, c.start, [t], c.sample) for c, t in zip(chunks, ids.tolist())]
        self.executor.send(b"S" + encode_chunks(chunks, self.block_size))
        logits = self.local.execute(chunks)
        self.executor.comm.sync()
        return logits

    def pack_for_onednn(self) -> None:
        self.executor.send(b"P")
        self.local.pack_for_onednn()

    def compile_decode(self) -> None:
        self.local.compile_decode()


def exit_on_failure(message: str) -> None:
    """A failure callback for servers: the error on stderr, then the process exits 1 (its other workers are
    already killed), so a supervisor sees the server die rather than serve errors from a broken model."""
    print(f"giants: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


# ---- LLM(..., tensor_parallel_size=N) ------------------------------------------------------------------
def start(model: str | Transformer, tp: int, *, dtype: torch.dtype | None, device: torch.device, seed: int,
          quantization: str | None = None, weights: str | None = None, cpu_compile: bool = False,
          ) -> tuple[TPExecutor, Any]:
    """(executor, tokenizer or None) for `model` split over `tp` ranks; the executor's `model` is rank 0's
    shard, its `make_runner` the engine's runner factory."""
    import os.path

    from giants.presets import PRESETS

    if cpu_compile:
        raise ValueError("cpu_compile: the compiled CPU decode is for one process; not with tensor_parallel_size > 1")
    if quantization not in (None, "mxfp4"):
        raise ValueError(f"quantization: only 'mxfp4' (MoE experts) is supported (got {quantization!r})")
    if weights not in (None, "int8"):
        raise ValueError(f"weights: only 'int8' (weight-only, CPU) is supported (got {weights!r})")
    if device.type == "cuda":
        first = device.index or 0
        if torch.cuda.device_count() < first + tp and not share_gpu():
            raise ValueError(f"tensor_parallel_size={tp} needs GPUs {first}..{first + tp - 1}; "
                             f"{torch.cuda.device_count()} visible")
    elif device.type != "cpu":
        raise ValueError(f"tensor_parallel_size > 1 runs on cuda or cpu devices (got {device})")
    tok = None
    if isinstance(model, Transformer):
        cfg = model.config
        check_tp(cfg, tp, replicate_kv=True)
        full = {n: p.detach() for n, p in model.named_parameters()}
        states = [{n: t.clone() for n, t in slice_params(full, cfg, r, tp).items()} for r in range(tp)]
        for s in states:
            for t in s.values():
                t.share_memory_()
        spec = ShardSpec("state", None, cfg, tp, dtype, seed, quantization, weights, states=states)
    elif isinstance(model, str) and (os.path.exists(model) or _known(model)):
        from giants.checkpoint.loading import load_config, read_dir_config, resolve

        path = resolve(model)
        if path.is_file() and path.suffix == ".gguf":
            spec = ShardSpec("gguf", str(path), load_config(path), tp, dtype, seed, quantization, weights)
        else:
            path = path if path.is_dir() else path.parent
            cfg, naming = read_dir_config(path)
            spec = ShardSpec("dir", str(path), cfg, tp, dtype, seed, quantization, weights, naming=naming)
        check_tp(spec.cfg, tp, replicate_kv=True)
        try:
            import giants

            tok = giants.load_tokenizer(model)
        except (ImportError, ValueError, FileNotFoundError, AttributeError):
            tok = None
    elif isinstance(model, str) and model in PRESETS:
        cfg = PRESETS[model].config
        check_tp(cfg, tp, replicate_kv=True)
        spec = ShardSpec("preset", model, cfg, tp, dtype, seed, quantization, weights)
    else:
        from giants.inference.llm import resolve_model

        resolve_model(model, dtype, device, seed)  # raises the usual error for an unknown name or type
        raise ValueError(f"model: {model!r} cannot be split over tensor-parallel ranks")
    ex = TPExecutor(spec, device)
    if tok is None and spec.kind == "preset":
        from giants.inference.llm import _default_tokenizer

        tok = _default_tokenizer(ex.model)
    return ex, tok


def _known(name: str) -> bool:
    from giants.inference.llm import _known_names

    return name in _known_names()
