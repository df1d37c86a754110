"""The fulfilment process: shipments from ``order-events``, ShipmentReady when packed.

The runner feeds ``FulfilmentService`` (schedule on OrderPaid, drop on OrderCancelled);
a ``Worker`` thread (``apps/worker.py``) with its own store connection and producer
marks due shipments ready and records each ShipmentReady in the outbox in one
transaction, then produces the outbox and marks it published after the ack.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from ordermesh.apps.base import service_runner
from ordermesh.apps.worker import OutboxPublisher, Worker, run_with_worker
from ordermesh.config import Settings
from ordermesh.kafka.producer import Producer
from ordermesh.kafka.runner import BatchRunner, RunnerStats
from ordermesh.services.fulfilment import FulfilmentService, ship
from ordermesh.stores.factory import open_fulfilment_store
from ordermesh.stores.fulfilment import FulfilmentStore
from ordermesh.topics import DLQ, EVENTS
from ordermesh.topology import ServiceSpec, service

log = logging.getLogger(__name__)

SPEC: Final[ServiceSpec] = service("fulfilment")
SHIP_BATCH: Final = 1000
COUNT_EVERY_S: Final = 1.0
SUMMARY_EVERY_S: Final = 10.0


class FulfilmentSteps:
    """The worker's fulfilment step: due shipments become ready, with their event."""

    def __init__(
        self,
        store: FulfilmentStore,
        *,
        events_topic: str,
        name: str = "fulfilment",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.events_topic = events_topic
        self.name = name
        self.ready = 0
        self.scheduled = 0
        self._clock = clock
        self._last_count = -COUNT_EVERY_S
        self._last_summary = time.monotonic()
        self._summarised = 0

    async def start(self) -> None:
        self.scheduled = self.store.scheduled_count()

    async def close(self) -> None:
        return None

    def idle(self) -> bool:
        return self.scheduled == 0

    async def step(self, now: float) -> bool:
        with self.store.transaction():
            due = self.store.claim_due(now, SHIP_BATCH)
            shipped = [ship(row, self.events_topic, now) for row in due]
            self.store.save([row for row, _ in shipped])
            self.store.add_outbox([record for _, record in shipped], now)
        self.ready += len(due)
        mono = time.monotonic()
        if due or mono - self._last_count >= COUNT_EVERY_S:
            self.scheduled = self.store.scheduled_count()
            self._last_count = mono
        if mono - self._last_summary >= SUMMARY_EVERY_S:
            if self.ready != self._summarised or self.scheduled:
                log.info(
                    "%s: last %.0fs: %d shipments ready; %d scheduled",
                    self.name,
                    mono - self._last_summary,
                    self.ready - self._summarised,
                    self.scheduled,
                )
            self._summarised = self.ready
            self._last_summary = mono
        return bool(due)

    async def drain(self, deadline: float) -> None:
        return None  # nothing is in flight between rounds


class FulfilmentCollector(Collector):
    """The worker's counters on the process's ``/metrics``."""

    def __init__(self, steps: FulfilmentSteps) -> None:
        self._steps = steps

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        ready = CounterMetricFamily(
            "ordermesh_fulfilment_ready",
            "Shipments packed (ShipmentReady recorded).",
            labels=["service"],
        )
        ready.add_metric([self._steps.name], self._steps.ready)
        yield ready
        scheduled = GaugeMetricFamily(
            "ordermesh_fulfilment_scheduled",
            "Shipments being picked and packed.",
            labels=["service"],
        )
        scheduled.add_metric([self._steps.name], self._steps.scheduled)
        yield scheduled


def fulfilment_runner(settings: Settings, store: FulfilmentStore) -> BatchRunner:
    core = FulfilmentService(
        store,
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
        delay_s=settings.fulfilment_delay_s,
    )
    return service_runner(settings, SPEC, core)


def fulfilment_worker(
    settings: Settings, store: FulfilmentStore, *, registry: CollectorRegistry | None = None
) -> Worker:
    steps = FulfilmentSteps(store, events_topic=settings.topic(EVENTS))
    if registry is not None:
        registry.register(FulfilmentCollector(steps))
    producer = Producer.for_topics(settings, [settings.topic(EVENTS)])
    return Worker(SPEC.name, steps, OutboxPublisher(SPEC.name, store, producer))


def run_fulfilment(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """The fulfilment service until SIGTERM/SIGINT (or idle, with nothing scheduled)."""
    with (
        closing(open_fulfilment_store(settings)) as store,
        closing(open_fulfilment_store(settings)) as work_store,
    ):
        runner = fulfilment_runner(settings, store)
        worker = fulfilment_worker(settings, work_store, registry=runner.metrics.registry)
        return run_with_worker(runner, worker, idle_exit_s)
