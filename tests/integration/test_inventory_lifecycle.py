"""The inventory as the arbiter of orders' lives on the real broker: its runner and its
deadline sweep, fed with orders, payments' and fulfilment's facts and a cancel; a short
reservation TTL expires the unpaid ones, and a reorder is restocked through the sweep."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import closing
from typing import cast

from ordermesh import lifecycle, schema
from ordermesh.apps.inventory import DeadlineSweep, inventory_runner
from ordermesh.config import Settings
from ordermesh.kafka.producer import Producer, deliver
from ordermesh.kafka.reader import read_topic
from ordermesh.records import OutRecord
from ordermesh.schema import (
    CancelOrder,
    OrderItem,
    OrderPlaced,
    PaymentAuthorized,
    PaymentDeclined,
    ShipmentReady,
)
from ordermesh.services.inventory import InventoryService
from ordermesh.stores.factory import open_inventory_store
from ordermesh.topics import COMMANDS, EVENTS, ORDERS
from tests.conftest import SettingsFactory, wait_for

TTL_S = 3.0


Message = OrderPlaced | CancelOrder | PaymentAuthorized | PaymentDeclined | ShipmentReady


def send(settings: Settings, topic: str, *messages: Message) -> None:
    records = [
        OutRecord(settings.topic(topic), m.order_id.encode(), schema.encode(m)) for m in messages
    ]
    results = deliver(settings, records)
    assert all(r is not None and r.error is None for r in results), results


# what the inventory emits (the facts the test sends as payments and fulfilment are
# on order-events too)
INVENTORY_EVENTS = frozenset(t.event for t in lifecycle.TRANSITIONS) | frozenset(
    f.event for f in lifecycle.FACTS if f.owner == "inventory"
)


def lives(settings: Settings) -> dict[str, list[str]]:
    """The inventory's event types on order-events per order, in order."""
    seen: dict[str, list[str]] = defaultdict(list)
    for record in read_topic(settings, settings.topic(EVENTS), deadline_s=30):
        event = schema.decode_event(record.value)
        if type(event).__name__ in INVENTORY_EVENTS:
            seen[event.order_id].append(type(event).__name__)
    return seen


def count(settings: Settings, kind: str) -> int:
    return sum(events.count(kind) for events in lives(settings).values())


def test_orders_live_their_whole_life_through_the_inventory(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(
        reservation_ttl_s=TTL_S,
        sweep_every_s=0.2,
        reorder_point=95,
        reorder_quantity=50,
        supplier_delay_s=0.5,
    )
    with closing(open_inventory_store(settings)) as store:
        store.seed({"A": 100, "B": 100})
        runner = inventory_runner(settings, store)
        core = cast(InventoryService, runner.handler)
        sweep_store = open_inventory_store(settings, readonly=True)
        sweep = DeadlineSweep(
            settings, sweep_store, Producer.for_topics(settings, [settings.topic(COMMANDS)])
        )
        thread = threading.Thread(target=runner.run, name="inventory-runner")
        thread.start()
        sweep.start()
        try:
            orders = [
                OrderPlaced(
                    order_id=f"o{n}",
                    customer_id="c-1",
                    items=(
                        OrderItem(sku="A", quantity=2, unit_price=1.0),
                        OrderItem(sku="B", quantity=1, unit_price=1.0),
                    ),
                    currency="EUR",
                    total=3.0,
                    created_at=time.time(),
                    card="4242",
                )
                for n in range(8)
            ]
            send(settings, ORDERS, *orders)
            wait_for(lambda: count(settings, "OrderReserved") == 8, 60, "8 reservations")

            now = time.time()
            send(
                settings,
                EVENTS,
                *(PaymentAuthorized(f"o{n}", f"auth-{n}", 3.0, "EUR", at=now) for n in range(3)),
                PaymentDeclined("o3", "CARD_DECLINED", "test card", at=now),
            )
            wait_for(lambda: count(settings, "OrderPaid") == 3, 60, "3 payments")
            send(
                settings,
                EVENTS,
                ShipmentReady("o0", "ship-0", at=time.time()),
                ShipmentReady("o1", "ship-1", at=time.time()),
            )
            send(settings, COMMANDS, CancelOrder(order_id="o2", requested_at=time.time()))
            # o4..o7 were never paid: the sweep expires them after the TTL
            wait_for(lambda: count(settings, "ReservationExpired") == 4, 60, "4 expiries")
            # a payment authorized only now is a late success: it revives nothing
            send(settings, EVENTS, PaymentAuthorized("o4", "auth-4", 3.0, "EUR", at=time.time()))
            wait_for(lambda: core.stats.ignored >= 1, 60, "the late payment to be handled")
            wait_for(lambda: count(settings, "OrderShipped") == 2, 60, "2 shipments")
            # A and B fell below the reorder point: the sweep's Restocks arrive, once each
            wait_for(
                lambda: [row.restocked for row in store.stock_levels()] == [50, 50],
                60,
                "the reorders' restocks",
            )
        finally:
            sweep.stop()
            runner.request_stop()
            thread.join(timeout=60)
            sweep_store.close()
        assert not thread.is_alive()

        final = lives(settings)
        assert final["o0"] == ["OrderReserved", "OrderPaid", "OrderShipped"]
        assert final["o1"] == ["OrderReserved", "OrderPaid", "OrderShipped"]
        assert final["o2"] == ["OrderReserved", "OrderPaid", "StockReleased", "OrderCancelled"]
        assert final["o3"] == ["OrderReserved", "StockReleased", "OrderPaymentFailed"]
        for n in range(4, 8):
            assert final[f"o{n}"] == ["OrderReserved", "StockReleased", "ReservationExpired"], n
        statuses = {oid: o.status for oid, o in store.order_outcomes().items()}
        assert statuses == {
            "o0": "SHIPPED",
            "o1": "SHIPPED",
            "o2": "CANCELLED",
            "o3": "PAYMENT_FAILED",
            **{f"o{n}": "EXPIRED" for n in range(4, 8)},
        }
        (a,) = store.stock_levels("A")
        (b,) = store.stock_levels("B")
        assert a[1:] == (100, 50, 146, 0, 0, 4)  # entered, restocked, available..shipped
        assert b[1:] == (100, 50, 148, 0, 0, 2)
        assert store.stock_totals().conserved
        assert store.due_reorders(time.time() + 3600, 10) == []
        assert sweep.totals.expiries >= 4 and sweep.totals.restocks >= 2
        assert core.stats.paid == 3 and core.stats.restocked == 2 and core.stats.unknown == 0
