"""SIGTERM drains, the queue limit answers 429, and the process exits 0 (real `giants serve` processes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx
import pytest

from giants.serve.launch import ServerProcess
from giants.serve.loadgen import default_specs, run_load


def test_sigterm_under_load_drains_and_exits_0():
    srv = ServerProcess("tiny-llama", "--drain-timeout", "60", "--log-level", "warning").start()
    try:
        specs = default_specs(8)
        sent = {}

        async def scenario():
            loop = asyncio.get_running_loop()

            def term():
                sent["t"] = time.perf_counter()
                srv.proc.send_signal(signal.SIGTERM)

            loop.call_later(2.5, term)
            return await run_load(srv.base_url, "tiny-llama", specs, concurrency=32, duration=6.0, timeout=90,
                                  stop_on_error=True)

        results, _ = asyncio.run(asyncio.wait_for(scenario(), 120))  # bounded: nothing may hang
        print(f"\nclients done {time.perf_counter() - sent['t']:.1f} s after SIGTERM")
        code = srv.wait(timeout=60)
        print(f"server exited {time.perf_counter() - sent['t']:.1f} s after SIGTERM")
        assert code == 0, srv.log()
        t = sent["t"]
        ok = [r for r in results if r.error is None]
        # every accepted request ran to its end: full stream, usage chunk, a real finish reason
        assert ok and all(r.done and r.finish_reason in ("stop", "length") for r in ok)
        assert any(r.started < t < r.ended for r in ok), "no request was in flight across the SIGTERM"
        refused = [r for r in results if r.error is not None]
        # after the signal: 503 while draining, then nothing listens (connection refused) once it exited
        assert all(r.ended > t for r in refused)
        assert all((r.status == 503 and "shutting down" in r.error) or "Connection" in r.error for r in refused), \
            {r.error for r in refused}
        assert any(r.status == 503 for r in refused), "no request saw the draining 503"
    finally:
        srv.stop()


def _stream_events(raw: str) -> list[str]:
    return [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]


def _listening(port: int) -> list[str]:
    """Local addresses of the LISTEN sockets on `port`, from the kernel's tables (Linux)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, p = local.partition(":")
            if state == "0A" and int(p, 16) == port:
                if len(addr) == 8:
                    out.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                    out.append(socket.inet_ntop(socket.AF_INET6, raw))
    return out


def test_default_host_is_loopback():
    from giants.cli import build_parser
    from giants.serve.server import ServeOptions

    assert build_parser().parse_args(["serve", "tiny-llama"]).host == "127.0.0.1"
    assert ServeOptions("tiny-llama").host == "127.0.0.1"


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the kernel's socket table (Linux)")
def test_queue_full_429_then_drain_timeout_ends_streams_cleanly():
    # host=None: no --host on the command line, so this server binds wherever `giants serve` binds by default
    srv = ServerProcess("tiny-llama", "--max-num-seqs", "4", "--max-queue", "2", "--drain-timeout", "2",
                        "--log-level", "warning", host=None).start()
    try:
        assert "--host" not in srv.command()
        assert _listening(srv.port) == ["127.0.0.1"]  # loopback only, not 0.0.0.0 or ::
        async def scenario():
            http = httpx.AsyncClient(base_url=srv.base_url, timeout=60)

            async def long_stream(i: int) -> str:
                body = {"model": "tiny-llama", "prompt": f"long request {i}", "max_tokens": 1900, "stream": True,
                        "ignore_eos": True, "temperature": 0}
                async with http.stream("POST", "/completions", json=body) as r:
                    assert r.status_code == 200
                    return (await r.aread()).decode()

            streams = [asyncio.ensure_future(long_stream(i)) for i in range(6)]
            while srv.metrics()["giants_in_flight_requests"] < 6:
                await asyncio.sleep(0.05)
            full = await http.post("/completions", json={"model": "tiny-llama", "prompt": "one more"})
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            assert full.headers["retry-after"] == "1"

            srv.terminate()
            while srv.health()[0] != 503:
                await asyncio.sleep(0.02)
            late = await http.post("/chat/completions",
                                   json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]})
            assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
            t0 = time.monotonic()
            raws = await asyncio.wait_for(asyncio.gather(*streams), 30)
            await http.aclose()
            return raws, time.monotonic() - t0

        raws, waited = asyncio.run(scenario())
        assert waited < 15  # drain timeout 2 s, not the minutes 1900 tokens x 6 would take
        for raw in raws:  # each stream closed properly: finish_reason "abort", then [DONE]
            events = _stream_events(raw)
            assert events[-1] == "[DONE]"
            finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]
                        if c["finish_reason"]]
            assert finishes == ["abort"]
        assert srv.wait(timeout=30) == 0, srv.log()
    finally:
        srv.stop()


@pytest.mark.parametrize("argv,msg", [(["tiny-lama"], "did you mean tiny-llama"),
                                      (["/no/such/model.gguf"], "no such file")])
def test_bad_model_fails_fast(argv, msg, capsys):
    from giants.cli import main

    assert main(["serve", *argv, "--port", "1"]) == 2  # refused before any port is opened
    err = capsys.readouterr().err
    assert err.startswith("giants serve: error:") and msg in err
