"""Fulfilment: scheduling and dropping shipments, the worker's step, the outbox publisher."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ordermesh import schema
from ordermesh.apps.fulfilment import FulfilmentSteps
from ordermesh.apps.worker import OutboxPublisher
from ordermesh.kafka.producer import Producer
from ordermesh.records import InRecord
from ordermesh.schema import OrderCancelled, OrderPaid, OrderReserved, ShipmentReady
from ordermesh.services.fulfilment import FulfilmentService
from ordermesh.stores.outbox import OutboxRecord
from ordermesh.stores.sqlite_fulfilment import SqliteFulfilmentStore

EVENTS = "t-order-events"
DLQ = "t-orders-dlq"
DELAY = 30.0
_offsets = itertools.count()


def rec(event: msgspec.Struct | bytes, key: str = "o1") -> InRecord:
    value = event if isinstance(event, bytes) else schema.encode(event)
    return InRecord(EVENTS, 0, next(_offsets), key.encode(), value, [], 0)


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.store = SqliteFulfilmentStore(tmp_path / "fulfilment.db")
        self.work_store = SqliteFulfilmentStore(tmp_path / "fulfilment.db")
        self.core = FulfilmentService(
            self.store, events_topic=EVENTS, dlq_topic=DLQ, delay_s=DELAY, clock=self.clock
        )
        self.steps = FulfilmentSteps(self.work_store, events_topic=EVENTS, clock=self.clock)

    def step_at(self, at: float) -> bool:
        return asyncio.run(self.steps.step(at))

    def ready(self) -> list[ShipmentReady]:
        rows = self.work_store.claim_outbox(self.clock.now + 1e6, 1.0, 1000)
        events = [schema.decode_event(r.value) for r in rows]
        assert all(isinstance(e, ShipmentReady) for e in events)
        return events  # type: ignore[return-value]

    def close(self) -> None:
        self.store.close()
        self.work_store.close()


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    h = Harness(tmp_path)
    yield h
    h.close()


def test_paid_order_ships_once_after_the_delay(harness: Harness) -> None:
    paid_at = 1_700_000_100.0
    assert harness.core.handle([rec(OrderPaid("o1", "auth-1", 9.99, paid_at))]) == []
    row = harness.store.load(["o1"])["o1"]
    assert (row.shipment_id, row.state, row.due_at) == ("shp-o1", "scheduled", paid_at + DELAY)
    assert harness.step_at(paid_at + DELAY - 0.01) is False
    assert harness.ready() == []
    assert harness.step_at(paid_at + DELAY) is True
    [event] = harness.ready()
    assert (event.order_id, event.shipment_id, event.at) == ("o1", "shp-o1", paid_at + DELAY)
    # redelivered OrderPaid, later rounds: nothing new
    harness.core.handle([rec(OrderPaid("o1", "auth-1", 9.99, paid_at))])
    assert harness.step_at(paid_at + 10 * DELAY) is False
    assert harness.ready() == []
    assert harness.store.load(["o1"])["o1"].state == "ready"


def test_cancel_before_the_shipment_drops_it(harness: Harness) -> None:
    harness.core.handle(
        [
            rec(OrderPaid("o1", "auth-1", 9.99, 100.0)),
            rec(OrderCancelled("o1", 101.0, stage="PAID")),
        ]
    )
    assert harness.store.load(["o1"])["o1"].state == "dropped"
    assert harness.step_at(1e12) is False
    assert harness.ready() == []
    assert harness.steps.idle()


def test_cancel_after_ready_changes_nothing(harness: Harness) -> None:
    harness.core.handle([rec(OrderPaid("o1", "auth-1", 9.99, 100.0))])
    harness.step_at(100.0 + DELAY)
    harness.core.handle([rec(OrderCancelled("o1", 200.0, stage="PAID"))])
    assert harness.store.load(["o1"])["o1"].state == "ready"


def test_other_events_skipped_bad_bytes_dead_lettered(harness: Harness) -> None:
    reserved = OrderReserved("o2", (), 1.0, "EUR", 1.0, 2.0)
    out = harness.core.handle([rec(reserved, "o2"), rec(b"\xff\xfe", "o3")])
    assert [o.topic for o in out] == [DLQ]
    assert harness.core.stats.skipped == 1
    assert harness.store.load(["o2", "o3"]) == {}


class StandInClient:
    """A confluent-kafka producer stand-in: delivery reports come on ``poll``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.pending: list[Any] = []
        self.fail_next = 0

    def produce(self, topic: str, value: bytes | None, key: bytes | None, **kw: Any) -> None:
        self.sent.append((topic, value, key))
        err = None
        if self.fail_next:
            self.fail_next -= 1
            err = "broker down"
        self.pending.append((kw["on_delivery"], err))

    def poll(self, timeout: float) -> int:
        pending, self.pending = self.pending, []
        for callback, err in pending:
            callback(err, None)
        return len(pending)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return 0

    def __len__(self) -> int:
        return len(self.pending)


def test_outbox_is_marked_published_only_after_the_ack(harness: Harness) -> None:
    store = harness.work_store
    with store.transaction():
        store.add_outbox(
            [OutboxRecord(EVENTS, b"o1", b"one"), OutboxRecord(EVENTS, b"o2", b"two")], 1.0
        )
    client = StandInClient()
    client.fail_next = 1
    publisher = OutboxPublisher("t", store, Producer(client), clock=harness.clock)
    assert publisher.pump()
    assert [v for _, v, _ in client.sent] == [b"one", b"two"]
    assert store.unpublished_count() == 2  # sent, not acknowledged yet
    publisher.pump()  # reports: "one" failed (released), "two" acked; "one" sent again
    assert store.unpublished_count() == 1
    assert [v for _, v, _ in client.sent] == [b"one", b"two", b"one"]
    publisher.pump()
    assert store.unpublished_count() == 0
    assert publisher.published == 2
    publisher.pump()
    assert len(client.sent) == 3  # published rows are never produced again
