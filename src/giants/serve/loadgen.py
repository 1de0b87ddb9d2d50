"""A closed-loop load generator over the OpenAI API (the official `openai` client, streaming).

`concurrency` clients each send a streaming request, read it to the end, and send the next, until
`duration` seconds have passed; requests cycle through `specs`. Every request is recorded: text, finish
reason, token count (from the usage chunk), time to first token, latency, or the error it hit. Used by
the tests (short runs) and benchmarks/bench_serve.py (the full 30 s).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Spec:
    prompt: str
    max_tokens: int
    chat: bool = False


@dataclass
class Result:
    spec_index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    error: str | None = None
    status: int | None = None
    done: bool = False  # the stream ended with its usage chunk
    started: float = 0.0  # time.perf_counter() at send and at the end
    ended: float = 0.0


@dataclass
class Summary:
    requests: int
    failed: int
    wall_s: float
    output_tokens: int
    latency_p50: float
    latency_p99: float
    ttft_p50: float
    ttft_p99: float
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.failed) / self.wall_s


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def summarize(results: list[Result], wall_s: float) -> Summary:
    ok = [r for r in results if r.error is None and r.done]
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None or not r.done:
            key = r.error or "incomplete"
            errors[key[:80]] = errors.get(key[:80], 0) + 1
    return Summary(requests=len(results), failed=len(results) - len(ok), wall_s=wall_s,
                   output_tokens=sum(r.completion_tokens for r in ok),
                   latency_p50=percentile([r.latency for r in ok], 50),
                   latency_p99=percentile([r.latency for r in ok], 99),
                   ttft_p50=percentile([r.ttft for r in ok if r.ttft is not None], 50),
                   ttft_p99=percentile([r.ttft for r in ok if r.ttft is not None], 99), errors=errors)


async def one_request(client: Any, model: str, spec: Spec, index: int, **extra: Any) -> Result:
    import openai

    res = Result(index)
    t0 = res.started = time.perf_counter()
    kw = dict(model=model, max_tokens=spec.max_tokens, temperature=0, stream=True,
              stream_options={"include_usage": True}, **extra)
    try:
        if spec.chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": spec.prompt}], **kw)
        else:
            stream = await client.completions.create(prompt=spec.prompt, **kw)
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    res.completion_tokens = chunk.usage.completion_tokens
                    res.prompt_tokens = chunk.usage.prompt_tokens
                    res.done = True
                for ch in chunk.choices:
                    piece = ch.delta.content if spec.chat else ch.text
                    if piece:
                        if res.ttft is None:
                            res.ttft = time.perf_counter() - t0
                        res.text += piece
                    if ch.finish_reason is not None:
                        res.finish_reason = ch.finish_reason
    except openai.APIStatusError as e:
        res.status = e.status_code
        res.error = f"{e.status_code}: {e.message}"
    except Exception as e:  # connection refused / reset: recorded, never raised
        res.error = f"{type(e).__name__}: {e}"
    res.ended = time.perf_counter()
    res.latency = res.ended - t0
    return res


async def run_load(base_url: str, model: str, specs: list[Spec], *, concurrency: int, duration: float,
                   api_key: str = "none", timeout: float = 300.0, stop_on_error: bool = False,
                   **extra: Any) -> tuple[list[Result], float]:
    """Closed loop: returns every request's Result and the wall time (until the last one finished).
    `stop_on_error`: a client that gets an error stops (as a client told 503 would back off)."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    http = httpx.AsyncClient(limits=limits, timeout=timeout)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=http)
    counter = itertools.count()
    results: list[Result] = []
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker() -> None:
        while time.perf_counter() < deadline:
            i = next(counter) % len(specs)
            r = await one_request(client, model, specs[i], i, **extra)
            results.append(r)
            if stop_on_error and r.error is not None:
                return

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await http.aclose()
    return results, time.perf_counter() - t0


async def run_alone(base_url: str, model: str, specs: list[Spec], api_key: str = "none", **extra: Any) -> list[Result]:
    """Each spec once, one at a time: the reference a loaded server must reproduce (greedy)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    out = [await one_request(client, model, s, i, **extra) for i, s in enumerate(specs)]
    await client.close()
    return out


def default_specs(n: int = 16, chat_every: int = 4) -> list[Spec]:
    """Mixed prompt lengths and output lengths; every `chat_every`-th one goes through the chat endpoint."""
    words = ("river", "stone", "light", "engine", "market", "winter", "garden", "signal", "copper", "forest")
    specs = []
    for i in range(n):
        prompt = " ".join(words[(i + j) % len(words)] for j in range(3 + (i * 7) % 40))
        specs.append(Spec(prompt=f"Request {i}: {prompt}", max_tokens=8 + (i * 5) % 25, chat=(i % chat_every == 3)))
    return specs


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")
