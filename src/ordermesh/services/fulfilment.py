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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Final

from ordermesh import schema
from ordermesh.errors import DecodeError
from ordermesh.records import InRecord, OutRecord
from ordermesh.schema import OrderCancelled, OrderEvent, OrderPaid, ShipmentReady
from ordermesh.services.base import StoreService, describe_dead_letter
from ordermesh.services.payments import event_kind
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
class FulfilmentStats:
    batches: int = 0
    records: int = 0
    skipped: int = 0
    scheduled: int = 0
    dropped: int = 0
    unchanged: int = 0
    dlq: int = 0

    def add(self, other: FulfilmentStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class FulfilmentService(StoreService[FulfilmentStore, OrderEvent]):
    """Pure fulfilment logic over a ``FulfilmentStore``; no Kafka inside."""

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
            decoders={events_topic: schema.decode_event},
            dlq_topic=dlq_topic,
            service_name=service_name,
            clock=clock,
        )
        self.events_topic = events_topic
        self.delay_s = delay_s
        self.stats = FulfilmentStats()

    def handle(self, batch: Sequence[InRecord]) -> list[OutRecord]:
        """Schedule and drop the batch's shipments in one transaction; the dead letters.

        A ``StoreError`` means nothing was committed: the batch must be redelivered.
        """
        if not batch:
            return []
        stats = FulfilmentStats(batches=1, records=len(batch))
        out: list[OutRecord] = []
        first_dlq: str | None = None
        work: list[tuple[InRecord, OrderEvent, bytes]] = []
        for record in batch:
            if record.topic == self.events_topic:
                kind = event_kind(record.value)
                if kind is not None and kind not in CONCERNS:
                    stats.skipped += 1
                    continue
            try:
                task = self.decode(record)
            except DecodeError as exc:
                task = self.decode_dead_letter(record, exc)
            if isinstance(task, OutRecord):
                out.append(task)
                first_dlq = first_dlq or describe_dead_letter(record, task)
                continue
            work.append((record, task, b""))
        if work:
            now = self._clock()
            with self.store.transaction():
                rows = self.store.load({e.order_id for _, e, _ in work})
                changed: dict[str, ShipmentRow] = {}

                def step(record: InRecord, event: OrderEvent, _extra: bytes) -> None:
                    before = rows.get(event.order_id)
                    after = apply_event(before, event, self.delay_s, now)
                    if after is None or after is before:
                        stats.unchanged += 1
                        return
                    rows[event.order_id] = changed[event.order_id] = after
                    if after.state == "scheduled":
                        stats.scheduled += 1
                    else:
                        stats.dropped += 1

                def dead(record: InRecord, dlq: OutRecord) -> None:
                    nonlocal first_dlq
                    out.append(dlq)
                    first_dlq = first_dlq or describe_dead_letter(record, dlq)

                self.apply_guarded(work, step, dead)
                self.store.save(list(changed.values()))
        stats.dlq = len(out)
        if first_dlq is not None:
            logger.warning(
                "%s: %d record(s) dead-lettered, first: %s", self.service_name, len(out), first_dlq
            )
        self.stats.add(stats)
        return out
