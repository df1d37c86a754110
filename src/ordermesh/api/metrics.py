"""Prometheus metrics of one app, in its own ``CollectorRegistry``.

A registry per app (not the process-global default) so that several apps in one process
(tests, benchmarks) count separately and never collide on metric names.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ordermesh.kafka.lag import PartitionLag

# Latency buckets reach 30 s: long polls (?wait=) end anywhere up to there.
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
UNMATCHED: Final = "unmatched"


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ordermesh_api_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ordermesh_api_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.orders_accepted = Counter(
            "ordermesh_api_orders_accepted",
            "Orders acknowledged by Kafka and answered 202.",
            registry=self.registry,
        )
        self.idempotent_replays = Counter(
            "ordermesh_api_idempotent_replays",
            "POST /orders answered from an earlier request with the same Idempotency-Key.",
            registry=self.registry,
        )
        self.cancels_requested = Counter(
            "ordermesh_api_cancels_requested",
            "CancelOrder commands acknowledged by Kafka.",
            registry=self.registry,
        )
        self.produce_failures = Counter(
            "ordermesh_api_produce_failures",
            "Records Kafka did not acknowledge (answered 503), by topic.",
            ["topic"],
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "ordermesh_consumer_lag",
            "Messages not yet committed by a consumer group, per partition.",
            ["group", "topic", "partition"],
            registry=self.registry,
        )

    def set_lag(self, lags: dict[str, PartitionLag]) -> None:
        # clear first: a partition that went away must not keep its last value
        self.consumer_lag.clear()
        for group, lag in lags.items():
            for (topic, partition), value in lag.items():
                self.consumer_lag.labels(group, topic, str(partition)).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template (bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _labels(self, scope: Scope) -> tuple[str, str]:
        """(route template, method); a method the route does not serve counts as "other"."""
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", UNMATCHED)), str(scope["method"])
            if match is Match.PARTIAL and partial is None:
                partial = str(getattr(route, "path", UNMATCHED))
        return partial or UNMATCHED, "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers if the app raises before responding

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route, method = self._labels(scope)
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)
