"""Prometheus metrics of one server. Each app gets its own registry, so several apps can live in one process
(tests) without colliding on the global one."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# `*_created` timestamps per series are noise for a server that lives as one process
disable_created_metrics()

# seconds; CPU tiny models answer in milliseconds, big models on slow machines in seconds
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                    5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("giants_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("giants_prompt_tokens", "prompt tokens admitted to the engine", registry=r)
        self.generation_tokens = Counter("giants_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("giants_queue_depth", "requests waiting for a slot in the running batch",
                                 registry=r)
        self.running = Gauge("giants_running_sequences", "sequences in the running batch", registry=r)
        self.in_flight = Gauge("giants_in_flight_requests", "requests accepted and not yet finished", registry=r)
        self.kv_used = Gauge("giants_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("giants_kv_blocks_free", "KV cache blocks free", registry=r)
        self.kv_total = Gauge("giants_kv_blocks_total", "KV cache blocks in all", registry=r)
        self.preemptions = Gauge("giants_preemptions", "sequences preempted so far (recomputed later)", registry=r)
        self.ttft = Histogram("giants_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("giants_inter_token_latency_seconds", "time between consecutive tokens of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("giants_request_latency_seconds", "arrival to last token", buckets=_E2E_BUCKETS,
                             registry=r)
        # per engine step, as vLLM's iteration_tokens_total: a gauge sampled now and then misses short peaks
        self.step_sequences = Histogram("giants_iteration_sequences", "sequences given a token by one engine step",
                                        buckets=_BATCH_BUCKETS, registry=r)
        self.aborted = Counter("giants_aborted_requests",
                               "requests cancelled (client gone, drain timeout, request timeout)", registry=r)
        self.timeouts = Counter("giants_request_timeouts", "requests ended by the request timeout (408)",
                                registry=r)
        # speculative decoding (zero without --speculative-config); acceptance rate = accepted / draft tokens
        self.spec_drafts = Gauge("giants_spec_decode_num_drafts", "verify steps of a sequence with drafts",
                                 registry=r)
        self.spec_draft_tokens = Gauge("giants_spec_decode_num_draft_tokens", "tokens drafted", registry=r)
        self.spec_accepted = Gauge("giants_spec_decode_num_accepted_tokens", "drafted tokens accepted", registry=r)
        self.state = Gauge("giants_server_state", "1 for the current state", ["state"], registry=r)
        self.info = Gauge("giants_model_info", "the served model", ["model"], registry=r)
        self.info.labels(model=model_name).set(1)
        self.set_state("loading")

    def set_state(self, state: str) -> None:
        for s in ("loading", "ready", "draining", "failed"):
            self.state.labels(state=s).set(1 if s == state else 0)

    def update_engine(self, stats: dict[str, Any], pending: int) -> None:
        self.queue_depth.set(stats.get("num_waiting", 0) + pending)
        self.running.set(stats.get("num_running", 0))
        self.kv_used.set(stats.get("kv_blocks_used", 0))
        self.kv_free.set(stats.get("kv_blocks_free", 0))
        self.kv_total.set(stats.get("kv_blocks_total", 0))
        self.preemptions.set(stats.get("num_preemptions", 0))
        self.spec_drafts.set(stats.get("spec_num_drafts", 0))
        self.spec_draft_tokens.set(stats.get("spec_num_draft_tokens", 0))
        self.spec_accepted.set(stats.get("spec_num_accepted_tokens", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
