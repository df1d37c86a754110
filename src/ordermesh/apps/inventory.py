"""The inventory process: reserve stock, emit outcomes, dead-letter bad input."""

from __future__ import annotations

from contextlib import closing
from typing import Final

from ordermesh.apps.base import run_until_stopped, service_runner
from ordermesh.config import Settings
from ordermesh.kafka.runner import BatchRunner, RunnerStats
from ordermesh.services.inventory import InventoryService
from ordermesh.stores.factory import open_inventory_store
from ordermesh.stores.inventory import InventoryStore
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS
from ordermesh.topology import ServiceSpec, service

SPEC: Final[ServiceSpec] = service("inventory")


def inventory_runner(settings: Settings, store: InventoryStore) -> BatchRunner:
    core = InventoryService(
        store,
        orders_topic=settings.topic(ORDERS),
        commands_topic=settings.topic(COMMANDS),
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
    )
    return service_runner(settings, SPEC, core)


def run_inventory(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """The inventory service until SIGTERM/SIGINT (or idle)."""
    with closing(open_inventory_store(settings)) as store:
        return run_until_stopped(inventory_runner(settings, store), idle_exit_s)
