"""Service entry points: a pure service and its store, wired to a ``BatchRunner``."""

from __future__ import annotations

import logging

from ordermesh.config import Settings
from ordermesh.kafka.runner import BatchRunner, RunnerStats
from ordermesh.services.dlq import DlqLogger
from ordermesh.services.inventory import InventoryService
from ordermesh.services.tracker import TrackerService
from ordermesh.stores.inventory import InventoryStore
from ordermesh.stores.tracker import TrackerStore
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS

log = logging.getLogger(__name__)


def inventory_runner(settings: Settings, store: InventoryStore) -> BatchRunner:
    service = InventoryService(
        store,
        orders_topic=settings.topic(ORDERS),
        commands_topic=settings.topic(COMMANDS),
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
    )
    return BatchRunner(
        settings,
        group="inventory",
        topics=[settings.topic(ORDERS), settings.topic(COMMANDS)],
        handler=service,
        name="inventory",
    )


def run_inventory(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """Run the inventory service until SIGTERM/SIGINT (or idle); commits before exiting."""
    store = InventoryStore(settings.inventory_db_path())
    try:
        runner = inventory_runner(settings, store)
        runner.install_signal_handlers()
        return runner.run(idle_exit_s=idle_exit_s)
    finally:
        store.close()


def tracker_runner(settings: Settings, store: TrackerStore) -> BatchRunner:
    service = TrackerService(
        store,
        orders_topic=settings.topic(ORDERS),
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
    )
    return BatchRunner(
        settings,
        group="tracker",
        topics=[settings.topic(ORDERS), settings.topic(EVENTS)],
        handler=service,
        name="tracker",
    )


def run_tracker(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """Run the order tracker until SIGTERM/SIGINT (or idle); commits before exiting."""
    store = TrackerStore(settings.tracker_db_path())
    try:
        runner = tracker_runner(settings, store)
        runner.install_signal_handlers()
        return runner.run(idle_exit_s=idle_exit_s)
    finally:
        store.close()


def run_dlq_logger(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """Log one alert line per DLQ record until SIGTERM/SIGINT (or idle); produces nothing."""
    service = DlqLogger()
    runner = BatchRunner(
        settings,
        group="dlq-logger",
        topics=[settings.topic(DLQ)],
        handler=service,
        name="dlq-logger",
    )
    runner.install_signal_handlers()
    try:
        return runner.run(idle_exit_s=idle_exit_s)
    finally:
        service.log_summary()
