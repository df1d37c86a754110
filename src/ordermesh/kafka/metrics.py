"""Prometheus metrics and ``/health`` of a ``BatchRunner``, served over HTTP by every service.

Counters and histograms are updated once per batch (never per message). Consumer lag per
partition is sampled in the runner's own loop every few seconds (the consumer is not
touched from the HTTP thread) and read by a collector at scrape time.

``/health`` reports the runner's own state from its ``RunnerStats`` (plain reads from
the HTTP thread; the runner never waits for it): 200 while the loop polls and no
partition is blocked, 503 before the first poll, after ``STALE_AFTER_S`` without one, or
while a partition is blocked. Container healthchecks call it through ``ordermesh health``.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from threading import Thread
from typing import Any, Final, Literal, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

BATCH_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
SECONDS_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# a loop that has not polled for this long is stuck (a poll returns every batch timeout,
# so only a handler or a commit that hangs gets here)
STALE_AFTER_S: Final = 30.0

HealthStatus = Literal["ok", "starting", "stale", "blocked"]


class RunnerState(Protocol):
    """What ``/health`` reads of a runner's stats (``runner.RunnerStats``)."""

    last_poll_at: float | None
    last_commit_at: float | None
    assigned: set[tuple[str, int]]
    blocked: dict[tuple[str, int], int]


@dataclass(frozen=True)
class Health:
    """The state of one service process, as ``/health`` reports it."""

    service: str
    group: str
    status: HealthStatus
    assigned_partitions: list[str]
    last_poll_age_s: float | None
    last_commit_age_s: float | None
    blocked_partitions: dict[str, int]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "group": self.group,
            "status": self.status,
            "assigned_partitions": self.assigned_partitions,
            "last_poll_age_s": self.last_poll_age_s,
            "last_commit_age_s": self.last_commit_age_s,
            "blocked_partitions": self.blocked_partitions,
        }


def _partition(key: tuple[str, int]) -> str:
    return f"{key[0]}[{key[1]}]"


def _age(at: float | None, now: float) -> float | None:
    return None if at is None else round(max(0.0, now - at), 3)


def _copy_set(items: set[tuple[str, int]]) -> list[tuple[str, int]]:
    # the runner thread changes these in place; a copy is one C call under the GIL, but
    # retry rather than ever fail a health request on a concurrent change
    for _ in range(3):
        try:
            return sorted(set(items))
        except RuntimeError:
            continue
    return []


def health_of(
    service: str, group: str, state: RunnerState | None, now: float | None = None
) -> Health:
    """The health of a runner from its stats (``state`` None: not watched yet)."""
    now = time.monotonic() if now is None else now
    if state is None:
        return Health(service, group, "starting", [], None, None, {})
    assigned = _copy_set(state.assigned)
    blocked = dict(state.blocked)
    poll_age = _age(state.last_poll_at, now)
    status: HealthStatus
    if blocked:
        status = "blocked"
    elif poll_age is None:
        status = "starting"
    elif poll_age > STALE_AFTER_S:
        status = "stale"
    else:
        status = "ok"
    return Health(
        service,
        group,
        status,
        [_partition(key) for key in assigned],
        poll_age,
        _age(state.last_commit_at, now),
        {_partition(key): offset for key, offset in sorted(blocked.items())},
    )


class _LagCollector(Collector):
    def __init__(self, metrics: RunnerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lag = GaugeMetricFamily(
            "ordermesh_consumer_lag",
            "Messages behind the partition end, per assigned partition (sampled).",
            labels=["service", "group", "topic", "partition"],
        )
        m = self._metrics
        for (topic, partition), value in sorted(m.lag.items()):
            lag.add_metric([m.service, m.group, topic, str(partition)], value)
        yield lag
        assigned = GaugeMetricFamily(
            "ordermesh_assigned_partitions",
            "Partitions assigned to this instance.",
            labels=["service", "group"],
        )
        assigned.add_metric([m.service, m.group], len(m.lag))
        yield assigned


class RunnerMetrics:
    """The metrics of one service process, in their own registry."""

    def __init__(self, service: str, group: str) -> None:
        self.service = service
        self.group = group
        self.lag: dict[tuple[str, int], int] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["service"]
        r = self.registry
        self.messages_in = Counter(
            "ordermesh_messages_in", "Records consumed.", ["service", "topic"], registry=r
        )
        self.messages_out = Counter(
            "ordermesh_messages_out",
            "Records produced and acked.",
            ["service", "topic"],
            registry=r,
        )
        self.dlq_writes = Counter(
            "ordermesh_dlq_writes", "Records sent to the DLQ.", labels, registry=r
        )
        self.batches = Counter("ordermesh_batches", "Batches handled.", labels, registry=r)
        self.commits = Counter("ordermesh_commits", "Offset commits.", labels, registry=r)
        self.commit_failures = Counter(
            "ordermesh_commit_failures", "Failed offset commits.", labels, registry=r
        )
        self.rebalances = Counter(
            "ordermesh_rebalances", "Partition assignments/revocations.", labels, registry=r
        )
        self.produce_errors = Counter(
            "ordermesh_produce_errors",
            "Records Kafka did not acknowledge, by error and whether a retry can help.",
            ["service", "error", "kind"],
            registry=r,
        )
        # alert on > 0: a record could not even be dead-lettered, its partition is paused
        self.partitions_blocked = Gauge(
            "ordermesh_partitions_blocked",
            "Partitions paused because a record could not be processed nor dead-lettered.",
            labels,
            registry=r,
        )
        self.partitions_blocked.labels(service)
        # alert on 1 for long: the database fails every batch, the partitions are paused
        self.store_unavailable = Gauge(
            "ordermesh_store_unavailable",
            "1 while the store fails batches (partitions paused, the batch held and retried).",
            labels,
            registry=r,
        )
        self.store_unavailable.labels(service)
        self.store_retries = Counter(
            "ordermesh_store_retries",
            "Batches handed to the handler again after the store failed them.",
            labels,
            registry=r,
        )
        self.store_retries.labels(service)
        self.batch_size = Histogram(
            "ordermesh_batch_size", "Records per batch.", labels, buckets=BATCH_BUCKETS, registry=r
        )
        self.handle_seconds = Histogram(
            "ordermesh_handle_seconds",
            "Time to handle one batch (DB transaction included).",
            labels,
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.produce_seconds = Histogram(
            "ordermesh_produce_seconds",
            "Time to produce a batch's outputs (and wait, if due).",
            labels,
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        r.register(_LagCollector(self))
        self._server: tuple[WSGIServer, Thread] | None = None
        self._state: RunnerState | None = None

    def watch(self, state: RunnerState) -> None:
        """Report ``state`` (the runner's stats) on ``/health``."""
        self._state = state

    def health(self, now: float | None = None) -> Health:
        return health_of(self.service, self.group, self._state, now)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics and /health on ``host:port`` (0 picks a free port); the port."""
        app = _wsgi_app(make_wsgi_app(self.registry), self.health)
        family, _type, _proto, _name, _addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]

        class _Server(ThreadingWSGIServer):
            address_family = family

        server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
        thread = Thread(target=server.serve_forever, name=f"{self.service}-http", daemon=True)
        thread.start()
        self._server = (server, thread)
        bound = int(server.server_address[1])
        log.info("%s: metrics and health on http://%s:%d/", self.service, host, bound)
        return bound

    def stop(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._server = None

    def observe_batch(
        self,
        records_by_topic: dict[str, int],
        outs_by_topic: dict[str, int],
        dlq_topic: str,
        handle_s: float,
        produce_s: float,
    ) -> None:
        svc = self.service
        for topic, n in records_by_topic.items():
            self.messages_in.labels(svc, topic).inc(n)
        for topic, n in outs_by_topic.items():
            self.messages_out.labels(svc, topic).inc(n)
            if topic == dlq_topic:
                self.dlq_writes.labels(svc).inc(n)
        self.batches.labels(svc).inc()
        self.batch_size.labels(svc).observe(sum(records_by_topic.values()))
        self.handle_seconds.labels(svc).observe(handle_s)
        self.produce_seconds.labels(svc).observe(produce_s)


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Healthchecks every few seconds are not worth a log line each."""


def _wsgi_app(metrics_app: WsgiApp, health: Callable[[], Health]) -> WsgiApp:
    """``/health`` as JSON, everything else as Prometheus' own app serves it."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").rstrip("/") != "/health":
            return metrics_app(environ, start_response)
        report = health()
        body = json.dumps(report.as_dict()).encode()
        start_response(
            "200 OK" if report.ok else "503 Service Unavailable",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body] if environ.get("REQUEST_METHOD") != "HEAD" else []

    return app


def scrape_text(metrics: RunnerMetrics) -> str:
    """The exposition text (for tests and `ordermesh top`)."""
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def sample_lag(consumer: Any, assigned: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Lag of the assigned partitions from cached watermarks and current positions."""
    from confluent_kafka import TopicPartition

    if not assigned:
        return {}
    lag: dict[tuple[str, int], int] = {}
    positions = consumer.position([TopicPartition(t, p) for t, p in assigned])
    for tp in positions:
        try:
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
        except Exception:  # noqa: BLE001 - no fetch response cached yet for this partition
            continue
        if high is None or high < 0:
            continue
        pos = tp.offset if tp.offset is not None and tp.offset >= 0 else None
        lag[(tp.topic, tp.partition)] = max(0, high - pos) if pos is not None else high
    return lag
