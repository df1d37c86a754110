"""TrackerService over each store backend (a real SQLite file, a real PostgreSQL
database), with hand-built records."""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ordermesh import lifecycle, schema
from ordermesh.errors import StoreError
from ordermesh.records import ERROR_HEADER_PREFIX, InRecord, header
from ordermesh.schema import (
    CancelRejected,
    ItemQty,
    OrderCancelled,
    OrderEvent,
    OrderItem,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    StockReleased,
)
from ordermesh.services.tracker import TrackerService
from ordermesh.stores.postgres_tracker import PostgresTrackerStore
from ordermesh.stores.sqlite_tracker import SqliteOrderQueries, SqliteTrackerStore
from ordermesh.stores.tracker import (
    HistoryEntry,
    HistoryRow,
    OrderItemView,
    OrderView,
    PaymentView,
    encode_cursor,
)
from tests.store_backends import BACKENDS, migrated_database
from tests.unit.test_tracker_lifecycle import event

Store = SqliteTrackerStore | PostgresTrackerStore
ORDERS = "orders"
EVENTS = "order-events"
DLQ = "orders-dlq"

_offsets = itertools.count()


def service_for(store: Store, now: float = 5000.0) -> TrackerService:
    return TrackerService(
        store, orders_topic=ORDERS, events_topic=EVENTS, dlq_topic=DLQ, clock=lambda: now
    )


def order(order_id: str, customer: str = "c-1", created_at: float = 100.0) -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id=customer,
        items=(OrderItem("A", 2, 2.5), OrderItem("B", 1, 10.0)),
        currency="EUR",
        total=15.0,
        created_at=created_at,
    )


def rec(topic: str, value: bytes | None, key: bytes | None = None) -> InRecord:
    return InRecord(topic, 2, next(_offsets), key, value, [], 1_700_000_000_000)


def placed(o: OrderPlaced) -> InRecord:
    return rec(ORDERS, schema.encode(o), o.order_id.encode())


def ev(event: OrderEvent) -> InRecord:
    return rec(EVENTS, schema.encode(event), event.order_id.encode())


def reserved(order_id: str, at: float = 200.0) -> InRecord:
    items = (ItemQty("A", 2), ItemQty("B", 1))
    return ev(OrderReserved(order_id, items, 15.0, "EUR", 100.0, at))


def rejected(order_id: str, at: float = 200.0) -> InRecord:
    return ev(OrderRejected(order_id, "OUT_OF_STOCK", "sku 'A': needed 2, available 0", 100.0, at))


def released(order_id: str, at: float = 300.0) -> InRecord:
    return ev(StockReleased(order_id, (ItemQty("A", 2), ItemQty("B", 1)), at))


def cancelled(order_id: str, at: float = 300.0, detail: str = "changed my mind") -> InRecord:
    return ev(OrderCancelled(order_id, at, detail))


def cancel_rejected(order_id: str, at: float = 300.0) -> InRecord:
    return ev(CancelRejected(order_id, "ORDER_REJECTED", "order is REJECTED", at))


def events_of(view: OrderView | None) -> list[str]:
    assert view is not None
    return [h.event for h in view.history]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store
    if request.param == "postgres":
        opened = PostgresTrackerStore(migrated_database(request))
    else:
        opened = SqliteTrackerStore(tmp_path / "tracker.db")
    with opened as s:
        yield s


@pytest.fixture
def service(store: Store) -> TrackerService:
    return service_for(store)


# --- status transitions -------------------------------------------------------------


def test_placed_order_is_tracked_with_items_and_history(
    store: Store, service: TrackerService
) -> None:
    out = service.handle([placed(order("o1"))])

    assert out == []
    assert store.get_order("o1") == OrderView(
        order_id="o1",
        customer_id="c-1",
        status="PLACED",
        terminal=False,
        items=[OrderItemView("A", 2, 2.5), OrderItemView("B", 1, 10.0)],
        total=15.0,
        currency="EUR",
        created_at=100.0,
        updated_at=100.0,
        decided_at=None,
        expires_at=None,
        paid_at=None,
        shipped_at=None,
        ended_at=None,
        reason=None,
        detail=None,
        payment=PaymentView(None, 0.0, 0.0, 0.0, 0.0, 0.0),
        shipment_id=None,
        transitions=[],
        history=[HistoryEntry("OrderPlaced", "PLACED", 100.0, "")],
    )
    assert store.get_order("nope") is None


def test_reserved_then_cancelled_uses_the_events_own_times(
    store: Store, service: TrackerService
) -> None:
    service.handle([placed(order("o1")), reserved("o1", at=200.0)])
    view = store.get_order("o1")
    assert view is not None and view.status == "RESERVED" and view.updated_at == 200.0

    service.handle([released("o1", at=300.0), cancelled("o1", at=300.5)])

    view = store.get_order("o1")
    assert view is not None
    assert view.status == "CANCELLED"
    assert view.updated_at == 300.5
    assert view.detail == "changed my mind"
    assert [(h.event, h.status, h.at) for h in view.history] == [
        ("OrderPlaced", "PLACED", 100.0),
        ("OrderReserved", "RESERVED", 200.0),
        ("StockReleased", None, 300.0),
        ("OrderCancelled", "CANCELLED", 300.5),
    ]
    assert view.history[2].detail == "released A x2, B x1"


def test_rejected_keeps_reason_and_detail(store: Store, service: TrackerService) -> None:
    service.handle([placed(order("o1")), rejected("o1")])

    view = store.get_order("o1")
    assert view is not None
    assert (view.status, view.reason) == ("REJECTED", "OUT_OF_STOCK")
    assert view.detail == "sku 'A': needed 2, available 0"
    assert view.history[-1] == HistoryEntry(
        "OrderRejected",
        "REJECTED",
        200.0,
        "OUT_OF_STOCK: sku 'A': needed 2, available 0",
        prior="PLACED",
    )


def test_cancel_rejected_is_history_only(store: Store, service: TrackerService) -> None:
    service.handle([placed(order("o1")), rejected("o1"), cancel_rejected("o1")])

    view = store.get_order("o1")
    assert view is not None
    assert view.status == "REJECTED"
    assert view.updated_at == 200.0  # a history-only event is not a transition
    assert view.history[-1].event == "CancelRejected" and view.history[-1].status is None


def test_store_columns_hold_decided_cancelled_and_version(
    tmp_path: Path, store: Store, service: TrackerService
) -> None:
    service.handle([placed(order("o1")), reserved("o1", at=200.0)])
    service.handle([released("o1", at=300.0), cancelled("o1", at=301.0)])

    (row,) = store.load_orders(["o1"]).values()
    assert (row.decided_at, row.cancelled_at, row.placed_at, row.seq) == (200.0, 301.0, 5000.0, 4)


def test_placed_has_no_history_row_yet_is_read_once(store: Store, service: TrackerService) -> None:
    service.handle([placed(order("o1")), placed(order("o2"))])
    service.handle([reserved("o1", at=200.0)])

    # the OrderPlaced entry is the order row itself: only the inventory's events are rows
    assert store.load_history_keys(["o1", "o2"]) == {("o1", "OrderReserved")}
    assert events_of(store.get_order("o2")) == ["OrderPlaced"]
    # a database written before kept a row for it: read once, not twice
    with store.transaction():
        store.insert_history([HistoryRow("o1", "OrderPlaced", "PLACED", 100.0, "", None)])
    view = store.get_order("o1")
    assert events_of(view) == ["OrderPlaced", "OrderReserved"]
    assert view is not None and view.history[0] == HistoryEntry("OrderPlaced", "PLACED", 100.0, "")


def test_a_whole_life_is_stored_and_read_back(store: Store, service: TrackerService) -> None:
    life = ["OrderReserved", "PaymentAuthorized", "OrderPaid", "ShipmentReady", "OrderShipped"]
    service.handle([placed(order("o1")), *(event(n, 200.0 + 100 * i) for i, n in enumerate(life))])
    service.handle([event("PaymentCaptured", 800.0), event("PaymentRefunded", 900.0)])

    view = store.get_order("o1")
    assert view is not None and view.status == "SHIPPED"
    assert (view.decided_at, view.expires_at, view.paid_at, view.shipped_at, view.ended_at) == (
        200.0,
        260.0,
        400.0,
        600.0,
        600.0,
    )
    assert view.payment == PaymentView("auth-1", 15.0, 15.0, 0.0, 15.0, 0.0)
    assert view.shipment_id == "shp-1"
    assert [(t.source, t.target) for t in view.transitions] == [
        ("PLACED", "RESERVED"),
        ("RESERVED", "PAID"),
        ("PAID", "SHIPPED"),
    ]
    (listed,) = store.list_orders(status="SHIPPED").orders
    assert listed.payment == view.payment and listed.history == [] and listed.transitions == []
    (row,) = store.load_orders(["o1"]).values()
    assert row.seq == 1 + len(life) + 2


# --- idempotency and order ------------------------------------------------------------


def test_redelivered_batch_changes_nothing(store: Store) -> None:
    batch = [placed(order("o1")), reserved("o1"), placed(order("o2")), rejected("o2")]
    service_for(store, now=5000.0).handle(batch)
    before = (store.get_order("o1"), store.get_order("o2"), store.statuses())

    again = service_for(store, now=9000.0)
    assert again.handle(batch) == []

    assert (store.get_order("o1"), store.get_order("o2"), store.statuses()) == before
    assert again.stats.duplicates == 4
    assert again.stats.transitions == 0 and again.stats.placed == 0


def test_duplicates_inside_one_batch_count_once(store: Store, service: TrackerService) -> None:
    o = order("o1")
    service.handle([placed(o), placed(o), reserved("o1"), reserved("o1", at=250.0)])

    assert events_of(store.get_order("o1")) == ["OrderPlaced", "OrderReserved"]
    assert service.stats.duplicates == 2


def test_reused_order_id_with_another_body_keeps_the_tracked_order(
    store: Store, service: TrackerService
) -> None:
    first = order("o1")
    service.handle([placed(first)])
    before = store.get_order("o1")
    assert before is not None

    other = msgspec.structs.replace(
        first, customer_id="c-2", items=(OrderItem("Z", 9, 1.0),), total=9.0
    )
    conflicting = service_for(store)
    assert conflicting.handle([placed(other), placed(other)]) == []  # no second DLQ copy
    assert (conflicting.stats.conflicts, conflicting.stats.duplicates) == (2, 0)

    assert store.get_order("o1") == before
    # the same body again, items reordered and created anew, is a plain redelivery
    same = msgspec.structs.replace(first, items=first.items[::-1], created_at=999.0)
    again = service_for(store)
    again.handle([placed(same)])
    assert (again.stats.duplicates, again.stats.conflicts) == (1, 0)

    within = service_for(store)
    within.handle([placed(order("o2")), placed(msgspec.structs.replace(other, order_id="o2"))])
    view = store.get_order("o2")
    assert view is not None and [i.sku for i in view.items] == ["A", "B"]
    assert (within.stats.placed, within.stats.conflicts, within.stats.dlq) == (1, 1, 0)


def test_a_database_without_body_hash_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with SqliteTrackerStore(path) as s:
        service_for(s).handle([placed(order("old"))])
    with sqlite3.connect(path) as conn:  # as a release before body_hash left it
        conn.execute("ALTER TABLE orders DROP COLUMN body_hash")
        conn.execute("PRAGMA user_version = 1")
    reader = SqliteOrderQueries(path)  # a reader never upgrades: refused until upgraded
    with pytest.raises(StoreError, match="schema version 1 is older"):
        reader.statuses()
    with SqliteTrackerStore(path) as s:
        service = service_for(s)
        other = msgspec.structs.replace(order("old"), customer_id="c-9")
        # no fingerprint recorded: any copy of a legacy order is a redelivery, as before
        service.handle([placed(other), placed(order("new"))])
        assert service.stats.duplicates == 1
    with SqliteTrackerStore(path) as s:  # reopening finds the column in place
        service = service_for(s)
        service.handle([placed(msgspec.structs.replace(order("new"), customer_id="c-9"))])
        assert service.stats.conflicts == 1
    assert reader.statuses() == {"old": "PLACED", "new": "PLACED"}
    view = reader.get_order("old")
    assert view is not None and view.customer_id == "c-1"
    reader.close()


def test_status_never_moves_backwards(store: Store, service: TrackerService) -> None:
    service.handle([placed(order("o1")), reserved("o1"), released("o1"), cancelled("o1")])
    # a changed copy of the order, a late decision: the cancelled order stays cancelled
    service.handle([placed(order("o1", customer="other")), reserved("o1", at=900.0)])
    view = store.get_order("o1")
    assert view is not None and view.status == "CANCELLED" and view.customer_id == "c-1"

    # a conflicting decision is kept in history but does not change the status
    service.handle([placed(order("o2")), reserved("o2"), rejected("o2", at=250.0)])
    view = store.get_order("o2")
    assert view is not None
    assert view.status == "RESERVED" and view.reason is None
    assert events_of(view) == ["OrderPlaced", "OrderReserved", "OrderRejected"]


def test_events_before_their_order_are_applied_when_it_arrives(
    store: Store, service: TrackerService
) -> None:
    # read out of order, with a duplicate: cancellation first, decision last
    out = service.handle([cancelled("o1"), released("o1"), cancelled("o1"), reserved("o1")])
    assert out == []
    assert store.get_order("o1") is None
    assert store.pending_count() == 3
    assert service.stats.parked == 3

    service.handle([placed(order("o1"))])

    view = store.get_order("o1")
    assert view is not None
    assert view.status == "CANCELLED"
    assert view.updated_at == 300.0
    assert events_of(view) == ["OrderPlaced", "OrderReserved", "StockReleased", "OrderCancelled"]
    assert store.pending_count() == 0
    # redelivery of the early events after the order exists: nothing changes
    service.handle([reserved("o1"), cancelled("o1")])
    assert store.get_order("o1") == view
    assert store.pending_count() == 0


def test_event_before_its_order_in_the_same_batch(store: Store, service: TrackerService) -> None:
    service.handle([rejected("o1"), placed(order("o1")), reserved("o2")])

    view = store.get_order("o1")
    assert view is not None and view.status == "REJECTED"
    assert store.pending_count() == 1  # o2's event waits for its order
    service.handle([placed(order("o2"))])
    assert store.statuses() == {"o1": "REJECTED", "o2": "RESERVED"}
    assert store.pending_count() == 0


# --- bad input ----------------------------------------------------------------------


def test_malformed_order_is_skipped_and_not_dead_lettered(
    store: Store, service: TrackerService
) -> None:
    bad_total = schema.encode(order("o1")).replace(b'"total":15.0', b'"total":16.0')
    out = service.handle([rec(ORDERS, b"{not json"), rec(ORDERS, bad_total), rec(ORDERS, None)])

    assert out == []  # the inventory service owns the DLQ copy of orders records
    assert service.stats.malformed_orders == 3
    assert store.statuses() == {}


def test_malformed_event_is_dead_lettered(store: Store, service: TrackerService) -> None:
    bad = rec(EVENTS, b'{"type":"OrderShipped","order_id":"o1"}', b"o1")
    out = service.handle([placed(order("o1")), bad, reserved("o1")])

    (dlq,) = out
    assert (dlq.topic, dlq.key, dlq.value) == (DLQ, b"o1", bad.value)
    assert header(dlq.headers, ERROR_HEADER_PREFIX + "service") == b"tracker"
    assert header(dlq.headers, ERROR_HEADER_PREFIX + "stage") == b"decode"
    assert header(dlq.headers, ERROR_HEADER_PREFIX + "topic") == EVENTS.encode()
    assert header(dlq.headers, ERROR_HEADER_PREFIX + "offset") == str(bad.offset).encode()
    assert (header(dlq.headers, ERROR_HEADER_PREFIX + "class") or b"").startswith(b"DecodeError")
    assert store.statuses() == {"o1": "RESERVED"}  # the rest of the batch went on


def test_record_of_an_unexpected_topic_is_dead_lettered(service: TrackerService) -> None:
    (dlq,) = service.handle([rec("elsewhere", b"x")])
    assert header(dlq.headers, ERROR_HEADER_PREFIX + "stage") == b"route"


def test_store_failure_commits_nothing(
    store: Store, service: TrackerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(store, "insert_history", broken)
    with pytest.raises(StoreError):
        service.handle([placed(order("o1")), reserved("o2")])
    monkeypatch.undo()

    assert store.statuses() == {} and store.pending_count() == 0
    service.handle([placed(order("o1")), reserved("o1")])
    assert store.statuses() == {"o1": "RESERVED"}


# --- queries ------------------------------------------------------------------------


@pytest.fixture
def many(store: Store, service: TrackerService) -> SqliteTrackerStore:
    batch: list[InRecord] = []
    for i in range(25):
        oid = f"o{i:02d}"
        batch.append(placed(order(oid, customer=f"c-{i % 3}")))
        if i % 5 == 1:
            batch.append(rejected(oid))
        elif i % 5 != 0:
            batch.append(reserved(oid))
    service.handle(batch)
    return store


def test_pagination_walks_every_order_once(many: SqliteTrackerStore) -> None:
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = many.list_orders(limit=10, cursor=cursor)
        pages += 1
        assert all(view.history == [] for view in page.orders)
        seen += [view.order_id for view in page.orders]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 3
    assert seen == [f"o{i:02d}" for i in range(25)]
    # an exact multiple of the limit has no empty last page
    assert many.list_orders(limit=25).next_cursor is None


def test_filters_combine_with_the_cursor(many: SqliteTrackerStore) -> None:
    page = many.list_orders(status="REJECTED", limit=2)
    assert [v.order_id for v in page.orders] == ["o01", "o06"]
    rest = many.list_orders(status="REJECTED", limit=50, cursor=page.next_cursor)
    assert [v.order_id for v in rest.orders] == ["o11", "o16", "o21"]
    assert rest.next_cursor is None

    mine = many.list_orders(customer_id="c-1", status="RESERVED")
    assert [v.order_id for v in mine.orders] == ["o04", "o07", "o13", "o19", "o22"]
    assert all(v.customer_id == "c-1" and v.status == "RESERVED" for v in mine.orders)
    assert many.list_orders(customer_id="nobody").orders == []


def test_limit_is_clamped_and_bad_input_is_a_value_error(many: SqliteTrackerStore) -> None:
    assert len(many.list_orders(limit=0).orders) == 1
    assert len(many.list_orders(limit=-5).orders) == 1
    assert len(many.list_orders(limit=10_000).orders) == 25
    for bad in ("", "!!!", "bm9wZQ==x", "_w", encode_cursor("o05") + "A"):
        with pytest.raises(ValueError):
            many.list_orders(cursor=bad)
    with pytest.raises(ValueError):
        many.list_orders(status="GONE")  # type: ignore[arg-type]
    # a cursor for an order that does not exist still means "after it"
    page = many.list_orders(cursor=encode_cursor("o20a"))
    assert [v.order_id for v in page.orders] == ["o21", "o22", "o23", "o24"]


def test_counts_and_statuses(many: SqliteTrackerStore) -> None:
    # every status of the lifecycle, zeros included
    assert many.status_counts() == dict.fromkeys(lifecycle.STATUSES, 0) | {
        "PLACED": 5,
        "RESERVED": 15,
        "REJECTED": 5,
    }
    statuses = many.statuses()
    assert len(statuses) == 25 and statuses["o00"] == "PLACED" and statuses["o01"] == "REJECTED"


def test_readonly_store_reads_but_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tracker.db"
    reader = SqliteOrderQueries(path)  # before the tracker created the file
    with pytest.raises(StoreError):
        reader.ping()
    assert not path.exists()

    with SqliteTrackerStore(path) as writer:
        service_for(writer).handle([placed(order("o1")), reserved("o1")])
        reader.ping()  # connects now that the file exists
        assert reader.statuses() == {"o1": "RESERVED"}
        service_for(writer).handle([released("o1"), cancelled("o1")])
        view = reader.get_order("o1")
        assert view is not None and view.status == "CANCELLED"  # sees later commits
        assert not hasattr(reader, "transaction")  # OrderQueries never write
        with pytest.raises(StoreError, match="read-only"), reader._db.transaction():
            pass
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader._db.connection().execute("DELETE FROM orders")
    reader.close()


def test_writes_outside_a_transaction_are_refused(store: Store) -> None:
    with pytest.raises(StoreError):
        store.delete_pending(["o1"])


# --- any order of arrival ends in the same state ---------------------------------------

FLOW = ("placed", "reserved", "released", "cancelled")


@given(
    arrival=st.permutations(FLOW + FLOW),
    cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=4),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_arrival_order_and_batching_ends_cancelled(arrival: list[str], cuts: list[int]) -> None:
    makers = {
        "placed": lambda: placed(order("o1")),
        "reserved": lambda: reserved("o1"),
        "released": lambda: released("o1"),
        "cancelled": lambda: cancelled("o1"),
    }
    records = [makers[name]() for name in arrival]
    bounds = [0, *sorted(set(cuts)), len(records)]
    with tempfile.TemporaryDirectory() as tmp, SqliteTrackerStore(Path(tmp) / "t.db") as store:
        service = service_for(store)
        for start, end in itertools.pairwise(bounds):
            service.handle(records[start:end])
        view = store.get_order("o1")
        assert view is not None
        assert view.status == "CANCELLED"
        assert view.updated_at == 300.0
        assert events_of(view) == [
            "OrderPlaced",
            "OrderReserved",
            "StockReleased",
            "OrderCancelled",
        ]
        assert store.pending_count() == 0
