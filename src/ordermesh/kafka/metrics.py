"""Prometheus metrics of a ``BatchRunner``, served over HTTP by every service.

Counters and histograms are updated once per batch (never per message). Consumer lag per
partition is sampled in the runner's own loop every few seconds (the consumer is not
touched from the HTTP thread) and read by a collector at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from threading import Thread
from typing import Any, Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

BATCH_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
SECONDS_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on ``host:port`` (0 picks a free port); returns the port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = (server, thread)
        bound = int(server.server_address[1])
        log.info("%s: metrics on http://%s:%d/metrics", self.service, host, bound)
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
