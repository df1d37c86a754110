"""The tracker process: follow orders and their events to a queryable status."""

from __future__ import annotations

from contextlib import closing
from typing import Final

from ordermesh.apps.base import run_until_stopped, service_runner
from ordermesh.config import Settings
from ordermesh.kafka.runner import BatchRunner, RunnerStats
from ordermesh.services.tracker import TrackerService
from ordermesh.stores.factory import open_tracker_store
from ordermesh.stores.tracker import TrackerStore
from ordermesh.topics import DLQ, EVENTS, ORDERS
from ordermesh.topology import ServiceSpec, service

SPEC: Final[ServiceSpec] = service("tracker")


def tracker_runner(settings: Settings, store: TrackerStore) -> BatchRunner:
    core = TrackerService(
        store,
        orders_topic=settings.topic(ORDERS),
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
    )
    return service_runner(settings, SPEC, core)


def run_tracker(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """The order tracker until SIGTERM/SIGINT (or idle)."""
    with closing(open_tracker_store(settings)) as store:
        return run_until_stopped(tracker_runner(settings, store), idle_exit_s)
