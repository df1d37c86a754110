"""The tracker follows ``lifecycle``: every declared transition, every fact, and any
arrival order or redelivery of a valid life; and old tracker databases keep working."""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ordermesh import lifecycle, schema
from ordermesh.config import Settings
from ordermesh.errors import StoreError
from ordermesh.lifecycle import FACTS, TRANSITIONS, Status
from ordermesh.records import InRecord
from ordermesh.schema import ItemQty, OrderItem, OrderPlaced
from ordermesh.services.tracker import _RULES, TrackerService
from ordermesh.stores import postgres_tracker, sqlite_tracker
from ordermesh.stores.factory import migrate
from ordermesh.stores.postgres import PostgresDatabase
from ordermesh.stores.postgres_tracker import PostgresTrackerStore
from ordermesh.stores.sqlite_tracker import SqliteOrderQueries, SqliteTrackerStore
from ordermesh.stores.tracker import EVENT_RANK, OrderView, TransitionEntry
from tests.unit.test_stores import at_version, version_of

ORDERS, EVENTS, DLQ = "orders", "order-events", "orders-dlq"
AUTH = "auth-1"
SHIPMENT = "shp-1"
_offsets = itertools.count()


def service_for(store: SqliteTrackerStore | PostgresTrackerStore) -> TrackerService:
    return TrackerService(
        store, orders_topic=ORDERS, events_topic=EVENTS, dlq_topic=DLQ, clock=lambda: 5000.0
    )


def order(order_id: str = "o1") -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id="c-1",
        items=(OrderItem("A", 2, 2.5), OrderItem("B", 1, 10.0)),
        currency="EUR",
        total=15.0,
        created_at=100.0,
    )


def rec(topic: str, value: bytes, key: str) -> InRecord:
    return InRecord(topic, 0, next(_offsets), key.encode(), value, [], 0)


def placed(order_id: str = "o1") -> InRecord:
    return rec(ORDERS, schema.encode(order(order_id)), order_id)


ITEMS = (ItemQty("A", 2), ItemQty("B", 1))


def event(name: str, at: float, order_id: str = "o1", cause: str = "CANCELLED") -> InRecord:
    """A realistic ``name`` event of the order, at ``at``."""
    makers: dict[str, Callable[[], schema.OrderEvent]] = {
        "OrderReserved": lambda: schema.OrderReserved(
            order_id, ITEMS, 15.0, "EUR", 100.0, at, expires_at=at + 60, customer_id="c-1"
        ),
        "OrderRejected": lambda: schema.OrderRejected(
            order_id, "OUT_OF_STOCK", "sku 'A': needed 2, available 0", 100.0, at
        ),
        "OrderPaid": lambda: schema.OrderPaid(order_id, AUTH, 15.0, at),
        "OrderPaymentFailed": lambda: schema.OrderPaymentFailed(
            order_id, "DECLINED", "insufficient funds", at
        ),
        "ReservationExpired": lambda: schema.ReservationExpired(order_id, at - 1, at),
        "OrderShipped": lambda: schema.OrderShipped(order_id, SHIPMENT, at),
        "OrderCancelled": lambda: schema.OrderCancelled(order_id, at, "changed my mind", "PAID"),
        "StockReleased": lambda: schema.StockReleased(order_id, ITEMS, at, cause),  # type: ignore[arg-type]
        "CancelRejected": lambda: schema.CancelRejected(
            order_id, "ALREADY_SHIPPED", "order is SHIPPED", at
        ),
        "PaymentAuthorized": lambda: schema.PaymentAuthorized(order_id, AUTH, 15.0, "EUR", at),
        "PaymentDeclined": lambda: schema.PaymentDeclined(
            order_id, "DECLINED", "insufficient funds", at
        ),
        "PaymentCaptured": lambda: schema.PaymentCaptured(order_id, AUTH, 15.0, at),
        "PaymentVoided": lambda: schema.PaymentVoided(order_id, AUTH, 15.0, cause, at),  # type: ignore[arg-type]
        "PaymentRefunded": lambda: schema.PaymentRefunded(order_id, AUTH, 15.0, cause, at),  # type: ignore[arg-type]
        "ShipmentReady": lambda: schema.ShipmentReady(order_id, SHIPMENT, at),
    }
    return rec(EVENTS, schema.encode(makers[name]()), order_id)


def path_to(status: Status) -> list[str]:
    """The event types of the shortest declared path from PLACED to ``status``."""
    paths: dict[Status, list[str]] = {"PLACED": []}
    queue: deque[Status] = deque(["PLACED"])
    while queue:
        source = queue.popleft()
        for t in TRANSITIONS:
            if t.source == source and t.target not in paths:
                paths[t.target] = [*paths[source], t.event]
                queue.append(t.target)
    return paths[status]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteTrackerStore]:
    with SqliteTrackerStore(tmp_path / "tracker.db") as opened:
        yield opened


def view_of(store: SqliteTrackerStore | PostgresTrackerStore, order_id: str = "o1") -> OrderView:
    view = store.get_order(order_id)
    assert view is not None
    return view


# --- the declaration is the tracker's ------------------------------------------------


def test_the_tracker_knows_every_lifecycle_event_and_moves_as_it_says() -> None:
    rules = {rule.name: rule for rule in _RULES.values()}
    assert set(rules) == lifecycle.EVENTS
    assert {name: rule.target for name, rule in rules.items() if rule.target} == lifecycle.TARGET
    assert {name for name, rule in rules.items() if rule.target is None} == lifecycle.FACT_EVENTS
    assert set(EVENT_RANK) == lifecycle.EVENTS | {"OrderPlaced"}
    # parked events are applied by EVENT_RANK: each declared step after the one before
    for t in TRANSITIONS:
        for before in path_to(t.source):
            assert EVENT_RANK[before] < EVENT_RANK[t.event], (before, t)


@pytest.mark.parametrize("step", TRANSITIONS, ids=lambda t: f"{t.source}-{t.event}")
def test_every_declared_transition(store: SqliteTrackerStore, step: lifecycle.Transition) -> None:
    service = service_for(store)
    before = path_to(step.source)
    service.handle([placed(), *(event(name, 200.0 + 100 * i) for i, name in enumerate(before))])
    assert view_of(store).status == step.source
    at = 200.0 + 100 * len(before)

    service.handle([event(step.event, at)])

    view = view_of(store)
    assert view.status == step.target
    assert view.terminal == lifecycle.is_terminal(step.target)
    assert view.updated_at == at
    assert view.transitions[-1] == TransitionEntry(
        step.source, step.target, step.event, at, view.history[-1].detail
    )
    assert [t.event for t in view.transitions] == [*before, step.event]
    assert view.ended_at == (at if lifecycle.is_terminal(step.target) else None)
    assert service.stats.undeclared == 0 and service.stats.stale == 0
    # the same event again, and every earlier one: nothing moves
    service.handle([event(step.event, at + 5), *(event(name, 150.0) for name in before)])
    assert view_of(store) == view


def test_each_end_carries_its_cause(store: SqliteTrackerStore) -> None:
    service = service_for(store)
    ends = {
        "o-rej": ["OrderRejected"],
        "o-pf": ["OrderReserved", "OrderPaymentFailed"],
        "o-exp": ["OrderReserved", "ReservationExpired"],
        "o-can": ["OrderReserved", "OrderPaid", "OrderCancelled"],
    }
    service.handle(
        [placed(oid) for oid in ends]
        + [
            event(name, 200.0 + 100 * i, oid)
            for oid, names in ends.items()
            for i, name in enumerate(names)
        ]
    )
    causes = {
        oid: (view_of(store, oid).status, view_of(store, oid).reason, view_of(store, oid).detail)
        for oid in ends
    }
    assert causes == {
        "o-rej": ("REJECTED", "OUT_OF_STOCK", "sku 'A': needed 2, available 0"),
        "o-pf": ("PAYMENT_FAILED", "DECLINED", "insufficient funds"),
        "o-exp": ("EXPIRED", None, "not paid by its deadline (299.000)"),
        "o-can": ("CANCELLED", None, "changed my mind"),
    }
    cancelled = view_of(store, "o-can")
    assert cancelled.ended_at == cancelled.updated_at == 400.0
    assert cancelled.history[-1].detail == "changed my mind (from PAID)"


# expected effect of each fact on the order, from a PAID order whose facts are unknown
FACT_COLUMNS: dict[str, dict[str, Any]] = {
    "StockReleased": {},
    "CancelRejected": {},
    "PaymentAuthorized": {},  # OrderPaid set the authorization already
    "PaymentDeclined": {},
    "PaymentCaptured": {"captured": 15.0, "net": 15.0},
    "PaymentVoided": {"voided": 15.0},
    "PaymentRefunded": {"refunded": 15.0, "net": -15.0},
    "ShipmentReady": {"shipment_id": SHIPMENT},
}


@pytest.mark.parametrize("fact", [f.event for f in FACTS])
def test_every_fact_is_history_only(store: SqliteTrackerStore, fact: str) -> None:
    service = service_for(store)
    service.handle([placed(), event("OrderReserved", 200.0), event("OrderPaid", 300.0)])
    before = view_of(store)

    service.handle([event(fact, 400.0), event(fact, 401.0)])  # and its redelivery

    view = view_of(store)
    assert (view.status, view.updated_at, view.transitions) == (
        "PAID",
        300.0,
        before.transitions,
    )
    entry = view.history[-1]
    assert (entry.event, entry.status, entry.prior, entry.at) == (fact, None, None, 400.0)
    assert service.stats.history_only == 1 and service.stats.duplicates == 1
    payment = dataclasses.asdict(view.payment) | {"shipment_id": view.shipment_id}
    expected = dataclasses.asdict(before.payment) | {"shipment_id": before.shipment_id}
    assert payment == expected | FACT_COLUMNS[fact]


def test_a_full_life_fills_every_column(store: SqliteTrackerStore) -> None:
    life = [
        "OrderReserved",
        "PaymentAuthorized",
        "OrderPaid",
        "ShipmentReady",
        "OrderShipped",
        "PaymentCaptured",
    ]
    service_for(store).handle([placed(), *(event(n, 200.0 + 100 * i) for i, n in enumerate(life))])
    view = view_of(store)
    assert view.status == "SHIPPED" and view.terminal
    assert (view.decided_at, view.expires_at, view.paid_at, view.shipped_at, view.ended_at) == (
        200.0,
        260.0,
        400.0,
        600.0,
        600.0,
    )
    assert dataclasses.asdict(view.payment) == {
        "authorization_id": AUTH,
        "authorized": 15.0,
        "captured": 15.0,
        "voided": 0.0,
        "refunded": 0.0,
        "net": 15.0,
    }
    assert view.shipment_id == SHIPMENT
    assert [(t.source, t.target) for t in view.transitions] == [
        ("PLACED", "RESERVED"),
        ("RESERVED", "PAID"),
        ("PAID", "SHIPPED"),
    ]
    assert [h.event for h in view.history] == ["OrderPlaced", *life]


def test_a_late_authorization_does_not_revive_an_expired_order(store: SqliteTrackerStore) -> None:
    service_for(store).handle(
        [
            placed(),
            event("OrderReserved", 200.0),
            event("ReservationExpired", 300.0),
            event("StockReleased", 300.0, cause="EXPIRED"),
            event("PaymentAuthorized", 310.0),  # late success
            event("PaymentVoided", 320.0, cause="EXPIRED"),
        ]
    )
    view = view_of(store)
    assert view.status == "EXPIRED" and view.ended_at == 300.0
    assert (view.payment.authorized, view.payment.voided, view.payment.net) == (15.0, 15.0, 0.0)
    assert view.history[-1].detail == "authorization auth-1: voided 15.00 (EXPIRED)"


def test_a_contradicting_event_keeps_the_status(store: SqliteTrackerStore) -> None:
    service = service_for(store)
    service.handle([placed(), event("OrderReserved", 200.0), event("OrderPaid", 300.0)])
    service.handle([event("OrderShipped", 400.0), event("OrderCancelled", 500.0)])
    view = view_of(store)
    assert view.status == "SHIPPED" and view.detail is None
    assert view.history[-1].event == "OrderCancelled" and view.history[-1].prior is None
    assert service.stats.stale == 1


def test_an_event_read_before_its_step_catches_up(store: SqliteTrackerStore) -> None:
    service = service_for(store)
    service.handle([placed(), event("OrderPaid", 300.0), event("OrderReserved", 200.0)])
    view = view_of(store)
    # the order is PAID; the move skipped RESERVED, and the tracker says so
    assert view.status == "PAID" and view.decided_at == 200.0 and view.expires_at == 260.0
    assert [(t.source, t.target) for t in view.transitions] == [("PLACED", "PAID")]
    assert (service.stats.undeclared, service.stats.stale) == (1, 1)


# --- any arrival of a valid life ends where the life does ------------------------------


@st.composite
def lives(draw: st.DrawFn) -> list[str]:
    """The events of one valid life (a walk over TRANSITIONS, maybe stopped early), with
    the facts its owners emit around each step."""
    status: Status = "PLACED"
    names: list[str] = []
    while not lifecycle.is_terminal(status):
        steps = [t for t in TRANSITIONS if t.source == status]
        if status != "PLACED" and draw(st.booleans()):
            break  # a life still under way
        step = draw(st.sampled_from(steps))
        before = {"OrderPaid": ["PaymentAuthorized"], "OrderPaymentFailed": ["PaymentDeclined"]}
        before["OrderShipped"] = ["ShipmentReady"]
        after = {
            "OrderShipped": ["PaymentCaptured"],
            "OrderPaymentFailed": ["StockReleased"],
            "ReservationExpired": ["StockReleased"],
            "OrderCancelled": ["StockReleased"] + (["PaymentVoided"] if status == "PAID" else []),
            "OrderRejected": ["CancelRejected"],
        }
        names += [*before.get(step.event, []), step.event, *after.get(step.event, [])]
        status = step.target
    return names


@given(
    life=lives(),
    data=st.data(),
)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_interleaving_and_duplication_ends_as_the_life_does(
    life: list[str], data: st.DataObject
) -> None:
    in_order = [placed(), *(event(name, 200.0 + 10 * i) for i, name in enumerate(life))]
    copies = data.draw(st.lists(st.sampled_from(in_order), max_size=4), label="redelivered")
    arrival = data.draw(st.permutations(in_order + copies), label="arrival")
    cuts = data.draw(st.lists(st.integers(1, max(1, len(arrival) - 1)), max_size=3), label="cuts")
    bounds = [0, *sorted(set(cuts)), len(arrival)]
    expected_status, undeclared = lifecycle.timeline(life)
    assert undeclared == []

    with tempfile.TemporaryDirectory() as tmp:
        with SqliteTrackerStore(Path(tmp) / "in-order.db") as reference:
            service_for(reference).handle(in_order)
            expected = view_of(reference)
        with SqliteTrackerStore(Path(tmp) / "t.db") as store:
            service = service_for(store)
            for start, end in itertools.pairwise(bounds):
                service.handle(arrival[start:end])
            view = view_of(store)
            assert store.pending_count() == 0

    assert expected.status == expected_status
    assert view.status == expected_status

    # every column of the life too; only which event made a move may differ (an event
    # read before its step makes the move itself, and the skipped one is stale)
    def strip(v: OrderView) -> OrderView:
        history = [dataclasses.replace(h, prior=None) for h in v.history]
        return dataclasses.replace(v, transitions=[], history=history)

    assert strip(view) == strip(expected)
    # the last step always makes its move itself
    last = [(t.event, t.target, t.at) for t in view.transitions[-1:]]
    assert last == [(t.event, t.target, t.at) for t in expected.transitions[-1:]]


# --- existing databases keep working -----------------------------------------------------


def test_a_version_2_sqlite_database_is_upgraded_with_its_orders(tmp_path: Path) -> None:
    path = tmp_path / "tracker.db"
    at_version(path, sqlite_tracker.MIGRATIONS, 2)
    with sqlite3.connect(path) as conn:
        columns = "order_id, customer_id, status, items, total, currency, created_at,"
        columns += " placed_at, decided_at, cancelled_at, reason, detail, updated_at, seq"
        for oid, status, cancelled in (
            ("o-res", "RESERVED", None),
            ("o-can", "CANCELLED", 300.0),
            ("o-rej", "REJECTED", None),
        ):
            conn.execute(
                f"INSERT INTO orders ({columns}) VALUES (?, 'c-1', ?, '[[\"A\",2,2.5]]', 5.0,"
                " 'EUR', 100.0, 100.0, 200.0, ?, NULL, NULL, 200.0, 2)",
                (oid, status, cancelled),
            )
        conn.executemany(
            "INSERT INTO history (order_id, event, status, at, detail) VALUES (?, ?, ?, ?, '')",
            [
                ("o-res", "OrderReserved", "RESERVED", 200.0),
                ("o-can", "OrderReserved", "RESERVED", 200.0),
                ("o-can", "StockReleased", None, 300.0),
                ("o-can", "OrderCancelled", "CANCELLED", 300.0),
                ("o-rej", "OrderRejected", "REJECTED", 200.0),
            ],
        )
    reader = SqliteOrderQueries(path)
    with pytest.raises(StoreError, match="schema version 2 is older"):
        reader.statuses()

    with SqliteTrackerStore(path) as store:
        assert version_of(path) == len(sqlite_tracker.MIGRATIONS) == 4
        assert store.statuses() == {"o-res": "RESERVED", "o-can": "CANCELLED", "o-rej": "REJECTED"}
        upgraded = view_of(store, "o-can")
        assert [(t.source, t.target) for t in upgraded.transitions] == [
            ("PLACED", "RESERVED"),
            ("RESERVED", "CANCELLED"),
        ]
        assert upgraded.ended_at == 300.0 and view_of(store, "o-rej").ended_at == 200.0
        # the old reserved order lives on through the new statuses
        service_for(store).handle(
            [event("OrderPaid", 400.0, "o-res"), event("OrderShipped", 500.0, "o-res")]
        )
        shipped = view_of(store, "o-res")
        assert (shipped.status, shipped.payment.authorized, shipped.shipment_id) == (
            "SHIPPED",
            15.0,
            SHIPMENT,
        )
    assert reader.status_counts()["SHIPPED"] == 1
    reader.close()
    with SqliteTrackerStore(path):  # reopening changes nothing
        assert version_of(path) == 4


def test_a_version_1_postgres_schema_is_upgraded_with_its_orders(postgres_database: str) -> None:
    url = postgres_database
    old = PostgresDatabase(
        url, name="tracker", migrations=postgres_tracker.MIGRATIONS[:1], lazy=True
    )
    old.migrate()
    old.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tracker.orders (order_id, customer_id, status, items, total, currency,"
            " created_at, placed_at, decided_at, updated_at, seq) VALUES"
            " ('o-res', 'c-1', 'RESERVED', '[]', 5.0, 'EUR', 100.0, 100.0, 200.0, 200.0, 2)"
        )
        conn.execute(
            "INSERT INTO tracker.history (order_id, event, status, at, detail)"
            " VALUES ('o-res', 'OrderReserved', 'RESERVED', 200.0, '')"
        )
    assert "tracker: schema version 2: the whole life" in " ".join(
        migrate(Settings(database_url=url))
    )
    with PostgresTrackerStore(url) as store:
        assert [(t.source, t.target) for t in view_of(store, "o-res").transitions] == [
            ("PLACED", "RESERVED")
        ]
        service_for(store).handle([event("OrderPaid", 400.0, "o-res")])
        view = view_of(store, "o-res")
        assert (view.status, view.paid_at, view.payment.authorization_id) == ("PAID", 400.0, AUTH)
        assert store.status_counts() == dict.fromkeys(lifecycle.STATUSES, 0) | {"PAID": 1}
