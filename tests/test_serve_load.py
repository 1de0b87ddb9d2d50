"""Load and disconnects against a real `giants serve tiny-llama` process (loopback only, bounded).

- 64 concurrent streaming clients (completions and chat mixed) in a closed loop: no request fails or is
  lost, and every greedy answer equals the same request run alone. The test runs GIANTS_SERVE_LOAD_S
  seconds (default 30, as the issue asks); benchmarks/bench_serve.py runs the same and records numbers.
- 20 clients drop mid-stream (and 4 non-streaming ones time out): their sequences are cancelled and the
  KV blocks come back at once.
"""

from __future__ import annotations

import asyncio
import os
import time

import openai
import pytest

from giants.serve.launch import ServerProcess
from giants.serve.loadgen import Spec, default_specs, run_alone, run_load, summarize

LOAD_S = float(os.environ.get("GIANTS_SERVE_LOAD_S", "30"))


@pytest.fixture(scope="module")
def server():
    with ServerProcess("tiny-llama", "--max-num-seqs", "64", "--log-level", "warning") as srv:
        yield srv
        assert srv.stop() == 0, srv.log()


def _requests_total(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("giants_requests_total{endpoint=\"/v1/"))


def _wait_idle(server: ServerProcess, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["giants_running_sequences"] == 0 and m["giants_kv_blocks_used"] == 0 and m["giants_queue_depth"] == 0:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_64_concurrent_streams_equal_alone(server):
    specs = default_specs(16)
    alone = asyncio.run(run_alone(server.base_url, "tiny-llama", specs))
    assert all(r.error is None and r.done for r in alone), [r.error for r in alone]
    before = _requests_total(server.metrics())

    async def load():
        return await run_load(server.base_url, "tiny-llama", specs, concurrency=64, duration=LOAD_S)

    results, wall = asyncio.run(load())
    m = server.metrics()
    steps = m["giants_iteration_sequences_count"]
    # the requests really share one continuous batch: engine steps that gave more than 32 sequences a token
    # (every step is counted: a gauge sampled twice a second once saw 18 at most on a 2-core CI machine, while
    # 212 of 2,630 steps of a 15 s run here held 33-64)
    assert steps - m['giants_iteration_sequences_bucket{le="32.0"}'] > 0, {k: v for k, v in m.items()
                                                                           if "iteration" in k}
    s = summarize(results, wall)
    assert s.failed == 0, s.errors
    assert s.requests >= 64
    for r in results:  # greedy under a 64-way continuous batch == the request alone
        ref = alone[r.spec_index]
        assert (r.text, r.finish_reason, r.completion_tokens) == (ref.text, ref.finish_reason,
                                                                   ref.completion_tokens), r.spec_index
    m = _wait_idle(server, 10)
    assert _requests_total(m) - before == len(results)  # none lost: the server saw exactly what we sent
    assert m["giants_running_sequences"] == 0 and m["giants_kv_blocks_used"] == 0
    assert m["giants_in_flight_requests"] == 0
    assert m['giants_requests_total{endpoint="/v1/completions",status="200"}'] > 0
    assert m['giants_requests_total{endpoint="/v1/chat/completions",status="200"}'] > 0
    print(f"\n{s.requests} requests in {wall:.1f} s, {s.tokens_per_s:.0f} tok/s, "
          f"latency p50 {s.latency_p50:.2f}s p99 {s.latency_p99:.2f}s, ttft p50 {s.ttft_p50:.3f}s")


def test_disconnects_free_kv_at_once(server):
    n, n_plain = 20, 4
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)
    m0 = server.metrics()

    async def open_stream(i: int):
        spec = Spec(prompt=f"client {i} will hang up " * (1 + i % 4), max_tokens=1500)
        stream = await client.completions.create(model="tiny-llama", prompt=spec.prompt, max_tokens=spec.max_tokens,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        got = 0
        async for chunk in stream:
            got += len(chunk.choices)
            if got >= 3:
                break
        return stream

    async def impatient(i: int) -> str:
        quick = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=1.0)
        try:
            await quick.completions.create(model="tiny-llama", prompt=f"non-streaming {i}", max_tokens=1500,
                                           temperature=0, extra_body={"ignore_eos": True})
        except openai.APITimeoutError:
            return "gave up"
        finally:
            await quick.close()
        return "finished"

    async def scenario():
        streams = await asyncio.gather(*(open_stream(i) for i in range(n)))
        mid = server.metrics()
        for s in streams:  # drop the connections mid-stream
            await s.close()
        await client.close()
        t0 = time.monotonic()
        after_streams = await asyncio.get_running_loop().run_in_executor(None, _wait_idle, server, 5)
        freed_after = time.monotonic() - t0
        # non-streaming clients that time out and hang up are noticed too
        assert await asyncio.gather(*(impatient(i) for i in range(n_plain))) == ["gave up"] * n_plain
        return mid, after_streams, freed_after

    mid, after_streams, freed_after = asyncio.run(scenario())
    assert mid["giants_running_sequences"] + mid["giants_queue_depth"] == n  # all 20 were generating
    assert mid["giants_kv_blocks_used"] > 0
    # "at once": well within the time these streams had left (1500 tokens each, seconds per step of 20)
    assert after_streams["giants_running_sequences"] == 0 and after_streams["giants_kv_blocks_used"] == 0, \
        after_streams
    assert freed_after < 5
    m = _wait_idle(server, 10)
    assert m["giants_running_sequences"] == 0 and m["giants_kv_blocks_used"] == 0, m
    assert m["giants_in_flight_requests"] == 0
    assert m["giants_aborted_requests_total"] - m0.get("giants_aborted_requests_total", 0) == n + n_plain
    # 1500 tokens x 20 streams would take minutes to finish on their own: these were cancelled
    assert m["giants_generation_tokens_total"] - mid["giants_generation_tokens_total"] < (n + n_plain) * 1500 // 4
    print(f"\nKV freed {freed_after:.2f} s after the disconnects")
