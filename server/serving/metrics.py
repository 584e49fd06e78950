"""Prometheus metrics of ``fedtune serve``, kept by the official ``prometheus_client``.

Each server has its own registry (two servers in one process, as in the tests, never share
counts). Route labels are route templates or ``other``, never raw paths, so a scan of random URLs
cannot blow up the number of series.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Requests by route and status, their latency, tokens, queue depth, batch sizes, models."""

    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fedtune_requests", "HTTP requests by route and status code.",
                                ["route", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("fedtune_request_duration_seconds",
                                 "HTTP request latency (streams: until the last event).",
                                 ["route", "status"], buckets=LATENCY_BUCKETS_S,
                                 registry=r)  # fmt: skip
        self.prompt_tokens = Counter("fedtune_prompt_tokens", "Prompt tokens processed.",
                                     ["model"], registry=r)  # fmt: skip
        self.generated_tokens = Counter("fedtune_generated_tokens", "Completion tokens generated.",
                                        ["model"], registry=r)  # fmt: skip
        self.batch_size = Histogram("fedtune_batch_size", "Requests per generate call.",
                                    buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        depth = Gauge("fedtune_queue_depth", "Requests waiting for a batch.", registry=r)
        depth.set_function(queue_depth)
        running = Gauge("fedtune_requests_generating", "Requests in the running batch.",
                        registry=r)  # fmt: skip
        running.set_function(in_flight)
        self.model_info = Info("fedtune_model", "Served model ids and their sources.", ["model"],
                               registry=r)  # fmt: skip

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route, str(status)).observe(seconds)

    def add_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.generated_tokens.labels(model).inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
