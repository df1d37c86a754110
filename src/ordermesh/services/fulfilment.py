"""Fulfilment core: schedule a shipment per paid order, drop it if cancelled first.

``FulfilmentService.handle(batch)`` reads ``order-events`` and keeps one shipment per
order in a ``FulfilmentStore``, in one transaction per batch, returning only dead
letters: OrderPaid schedules ``shp-<order_id>`` due ``fulfilment_delay_s`` after the
payment (the simulated pick and pack); OrderCancelled drops a shipment not ready yet.
Every other event is skipped after a peek at its type. The worker (``apps/fulfilment.py``)
later marks due shipments ready with ``ship`` and records their ShipmentReady in the
outbox. A redelivered event finds its shipment and changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ordermesh import schema
from ordermesh.schema import OrderCancelled, OrderEvent, OrderPaid, ShipmentReady
from ordermesh.services.base import OrderRowService, RowStats
from ordermesh.stores.fulfilment import FulfilmentStore, ShipmentRow
from ordermesh.stores.outbox import OutboxRecord

logger = logging.getLogger(__name__)

CONCERNS: Final = frozenset({"OrderPaid", "OrderCancelled"})


def shipment_id(order_id: str) -> str:
    return f"shp-{order_id}"


def apply_event(
    row: ShipmentRow | None, event: OrderEvent, delay_s: float, now: float
) -> ShipmentRow | None:
    """The order's shipment after ``event`` (the same object when nothing changes)."""
    if isinstance(event, OrderPaid):
        if row is not None:
            return row
        return ShipmentRow(
            event.order_id,
            shipment_id(event.order_id),
            "scheduled",
            event.at + delay_s,
            event.at,
            0.0,
        )
    if isinstance(event, OrderCancelled) and row is not None and row.state == "scheduled":
        return row._replace(state="dropped", done_at=now)
    return row


def ship(row: ShipmentRow, events_topic: str, now: float) -> tuple[ShipmentRow, OutboxRecord]:
    """A due shipment marked ready, and its ShipmentReady to publish."""
    event = ShipmentReady(row.order_id, row.shipment_id, now)
    record = OutboxRecord(events_topic, row.order_id.encode(), schema.encode(event))
    return row._replace(state="ready", done_at=now), record


@dataclass
class FulfilmentStats(RowStats):
    scheduled: int = 0
    dropped: int = 0


class FulfilmentService(OrderRowService[ShipmentRow, FulfilmentStats]):
    """Pure fulfilment logic over a ``FulfilmentStore``; no Kafka inside."""

    log = logger

    def __init__(
        self,
        store: FulfilmentStore,
        *,
        events_topic: str,
        dlq_topic: str,
        delay_s: float,
        service_name: str = "fulfilment",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            store,
            events_topic=events_topic,
            dlq_topic=dlq_topic,
            service_name=service_name,
            clock=clock,
            concerns=CONCERNS,
            stats=FulfilmentStats(),
        )
        self.delay_s = delay_s

    def apply(self, row: ShipmentRow | None, event: OrderEvent, now: float) -> ShipmentRow | None:
        return apply_event(row, event, self.delay_s, now)

    def count(self, stats: FulfilmentStats, before: ShipmentRow | None, after: ShipmentRow) -> None:
        if after.state == "scheduled":
            stats.scheduled += 1
        else:
            stats.dropped += 1
