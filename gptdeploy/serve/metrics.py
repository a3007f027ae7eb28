"""Prometheus metrics of one server (prometheus_client, a registry of its own): requests by
endpoint and outcome, tokens, time to first token and per-token latency histograms, queue
depth and batch size. Token timings are the engine's own (perf_counter at each sampled token),
observed when a request ends in the engine (Ticket.add_done_callback), so a request cancelled by
a client that left still counts the tokens it was given.

A Ray Serve replica labels every series `replica` with its Ray replica id: a scrape through Ray's
proxy reaches one replica, and its series must never pass for another's.
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
    def __init__(self, occupancy: Callable[[], tuple[int, int]], replica: str | None = None):
        self.registry = r = CollectorRegistry()
        self._const = {"replica": replica} if replica is not None else {}
        extra = list(self._const)
        self.requests = Counter(
            "gptdeploy_requests",
            "Requests answered, by endpoint and outcome",
            ["endpoint", "outcome", *extra],
            registry=r,
        )
        self.prompt_tokens = self._one(Counter(
            "gptdeploy_prompt_tokens", "Prompt tokens of requests that ran (prefilled)", extra, registry=r
        ))
        self.generated_tokens = self._one(Counter(
            "gptdeploy_generated_tokens", "Tokens generated, cancelled requests' included", extra, registry=r
        ))
        self.ttft = self._one(Histogram(
            "gptdeploy_time_to_first_token_seconds",
            "From queueing a request to its first sampled token",
            extra,
            buckets=TTFT_BUCKETS,
            registry=r,
        ))
        self.per_token = self._one(Histogram(
            "gptdeploy_time_per_output_token_seconds",
            "Between consecutive tokens of one request",
            extra,
            buckets=TOKEN_BUCKETS,
            registry=r,
        ))
        self.step_batch = self._one(Histogram(
            "gptdeploy_decode_batch_size",
            "Requests advanced by each decode step",
            extra,
            buckets=BATCH_BUCKETS,
            registry=r,
        ))
        self.step_seconds = self._one(Histogram(
            "gptdeploy_decode_step_seconds",
            "Wall time of each decode step",
            extra,
            buckets=TOKEN_BUCKETS,
            registry=r,
        ))
        queue = self._one(Gauge("gptdeploy_queue_depth", "Requests waiting for a batch row", extra, registry=r))
        batch = self._one(Gauge("gptdeploy_batch_size", "Requests in the running batch", extra, registry=r))
        queue.set_function(lambda: occupancy()[0])
        batch.set_function(lambda: occupancy()[1])

    def _one(self, metric):
        """The metric's one series: its `replica` child when labelled."""
        return metric.labels(**self._const) if self._const else metric

    def step(self, batch: int, seconds: float) -> None:
        """The engine's on_step hook (its own thread; prometheus_client is thread-safe)."""
        self.step_batch.observe(batch)
        self.step_seconds.observe(seconds)

    def answered(self, endpoint: str, outcome: str) -> None:
        """One HTTP request answered: outcome "ok", "cancelled" or the error status."""
        self.requests.labels(endpoint=endpoint, outcome=outcome, **self._const).inc()

    def ticket_ended(self, ticket: Ticket) -> None:
        """A Ticket's done callback: the tokens and timings of one engine request, however it ended."""
        times = ticket.token_times
        if times:  # its prompt ran
            self.prompt_tokens.inc(ticket.prompt_tokens)
            self.ttft.observe(times[0] - ticket.t_submit)
        self.generated_tokens.inc(len(times))
        for a, b in itertools.pairwise(times):
            self.per_token.observe(b - a)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
