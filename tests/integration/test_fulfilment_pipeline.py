"""Fulfilment on the real broker: OrderPaid in, ShipmentReady out after the delay; a
cancel first drops it."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from ordermesh import schema
from ordermesh.config import Settings
from ordermesh.kafka.producer import deliver
from ordermesh.kafka.reader import read_topic
from ordermesh.records import OutRecord
from ordermesh.schema import OrderCancelled, OrderPaid, ShipmentReady
from ordermesh.topics import EVENTS
from tests.conftest import ServiceProcess, SettingsFactory, wait_for


def produce(settings: Settings, *events: msgspec.Struct) -> None:
    topic = settings.topic(EVENTS)
    records = [OutRecord(topic, e.order_id.encode(), schema.encode(e)) for e in events]  # type: ignore[attr-defined]
    assert all(r is not None and r.error is None for r in deliver(settings, records))


def shipments(settings: Settings) -> list[ShipmentReady]:
    events = (schema.decode_event(r.value) for r in read_topic(settings, settings.topic(EVENTS)))
    return [e for e in events if isinstance(e, ShipmentReady)]


def test_paid_orders_ship_after_the_delay_and_cancelled_ones_never(
    settings_factory: SettingsFactory, service_factory: Callable[..., ServiceProcess]
) -> None:
    settings = settings_factory(fulfilment_delay_s=1.0)
    proc = service_factory(["fulfilment", "run"], settings, "fulfilment")
    now = schema.now()
    produce(
        settings,
        OrderPaid("keep", "auth-1", 10.0, now),
        OrderPaid("drop", "auth-2", 10.0, now),
        OrderCancelled("drop", now + 0.1, stage="PAID"),
    )
    # paid after the cancel with the same delay: once it shipped, "drop" would have too
    produce(settings, OrderPaid("later", "auth-3", 10.0, schema.now()))
    wait_for(
        lambda: {s.order_id for s in shipments(settings)} >= {"keep", "later"},
        60,
        "ShipmentReady of the paid orders",
    )
    assert proc.stop() == 0, proc.log_text()[-3000:]
    found = shipments(settings)
    assert sorted(s.order_id for s in found) == ["keep", "later"]
    keep = next(s for s in found if s.order_id == "keep")
    assert keep.shipment_id == "shp-keep"
    assert keep.at >= now + 1.0  # not before its pick-and-pack delay
    assert "worker stopped; 2 events published, 0 not acknowledged" in proc.log_text()
