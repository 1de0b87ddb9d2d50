"""One tensor-parallel worker process (ranks 1..N-1; rank 0 is the caller's process, see executor.py).

Life: load this rank's shard (only its slices of the checkpoint) -> report -> join the process group ->
build its KV pool (its KV heads, the engine's block ids) and runner on the KV layout rank 0 sends -> run
every step rank 0 sends until told to stop.

Messages from rank 0 come over a pipe, one `send_bytes` each, the first byte the operation:
  b"I" + wire(kv layout)   build the KV cache and runner        -> ("ready", stats)
  b"S" + encoded chunks      run one step (collectives with every rank)
  b"P"                       pack weights for oneDNN (CPU fp32)
  b"R"                       report stats (peak RSS, bytes read)  -> ("stats", stats)
  b"Q"                       exit
Replies go back as giants.inference.wire messages; a failure sends ("error", traceback) and exits 1.

The process is `python -m giants.inference.tp_worker FD` (executor._spawn): its arguments arrive (giants.inference.wire)
as the first message on socket FD. A worker never outlives rank 0: the socket's end-of-file (rank 0 exited)
ends the loop, and a thread polls the parent pid, which also covers a rank 0 killed while this worker sits
in a collective.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
import traceback
from typing import Any

import torch

from giants.inference import wire


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.25)
        if os.getppid() != parent_pid:
            os._exit(1)


def rss_stats() -> dict[str, int]:
    """Resident memory of this process in KiB: now (VmRSS), its peak (VmHWM) and getrusage's ru_maxrss.
    VmHWM is the one to read: ru_maxrss survives exec, so a worker forked from a big parent starts with the
    parent's peak; VmHWM belongs to this address space and can be reset (`reset_peak_rss`)."""
    out = {"maxrss_kb": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), "pid": os.getpid()}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out["rss_kb" if line.startswith("VmRSS") else "peak_rss_kb"] = int(line.split()[1])
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_shard(spec: Any, rank: int, device: torch.device) -> dict[str, Any]:
    """build_shard with the memory it took (KiB): RSS before, the peak while loading (VmHWM, reset first),
    bytes read; and "model"."""
    from giants.inference.tp_model import build_shard

    reset_peak_rss()
    start = rss_stats()
    model, nbytes = build_shard(spec, rank, device)
    after = rss_stats()
    return {"model": model, "bytes_read": nbytes, "start_rss_kb": start.get("rss_kb", 0),
            "load_peak_rss_kb": after.get("peak_rss_kb", 0), **after}


def main(fd: int) -> None:
    """Entry point (`python -m giants.inference.tp_worker FD`): the arguments arrive on socket FD as a wire message."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        rank, world, port, spec, parent_pid, device, threads, timeout_s, gloo = wire.loads(conn.recv_bytes())
    except (EOFError, OSError):
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="giants-tp-parent", daemon=True).start()
    try:
        _run(rank, world, port, spec, conn, torch.device(device), threads, timeout_s, gloo)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        os._exit(0)  # rank 0 is gone: nothing left to report to
    except BaseException:  # noqa: BLE001 - reported to rank 0 with this rank's traceback
        tb = traceback.format_exc()
        print(f"giants tensor-parallel worker rank {rank}: {tb}", file=sys.stderr, flush=True)
        try:
            conn.send_bytes(wire.dumps(("error", tb)))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)


def _run(rank: int, world: int, port: int, spec: Any, conn: Any, device: torch.device, threads: int,
         timeout_s: float, gloo: bool) -> None:
    from giants.inference.kv_cache import KVCacheManager
    from giants.inference.tp_model import vocab_start
    from giants.inference.tp_runner import Comm, decode_chunks, make_group, make_runner

    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    stats = load_shard(spec, rank, device)
    model = stats.pop("model")
    conn.send_bytes(wire.dumps(("loaded", stats)))
    pg = make_group(rank, world, port, device, timeout_s, gloo=gloo)
    comm = Comm(pg, rank, world, device)
    runner = None
    while True:
        buf = conn.recv_bytes()
        op = buf[:1]
        if op == b"S":
            runner.execute(decode_chunks(buf[1:]))
        elif op == b"I":
            layout = wire.loads(buf[1:])
            kv = KVCacheManager(model.config, block_size=layout["block_size"], num_blocks=layout["num_blocks"],
                                max_model_len=layout["max_model_len"], dtype=layout["dtype"], device=device,
                                enable_prefix_caching=False)
            runner = make_runner(model, kv, comm, vocab_start(spec.cfg, rank, world),
                                 cuda_graphs=layout["cuda_graphs"], max_num_seqs=layout["max_num_seqs"],
                                 max_model_len=layout["max_model_len"], share_gpu=layout["share_gpu"])
            conn.send_bytes(wire.dumps(("ready", {**stats, **rss_stats()})))
        elif op == b"P":
            runner.pack_for_onednn()
        elif op == b"R":
            conn.send_bytes(wire.dumps(("stats", {**stats, **rss_stats()})))
        elif op == b"Q":
            return
        else:
            raise RuntimeError(f"unknown message {op!r} from rank 0")


if __name__ == "__main__":
    main(int(sys.argv[1]))
