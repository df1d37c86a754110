"""The order tracker on the real broker, beside the inventory service: statuses agree."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

import msgspec
from typer.testing import CliRunner

from ordermesh import lifecycle, schema
from ordermesh.apps.inventory import inventory_runner
from ordermesh.apps.tracker import tracker_runner
from ordermesh.cli import app as cli_app
from ordermesh.config import Settings
from ordermesh.kafka.client import make_producer
from ordermesh.kafka.lag import group_lag
from ordermesh.kafka.reader import read_topic
from ordermesh.kafka.runner import BatchRunner
from ordermesh.loadgen import run_load
from ordermesh.records import ERROR_HEADER_PREFIX, header
from ordermesh.services.tracker import TrackerService
from ordermesh.stores.factory import open_inventory_store, open_order_queries, open_tracker_store
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS
from ordermesh.verify import verify
from tests.conftest import ServiceProcess, wait_for
from tests.integration.test_inventory_pipeline import seed
from tests.unit.test_tracker_lifecycle import event, order

CANCELS = 25


def _lag(settings: Settings, group: str, topics: list[str]) -> int:
    return sum(group_lag(settings, group, [settings.topic(t) for t in topics]).values())


def both_drained(settings: Settings) -> bool:
    # inventory first: once it has drained, every event it will produce is on the topic
    return (
        _lag(settings, "inventory", [ORDERS, COMMANDS]) == 0
        and _lag(settings, "tracker", [ORDERS, EVENTS]) == 0
    )


def send_cancels(settings: Settings, order_ids: list[str]) -> None:
    producer = make_producer(settings)
    topic = settings.topic(COMMANDS)
    for order_id in order_ids:
        command = schema.CancelOrder(order_id=order_id, requested_at=schema.now(), reason="test")
        producer.produce(topic, schema.encode(command), order_id.encode())
    assert producer.flush(30) == 0


def test_tracker_agrees_with_inventory_including_cancellations(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    # scarce stock and a few unknown SKUs: all three outcomes occur
    seed(settings, skus=200, stock=40)
    inventory = service_factory(["inventory", "run"], settings, "inventory")
    tracker = service_factory(["tracker", "run"], settings, "tracker")
    summary = run_load(
        settings, count=3_000, duration=None, rate=None, malformed_ratio=0.04, seed=5, skus=210
    )
    assert summary.failed == 0 and summary.malformed_sent > 50
    wait_for(lambda: _lag(settings, "inventory", [ORDERS]) == 0, 60, "inventory to decide")

    with open_inventory_store(settings) as inv:
        decided = inv.order_outcomes()
        stock_before = {row.sku: row for row in inv.stock()}
    to_cancel = sorted(oid for oid, o in decided.items() if o.status == "RESERVED")[:CANCELS]
    a_rejected = min(oid for oid, o in decided.items() if o.status == "REJECTED")
    assert len(to_cancel) == CANCELS
    # one cancel sent twice: its stock must still come back once
    send_cancels(settings, [*to_cancel, to_cancel[0], a_rejected])
    wait_for(lambda: both_drained(settings), 60, "inventory and tracker to drain")
    assert inventory.stop() == 0, inventory.log_text()[-3000:]
    assert tracker.stop() == 0, tracker.log_text()[-3000:]

    report = verify(settings)
    assert report.ok, report.violations
    assert report.tracker_checked
    assert report.tracker_orders == report.valid_orders == 3_000 - summary.malformed_sent
    assert report.tracker_missing == report.tracker_mismatches == 0

    with open_inventory_store(settings) as inv:
        final = inv.order_outcomes()
        stock_after = {row.sku: row for row in inv.stock()}
    with open_order_queries(settings) as store:
        statuses = store.statuses()
        counts = store.status_counts()
        assert store.pending_count() == 0
        cancelled_view = store.get_order(to_cancel[0])
        rejected_view = store.get_order(a_rejected)

    assert statuses == {oid: o.status for oid, o in final.items()}
    assert {oid for oid, s in statuses.items() if s == "CANCELLED"} == set(to_cancel)
    expected = Counter(o.status for o in final.values())
    assert counts == {s: expected[s] for s in lifecycle.STATUSES}
    assert counts["CANCELLED"] == CANCELS
    assert counts["RESERVED"] > 0 and counts["REJECTED"] > 0
    assert cancelled_view is not None
    assert [h.event for h in cancelled_view.history] == [
        "OrderPlaced",
        "OrderReserved",
        "StockReleased",
        "OrderCancelled",
    ]
    assert cancelled_view.updated_at >= cancelled_view.created_at
    assert rejected_view is not None and rejected_view.status == "REJECTED"
    assert rejected_view.history[-1].event == "CancelRejected"

    # the cancelled orders' stock came back exactly once, nothing else moved
    released: Counter[str] = Counter()
    for order_id in to_cancel:
        for sku, quantity in decided[order_id].items:
            released[sku] += quantity
    for sku, before in stock_before.items():
        after = stock_after[sku]
        assert after.reserved == before.reserved - released[sku], sku
        assert after.available == before.available + released[sku], sku
        assert after.available + after.reserved == 40, sku

    # malformed orders are in the DLQ once, from the inventory; the tracker added none
    dlq = list(read_topic(settings, settings.topic(DLQ)))
    services = Counter(header(r.headers, ERROR_HEADER_PREFIX + "service") for r in dlq)
    assert services == {b"inventory": summary.malformed_sent}


def test_events_read_before_their_orders_wait_in_pending(settings: Settings) -> None:
    seed(settings, skus=100, stock=30)
    summary = run_load(
        settings, count=2_000, duration=None, rate=None, malformed_ratio=0.02, seed=9, skus=105
    )
    valid = 2_000 - summary.malformed_sent
    with open_inventory_store(settings) as inv:
        inventory_runner(settings, inv).run(idle_exit_s=2.0)
    assert _lag(settings, "inventory", [ORDERS, COMMANDS]) == 0

    with open_tracker_store(settings) as store:
        # the tracker group reads order-events alone first: the worst case of a tracker
        # catching up on both topics, made deterministic
        early = TrackerService(
            store,
            orders_topic=settings.topic(ORDERS),
            events_topic=settings.topic(EVENTS),
            dlq_topic=settings.topic(DLQ),
        )
        BatchRunner(
            settings, group="tracker", topics=[settings.topic(EVENTS)], handler=early, name="t0"
        ).run(idle_exit_s=2.0)
        assert store.statuses() == {}
        assert store.pending_count() == early.stats.parked == valid

        runner = tracker_runner(settings, store)
        runner.run(idle_exit_s=2.0)
        assert store.pending_count() == 0
        counts = store.status_counts()
    assert _lag(settings, "tracker", [ORDERS, EVENTS]) == 0

    stats = runner.handler.stats  # type: ignore[attr-defined]
    assert stats.placed == stats.unparked == valid
    assert stats.malformed_orders == summary.malformed_sent and stats.dlq == 0
    assert counts["PLACED"] == 0 and sum(counts.values()) == valid
    report = verify(settings)
    assert report.ok, report.violations
    assert report.tracker_orders == report.valid_orders == valid


def test_reused_order_id_with_another_body_is_dead_lettered_once(settings: Settings) -> None:
    seed(settings, skus=3, stock=10)
    first = schema.OrderPlaced(
        order_id="ord-reused",
        customer_id="cust-1",
        items=(schema.OrderItem("SKU-00001", 2, 1.5),),
        currency="USD",
        total=3.0,
        created_at=schema.now(),
    )
    other = msgspec.structs.replace(
        first, customer_id="cust-2", items=(schema.OrderItem("SKU-00002", 1, 4.0),), total=4.0
    )
    redelivered = msgspec.structs.replace(first, created_at=first.created_at + 60)

    def run_both() -> None:
        with open_inventory_store(settings) as inv:
            inventory_runner(settings, inv).run(idle_exit_s=2.0)
        with open_tracker_store(settings) as store:
            tracker_runner(settings, store).run(idle_exit_s=2.0)

    producer = make_producer(settings)
    producer.produce(settings.topic(ORDERS), schema.encode(first), b"key-a")
    assert producer.flush(30) == 0
    run_both()
    # the same id again under other keys (other partitions): another body, and a copy of
    # the first one built anew
    producer.produce(settings.topic(ORDERS), schema.encode(other), b"key-b")
    producer.produce(settings.topic(ORDERS), schema.encode(redelivered), b"key-c")
    assert producer.flush(30) == 0
    run_both()

    dlq = list(read_topic(settings, settings.topic(DLQ)))
    assert [header(r.headers, ERROR_HEADER_PREFIX + "class") for r in dlq] == [b"DuplicateOrderId"]
    assert dlq[0].value == schema.encode(other)
    outcomes = [
        r.value for r in read_topic(settings, settings.topic(EVENTS)) if r.key == b"ord-reused"
    ]
    assert len(outcomes) == 2 and outcomes[0] == outcomes[1]  # the redelivery's re-emit
    with open_inventory_store(settings) as inv:
        assert {row.sku: row.reserved for row in inv.stock()} == {
            "SKU-00001": 2,
            "SKU-00002": 0,
            "SKU-00003": 0,
        }
    with open_tracker_store(settings) as store:
        view = store.get_order("ord-reused")
    assert view is not None and view.status == "RESERVED"
    assert (view.customer_id, [i.sku for i in view.items]) == ("cust-1", ["SKU-00001"])


# one order per end of the lifecycle, each with the facts its services emit around it
LIVES: dict[str, list[str]] = {
    "life-shipped": [
        "OrderReserved",
        "PaymentAuthorized",
        "OrderPaid",
        "ShipmentReady",
        "OrderShipped",
        "PaymentCaptured",
    ],
    "life-rejected": ["OrderRejected", "CancelRejected"],
    "life-payment-failed": [
        "OrderReserved",
        "PaymentDeclined",
        "OrderPaymentFailed",
        "StockReleased",
    ],
    # the authorization comes after the deadline: voided, the order stays EXPIRED
    "life-expired": [
        "OrderReserved",
        "ReservationExpired",
        "StockReleased",
        "PaymentAuthorized",
        "PaymentVoided",
    ],
    "life-cancelled-reserved": ["OrderReserved", "OrderCancelled", "StockReleased"],
    "life-cancelled-paid": [
        "OrderReserved",
        "PaymentAuthorized",
        "OrderPaid",
        "OrderCancelled",
        "StockReleased",
        "PaymentVoided",
    ],
}
ENDS = {
    "life-shipped": "SHIPPED",
    "life-rejected": "REJECTED",
    "life-payment-failed": "PAYMENT_FAILED",
    "life-expired": "EXPIRED",
    "life-cancelled-reserved": "CANCELLED",
    "life-cancelled-paid": "CANCELLED",
}


def test_whole_lives_and_each_end_over_the_broker(settings: Settings) -> None:
    """Every life the saga can give an order, as its services put it on the topics: each
    event twice (at-least-once), the events produced before their orders."""
    producer = make_producer(settings)
    events_topic, orders_topic = settings.topic(EVENTS), settings.topic(ORDERS)
    for order_id, names in LIVES.items():
        records = [event(name, 200.0 + 10 * i, order_id) for i, name in enumerate(names)]
        for record in records + records:
            producer.produce(events_topic, record.value, record.key)
    assert producer.flush(30) == 0
    for order_id in LIVES:
        producer.produce(orders_topic, schema.encode(order(order_id)), order_id.encode())
    assert producer.flush(30) == 0

    with open_tracker_store(settings) as store:
        runner = tracker_runner(settings, store)
        runner.run(idle_exit_s=2.0)
        assert store.pending_count() == 0
        views = {order_id: store.get_order(order_id) for order_id in LIVES}
    assert _lag(settings, "tracker", [ORDERS, EVENTS]) == 0
    stats = runner.handler.stats  # type: ignore[attr-defined]
    assert stats.dlq == 0 and stats.duplicates >= sum(map(len, LIVES.values()))

    for order_id, names in LIVES.items():
        view = views[order_id]
        assert view is not None, order_id
        assert view.status == ENDS[order_id] == lifecycle.timeline(names)[0], order_id
        assert view.terminal and view.ended_at is not None, order_id
        assert [h.event for h in view.history] == ["OrderPlaced", *names], order_id
        # whatever was read first, the moves are the declared ones, in the life's order
        moves = [(t.source, t.target, t.event) for t in view.transitions]
        assert all(lifecycle.transition(s, e) is not None for s, _t, e in moves), moves
        assert [e for _s, _t, e in moves] == [n for n in names if lifecycle.moves(n)]

    shipped = views["life-shipped"]
    assert shipped is not None
    assert (shipped.payment.captured, shipped.payment.net, shipped.shipment_id) == (
        15.0,
        15.0,
        "shp-1",
    )
    assert shipped.paid_at is not None and shipped.shipped_at == shipped.ended_at
    for order_id in ("life-expired", "life-cancelled-paid"):
        view = views[order_id]
        assert view is not None
        assert (view.payment.authorized, view.payment.voided, view.payment.net) == (
            15.0,
            15.0,
            0.0,
        ), order_id
    failed = views["life-payment-failed"]
    assert failed is not None and (failed.reason, failed.payment.authorized) == ("DECLINED", 0.0)

    # the CLI counts every status of the lifecycle, the ones nobody is in too
    out = CliRunner().invoke(
        cli_app, ["tracker", "counts", "--json", "--data-dir", str(settings.data_dir)]
    )
    assert out.exit_code == 0, out.output
    counts = json.loads(out.stdout)
    assert counts == {
        "statuses": dict.fromkeys(lifecycle.STATUSES, 0) | Counter(ENDS.values()),
        "pending_events": 0,
    }
