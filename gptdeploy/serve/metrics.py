"""Prometheus metrics of one server (prometheus_client, a registry of its own): requests by
endpoint and outcome, tokens, time to first token and per-token latency histograms, queue
depth and batch size. Token timings are the engine's own (perf_counter at each sampled token),
observed once a request ends.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from gptdeploy.engine import Ticket

# Tiny models decode in ~1 ms a token, GPT-2-124M on two cores in ~20 ms, long prompts prefill in
# seconds: buckets from 0.5 ms to 30 s.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self, occupancy: Callable[[], tuple[int, int]]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "gptdeploy_requests",
            "Requests answered, by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gptdeploy_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generated_tokens = Counter("gptdeploy_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "gptdeploy_time_to_first_token_seconds",
            "From queueing a request to its first sampled token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "gptdeploy_time_per_output_token_seconds",
            "Between consecutive tokens of one request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.step_batch = Histogram(
            "gptdeploy_decode_batch_size",
            "Requests advanced by each decode step",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "gptdeploy_decode_step_seconds",
            "Wall time of each decode step",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        queue = Gauge("gptdeploy_queue_depth", "Requests waiting for a batch row", registry=r)
        batch = Gauge("gptdeploy_batch_size", "Requests in the running batch", registry=r)
        queue.set_function(lambda: occupancy()[0])
        batch.set_function(lambda: occupancy()[1])

    def step(self, batch: int, seconds: float) -> None:
        """The engine's on_step hook (its own thread; prometheus_client is thread-safe)."""
        self.step_batch.observe(batch)
        self.step_seconds.observe(seconds)

    def ended(self, endpoint: str, outcome: str, tickets: list[Ticket] = ()) -> None:
        self.requests.labels(endpoint, outcome).inc()
        for t in tickets:
            times = t.token_times
            if t.result is not None:
                self.prompt_tokens.inc(len(t.result.prompt_token_ids))
            self.generated_tokens.inc(len(times))
            if times:
                self.ttft.observe(times[0] - t.t_submit)
            for a, b in itertools.pairwise(times):
                self.per_token.observe(b - a)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
