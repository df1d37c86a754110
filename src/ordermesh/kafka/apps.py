"""Service entry points: a pure service and its store, wired to a ``BatchRunner``."""

from __future__ import annotations

from contextlib import closing

from ordermesh.config import Settings
from ordermesh.kafka.runner import BatchHandler, BatchRunner, RunnerStats
from ordermesh.services.dlq import DlqLogger
from ordermesh.services.inventory import InventoryService
from ordermesh.services.tracker import TrackerService
from ordermesh.stores.inventory import InventoryStore
from ordermesh.stores.tracker import TrackerStore
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS


def _runner(settings: Settings, name: str, topics: list[str], handler: BatchHandler) -> BatchRunner:
    """A runner in consumer group ``name`` over ``topics`` (names before the prefix)."""
    return BatchRunner(
        settings,
        group=name,
        topics=[settings.topic(t) for t in topics],
        handler=handler,
        name=name,
    )


def _run(runner: BatchRunner, idle_exit_s: float | None) -> RunnerStats:
    """Run until SIGTERM/SIGINT (or idle); in-flight batches are committed before exit."""
    runner.install_signal_handlers()
    return runner.run(idle_exit_s=idle_exit_s)


def inventory_runner(settings: Settings, store: InventoryStore) -> BatchRunner:
    service = InventoryService(
        store,
        orders_topic=settings.topic(ORDERS),
        commands_topic=settings.topic(COMMANDS),
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
    )
    return _runner(settings, "inventory", [ORDERS, COMMANDS], service)


def run_inventory(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """The inventory service: reserve stock, emit outcomes, dead-letter bad input."""
    with closing(InventoryStore(settings.inventory_db_path())) as store:
        return _run(inventory_runner(settings, store), idle_exit_s)


def tracker_runner(settings: Settings, store: TrackerStore) -> BatchRunner:
    service = TrackerService(
        store,
        orders_topic=settings.topic(ORDERS),
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
    )
    return _runner(settings, "tracker", [ORDERS, EVENTS], service)


def run_tracker(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """The order tracker: follow orders and their events to a queryable status."""
    with closing(TrackerStore(settings.tracker_db_path())) as store:
        return _run(tracker_runner(settings, store), idle_exit_s)


def run_dlq_logger(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """Log one alert line per DLQ record; produces nothing."""
    service = DlqLogger()
    try:
        return _run(_runner(settings, "dlq-logger", [DLQ], service), idle_exit_s)
    finally:
        service.log_summary()
