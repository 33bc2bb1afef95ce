"""Prometheus metrics of the HTTP service: requests, latency, routing, batching, expert changes.

One registry per app (so several apps in one process, as in tests, never share counts). Label
values are bounded: endpoints are route templates (``/experts/{name}``), never raw paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Metrics:
    """The service's metrics; :meth:`render` gives the Prometheus text format."""

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "routerretriever_requests",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "routerretriever_request_seconds",
            "HTTP request latency by endpoint and method",
            ["endpoint", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.routed = Counter(
            "routerretriever_queries_routed",
            "queries by the pool member that got the most weight",
            ["expert"],
            registry=r,
        )
        self.batch = Histogram(
            "routerretriever_batch_queries",
            "queries per micro-batch run by the model",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "routerretriever_batch_seconds",
            "seconds the model spent on each micro-batch (the sum's rate: the share of time "
            "the model is busy; near 1 the server is model-bound)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.queue = Gauge(
            "routerretriever_queue_depth", "requests waiting for the model", registry=r
        )
        self.queue.set_function(queue_depth)
        self.changes = Counter(
            "routerretriever_expert_changes",
            "expert adds and removes by outcome",
            ["action", "outcome"],
            registry=r,
        )
        self.change_seconds = Histogram(
            "routerretriever_expert_change_seconds",
            "time to add or remove an expert",
            ["action"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)

    def observe_batch(self, queries: int, seconds: float) -> None:
        self.batch.observe(queries)
        self.batch_seconds.observe(seconds)

    @contextmanager
    def expert_change(self, action: str) -> Iterator[None]:
        """Count and time one add or remove (``outcome``: ok, or the refusal's status)."""
        start = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except Exception as e:
            outcome = str(getattr(e, "status", "error"))
            raise
        finally:
            self.changes.labels(action, outcome).inc()
            self.change_seconds.labels(action).observe(time.perf_counter() - start)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def endpoint_of(scope: Any) -> str:
    """The route template a request matched (bounded label values), else ``"other"``."""
    route = scope.get("route")
    return getattr(route, "path", None) or "other"
