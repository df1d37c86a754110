"""InventoryService over each store backend (a real SQLite file, a real PostgreSQL
database), with hand-built records."""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ordermesh import schema
from ordermesh.errors import StoreError
from ordermesh.records import ERROR_HEADER_PREFIX, InRecord, OutRecord, header
from ordermesh.schema import (
    CancelOrder,
    ItemQty,
    OrderCancelled,
    OrderItem,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    StockReleased,
)
from ordermesh.services.inventory import DUPLICATE_ORDER_ID, InventoryService, _still_holds
from ordermesh.stores.inventory import MAX_STOCK, KnownOrder, StockRow
from ordermesh.stores.postgres_inventory import PostgresInventoryStore
from ordermesh.stores.sqlite_inventory import SqliteInventoryStore
from tests.store_backends import BACKENDS, migrated_database

ORDERS = "orders"
COMMANDS = "order-commands"
EVENTS = "order-events"
DLQ = "orders-dlq"
Store = SqliteInventoryStore | PostgresInventoryStore
ERROR_FIELDS = ("topic", "partition", "offset", "timestamp", "service", "stage", "class", "message")

_offsets = itertools.count()


TTL = 900.0


def service_for(store: Store, now: float = 1000.0) -> InventoryService:
    return InventoryService(
        store,
        orders_topic=ORDERS,
        commands_topic=COMMANDS,
        events_topic=EVENTS,
        dlq_topic=DLQ,
        clock=lambda: now,
        reservation_ttl_s=TTL,
    )


def order(order_id: str, *items: tuple[str, int], price: float = 2.5) -> OrderPlaced:
    lines = tuple(OrderItem(sku=sku, quantity=qty, unit_price=price) for sku, qty in items)
    total = sum(round(price * 100) * qty for _, qty in items) / 100
    return OrderPlaced(
        order_id=order_id,
        customer_id="c-1",
        items=lines,
        currency="EUR",
        total=total,
        created_at=500.0,
    )


def rec(
    topic: str,
    value: bytes | None,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> InRecord:
    return InRecord(topic, 1, next(_offsets), key, value, headers or [], 1_700_000_000_000)


def placed(o: OrderPlaced) -> InRecord:
    return rec(ORDERS, schema.encode(o), o.order_id.encode())


def cancel(order_id: str, reason: str = "") -> InRecord:
    cmd = CancelOrder(order_id=order_id, requested_at=900.0, reason=reason)
    return rec(COMMANDS, schema.encode(cmd), order_id.encode())


def stock_of(store: Store) -> dict[str, tuple[int, int]]:
    return {row.sku: (row.available, row.reserved) for row in store.stock()}


def events(out: list[OutRecord]) -> list[schema.OrderEvent]:
    assert all(r.topic == EVENTS for r in out)
    return [schema.decode_event(r.value) for r in out]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store
    if request.param == "postgres":
        opened = PostgresInventoryStore(migrated_database(request))
    else:
        opened = SqliteInventoryStore(tmp_path / "inventory.db")
    with opened as s:
        s.seed({"A": 10, "B": 5, "C": 1})
        yield s


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Opens one more instance of a store on one database (empty, of each backend)."""
    if request.param == "postgres":
        url = migrated_database(request)
        return lambda: PostgresInventoryStore(url)
    return lambda: SqliteInventoryStore(tmp_path / "shared.db")


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteInventoryStore]:
    with SqliteInventoryStore(tmp_path / "inventory.db") as s:
        s.seed({"A": 10, "B": 5, "C": 1})
        yield s


@pytest.fixture
def service(store: Store) -> InventoryService:
    return service_for(store)


# --- reservations ---------------------------------------------------------------------


def test_reserve_takes_every_item_and_aggregates_repeated_skus(
    store: Store, service: InventoryService
) -> None:
    out = service.handle([placed(order("o1", ("A", 3), ("B", 2), ("A", 1)))])

    assert len(out) == 1
    assert out[0].key == b"o1"
    (event,) = events(out)
    assert event == OrderReserved(
        order_id="o1",
        items=(ItemQty("A", 4), ItemQty("B", 2)),
        total=15.0,
        currency="EUR",
        order_created_at=500.0,
        at=1000.0,
        expires_at=1000.0 + TTL,
        customer_id="c-1",
    )
    assert stock_of(store) == {"A": (6, 4), "B": (3, 2), "C": (1, 0)}
    assert store.order_outcomes()["o1"] == ("RESERVED", (("A", 4), ("B", 2)))
    assert service.stats.reserved == 1


def test_out_of_stock_reserves_nothing(store: Store, service: InventoryService) -> None:
    # A is plentiful, C is short: all or nothing, so A must stay untouched
    out = service.handle([placed(order("o1", ("A", 2), ("C", 1), ("C", 1)))])

    (event,) = events(out)
    assert isinstance(event, OrderRejected)
    assert event.reason == "OUT_OF_STOCK"
    assert "'C'" in event.detail and "needed 2" in event.detail and "available 1" in event.detail
    assert stock_of(store) == {"A": (10, 0), "B": (5, 0), "C": (1, 0)}
    assert store.order_outcomes()["o1"].status == "REJECTED"
    assert service.stats.rejected == {"OUT_OF_STOCK": 1}


def test_later_orders_in_a_batch_see_earlier_reservations(
    store: Store, service: InventoryService
) -> None:
    out = service.handle([placed(order("o1", ("B", 4))), placed(order("o2", ("B", 2)))])

    first, second = events(out)
    assert isinstance(first, OrderReserved)
    assert isinstance(second, OrderRejected) and second.reason == "OUT_OF_STOCK"
    assert stock_of(store)["B"] == (1, 4)


def test_unknown_sku_is_rejected_by_name(store: Store, service: InventoryService) -> None:
    out = service.handle([placed(order("o1", ("A", 1), ("NOPE", 1)))])

    (event,) = events(out)
    assert isinstance(event, OrderRejected)
    assert event.reason == "UNKNOWN_SKU"
    assert "NOPE" in event.detail
    assert stock_of(store)["A"] == (10, 0)
    assert "NOPE" not in stock_of(store)


# --- idempotency ----------------------------------------------------------------------


def test_duplicate_in_same_batch_reemits_identical_bytes(
    store: Store, service: InventoryService
) -> None:
    o = order("o1", ("A", 3))
    out = service.handle([placed(o), placed(o)])

    assert len(out) == 2
    assert out[0].value == out[1].value
    assert stock_of(store)["A"] == (7, 3)
    assert service.stats.reserved == 1
    assert service.stats.duplicates == 1


def test_redelivered_batch_reemits_identical_bytes_and_keeps_stock(
    tmp_path: Path, store: Store
) -> None:
    batch = [placed(order("o1", ("A", 3))), placed(order("o2", ("C", 5)))]
    first = service_for(store, now=1000.0).handle(batch)
    stock_before = stock_of(store)

    # later clock: re-emission must still be byte-identical
    again = service_for(store, now=2000.0).handle(batch)

    assert [r.value for r in again] == [r.value for r in first]
    assert [r.key for r in again] == [b"o1", b"o2"]
    assert stock_of(store) == stock_before
    # a re-encoding of the same order (items reordered, another created_at, keys in
    # another order) is the same order: a redelivery
    o2 = msgspec.structs.replace(order("o2", ("C", 5)), created_at=777.0)
    fields = msgspec.to_builtins(o2)
    reencoded = msgspec.json.encode(dict(reversed(list(fields.items()))))
    again = service_for(store, now=3000.0).handle([rec(ORDERS, reencoded, b"o2")])
    assert [r.value for r in again] == [first[1].value]
    assert stock_of(store) == stock_before


def test_store_failure_commits_nothing_and_redelivery_works(
    store: Store, service: InventoryService, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = [placed(order("o1", ("A", 3))), cancel("o1")]

    def broken(*_: object) -> None:
        raise StoreError("disk on fire")

    with monkeypatch.context() as patch:
        patch.setattr(store, "insert_cancellations", broken)
        with pytest.raises(StoreError):
            service.handle(batch)

    assert stock_of(store)["A"] == (10, 0)
    assert store.order_outcomes() == {}
    assert service.stats.batches == 0
    out = service.handle(batch)
    assert [type(e).__name__ for e in events(out)] == [
        "OrderReserved",
        "StockReleased",
        "OrderCancelled",
    ]


# --- dead letters ---------------------------------------------------------------------


def assert_dead_letter(out: OutRecord, original: InRecord, stage: str, error_class: str) -> None:
    assert out.topic == DLQ
    assert out.key == original.key
    assert out.value == original.value
    names = [name for name, _ in out.headers]
    for name in ERROR_FIELDS:
        assert names.count(ERROR_HEADER_PREFIX + name) == 1, name
    assert out.headers[: len(original.headers)] == original.headers
    assert header(out.headers, ERROR_HEADER_PREFIX + "topic") == original.topic.encode()
    assert header(out.headers, ERROR_HEADER_PREFIX + "partition") == b"1"
    assert header(out.headers, ERROR_HEADER_PREFIX + "offset") == str(original.offset).encode()
    assert header(out.headers, ERROR_HEADER_PREFIX + "timestamp") == b"1700000000000"
    assert header(out.headers, ERROR_HEADER_PREFIX + "service") == b"inventory"
    assert header(out.headers, ERROR_HEADER_PREFIX + "stage") == stage.encode()
    assert header(out.headers, ERROR_HEADER_PREFIX + "class") == error_class.encode()
    assert header(out.headers, ERROR_HEADER_PREFIX + "message")


def test_malformed_input_goes_to_dlq_with_original_bytes(
    store: Store, service: InventoryService
) -> None:
    bad_total = schema.encode(order("o2", ("A", 1))).replace(b'"total":2.5', b'"total":3.0')
    batch = [
        rec(ORDERS, b"{not json", b"k1", [("trace-id", b"abc"), ("x", b"\x00\xff")]),
        rec(ORDERS, bad_total, b"o2"),
        rec(ORDERS, None, None),
        rec(COMMANDS, b'{"type":"Explode"}', b"o3", [("trace-id", b"def")]),
        rec("elsewhere", b"{}", b"o4"),
        placed(order("o5", ("A", 1))),
    ]

    out = service.handle(batch)

    assert len(out) == 6
    assert_dead_letter(out[0], batch[0], "decode", "DecodeError.json")
    assert_dead_letter(out[1], batch[1], "decode", "DecodeError.validation")
    assert_dead_letter(out[2], batch[2], "decode", "DecodeError.schema")
    assert_dead_letter(out[3], batch[3], "decode", "DecodeError.schema")
    assert_dead_letter(out[4], batch[4], "route", "UnexpectedTopic")
    assert out[5].topic == EVENTS  # the good record behind the bad ones still goes through
    assert stock_of(store)["A"] == (9, 1)
    assert service.stats.dlq == 5


def test_reused_order_id_with_another_body_is_dead_lettered(
    store: Store, service: InventoryService
) -> None:
    first = order("o1", ("A", 3), ("B", 1))
    decided = service.handle([placed(first)])
    stock_before = stock_of(store)

    # another body under the same id, in a later batch and twice within one batch (the
    # second copy of the batch meets the first's decision, not the store's)
    other = placed(order("o1", ("C", 1)))
    twin = placed(order("o1", ("A", 3), ("B", 1), price=9.5))
    out = service_for(store, now=2000.0).handle([other, twin])

    assert len(out) == 2
    assert_dead_letter(out[0], other, "place", DUPLICATE_ORDER_ID)
    assert_dead_letter(out[1], twin, "place", DUPLICATE_ORDER_ID)
    message = header(out[0].headers, ERROR_HEADER_PREFIX + "message") or b""
    assert b"'o1'" in message
    assert stock_of(store) == stock_before

    # the same body (items reordered) is still a redelivery with the recorded bytes
    same = placed(order("o1", ("B", 1), ("A", 3)))
    again = service_for(store, now=3000.0).handle([same])
    assert [r.value for r in again] == [decided[0].value]

    # within one batch too: the first body is decided, the second dead-lettered
    fresh = service_for(store)
    out = fresh.handle([placed(order("o9", ("A", 1))), placed(order("o9", ("A", 2)))])
    assert [r.topic for r in out] == [EVENTS, DLQ]
    assert stock_of(store)["A"] == (stock_before["A"][0] - 1, stock_before["A"][1] + 1)
    assert fresh.stats.dlq == 1 and fresh.stats.duplicates == 0


def test_restock_command_without_an_id_is_refused(store: Store, service: InventoryService) -> None:
    # a restock on order-commands is applied once per restock id: one without is refused
    raw = msgspec.json.encode({"type": "Restock", "sku": "A", "quantity": 2**62})
    record = rec(COMMANDS, raw, b"A")
    (out,) = service.handle([record])
    assert_dead_letter(out, record, "decode", "DecodeError.schema")
    assert stock_of(store)["A"] == (10, 0)


def test_cancel_reason_over_the_limit_is_dead_lettered(
    store: Store, service: InventoryService
) -> None:
    service.handle([placed(order("o1", ("A", 1)))])
    record = cancel("o1", reason="x" * (schema.MAX_CANCEL_REASON + 1))
    (out,) = service.handle([record])
    assert_dead_letter(out, record, "decode", "DecodeError.schema")
    assert stock_of(store)["A"] == (9, 1)


# --- cancellation ---------------------------------------------------------------------


def test_cancel_releases_exactly_once(store: Store, service: InventoryService) -> None:
    service.handle([placed(order("o1", ("A", 3), ("B", 5)))])
    assert stock_of(store)["B"] == (0, 5)

    out = service.handle([cancel("o1", "customer asked")])

    released, cancelled = events(out)
    assert released == StockReleased(
        "o1", (ItemQty("A", 3), ItemQty("B", 5)), at=1000.0, cause="CANCELLED"
    )
    assert cancelled == OrderCancelled("o1", at=1000.0, detail="customer asked", stage="RESERVED")
    assert [r.key for r in out] == [b"o1", b"o1"]
    assert stock_of(store) == {"A": (10, 0), "B": (5, 0), "C": (1, 0)}
    assert store.order_outcomes()["o1"].status == "CANCELLED"

    redelivered = placed(order("o1", ("A", 3), ("B", 5)))
    again = service_for(store, now=3000.0).handle([cancel("o1"), redelivered])

    assert [r.value for r in again[:2]] == [r.value for r in out]
    assert isinstance(events(again[2:])[0], OrderReserved)  # the order's own outcome
    assert stock_of(store) == {"A": (10, 0), "B": (5, 0), "C": (1, 0)}
    assert service.stats.cancelled == 1


def test_cancel_in_the_same_batch_as_its_order(store: Store, service: InventoryService) -> None:
    out = service.handle([placed(order("o1", ("B", 5))), cancel("o1"), cancel("o1")])

    kinds = [type(e).__name__ for e in events(out)]
    released_cancelled = ["StockReleased", "OrderCancelled"]
    assert kinds == ["OrderReserved", *released_cancelled, *released_cancelled]
    assert out[3].value == out[1].value and out[4].value == out[2].value
    assert stock_of(store)["B"] == (5, 0)
    assert store.order_outcomes()["o1"].status == "CANCELLED"
    # the next order may take the released stock
    (event,) = events(service.handle([placed(order("o2", ("B", 5)))]))
    assert isinstance(event, OrderReserved)


def test_cancel_of_rejected_order_is_an_event_and_of_unknown_order_a_dead_letter(
    store: Store, service: InventoryService
) -> None:
    service.handle([placed(order("o1", ("C", 9)))])  # rejected: out of stock
    batch = [cancel("o1"), cancel("ghost")]

    out = service.handle(batch)

    assert out[0].topic == EVENTS and out[0].key == b"o1"
    event = schema.decode_event(out[0].value)
    assert isinstance(event, schema.CancelRejected)
    assert event.reason == "ORDER_REJECTED" and "REJECTED" in event.detail
    assert_dead_letter(out[1], batch[1], "cancel", "CancelRejected")
    assert b"unknown" in (header(out[1].headers, ERROR_HEADER_PREFIX + "message") or b"")
    assert store.order_outcomes()["o1"].status == "REJECTED"
    assert "ghost" not in store.order_outcomes()
    assert stock_of(store)["C"] == (1, 0)


# --- store ----------------------------------------------------------------------------


def test_seed_keeps_existing_stock_and_restock_adds(store: Store) -> None:
    assert store.seed({"A": 99, "D": 7}) == 1
    assert store.stock("A") == [StockRow("A", 10, 0)]
    assert store.stock("D") == [StockRow("D", 7, 0)]
    assert store.restock("A", 5) == StockRow("A", 15, 0)
    assert store.restock("NEW", 2) == StockRow("NEW", 2, 0)
    assert store.stock("missing") == []
    assert store.movements_total() == {"A": 15, "B": 5, "C": 1, "D": 7, "NEW": 2}
    with pytest.raises(StoreError):
        store.update_stock([StockRow("A", 1, 1)])


def test_restock_and_seed_are_bounded(store: Store) -> None:
    # two restocks of 2**62 once overflowed SQLite's integers into a float
    with pytest.raises(ValueError, match=r"1\.\.1000000000000"):
        store.restock("A", 2**62)
    assert store.restock("A", MAX_STOCK - 10) == StockRow("A", MAX_STOCK, 0)
    with pytest.raises(ValueError, match="exceed the maximum stock"):
        store.restock("A", 1)
    # reserved units count too: reserving moves them, it does not make room
    service_for(store).handle([placed(order("o1", ("A", 5)))])
    with pytest.raises(ValueError, match="exceed the maximum stock"):
        store.restock("A", 1)
    with pytest.raises(ValueError):
        store.seed({"HUGE": MAX_STOCK + 1})
    assert store.stock("A") == [StockRow("A", MAX_STOCK - 5, 5)]
    assert store.stock("HUGE") == []
    totals = store.movements_total()
    assert totals["A"] == MAX_STOCK and isinstance(totals["A"], int)


_OLD_ORDERS_TABLE = """
    CREATE TABLE orders (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('RESERVED', 'REJECTED', 'CANCELLED')),
        reason TEXT,
        items TEXT NOT NULL,
        outcome BLOB NOT NULL,
        decided_at REAL NOT NULL,
        source TEXT
    )
"""


def test_a_database_without_body_hash_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(_OLD_ORDERS_TABLE)
        conn.execute(
            "INSERT INTO orders VALUES ('old', 'REJECTED', 'UNKNOWN_SKU', '[[\"Z\",1]]',"
            " X'7B7D', 1.0, NULL)"
        )
    with SqliteInventoryStore(path) as store:
        store.seed({"A": 10})
        service = service_for(store)
        # a legacy row has no fingerprint: any copy is answered as before
        (legacy,) = service.handle([placed(order("old", ("A", 1)))])
        assert (legacy.topic, legacy.value) == (EVENTS, b"{}")
        service.handle([placed(order("new", ("A", 1)))])
    with SqliteInventoryStore(path) as store:  # a second open finds the column in place
        (dlq,) = service_for(store).handle([placed(order("new", ("A", 2)))])
        assert dlq.topic == DLQ
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(orders)")]
        hashes = dict(conn.execute("SELECT order_id, body_hash FROM orders"))
    assert columns.count("body_hash") == 1
    assert hashes["old"] is None
    assert hashes["new"] == schema.order_fingerprint(order("new", ("A", 1)))
    store.update_stock([])  # nothing to write needs no transaction


def test_many_skus_and_orders_cross_the_in_chunk_limit(opener: Callable[[], Store]) -> None:
    with opener() as store:
        store.seed({f"S{i}": 100 for i in range(1200)})
        service = service_for(store)
        batch = [placed(order(f"o{i}", (f"S{i}", 1), (f"S{i + 1}", 2))) for i in range(1100)]

        out = service.handle(batch)
        again = service.handle(batch)

        assert service.stats.reserved == 1100
        assert service.stats.duplicates == 1100
        assert [r.value for r in again] == [r.value for r in out]
        rows = stock_of(store)
        assert rows["S0"] == (99, 1) and rows["S1"] == (97, 3) and rows["S1100"] == (98, 2)


# --- invariants -----------------------------------------------------------------------


def check_invariants(store: Store) -> None:
    totals = store.movements_total()
    held: dict[str, int] = {}
    for outcome in store.order_outcomes().values():
        if outcome.status == "RESERVED":
            for sku, qty in outcome.items:
                held[sku] = held.get(sku, 0) + qty
    for row in store.stock():
        assert row.available >= 0 and row.reserved >= 0
        assert totals[row.sku] == row.available + row.reserved, row
        assert held.get(row.sku, 0) == row.reserved, row


SKUS = ["A", "B", "C", "ZZZ"]  # ZZZ is never seeded

op = st.one_of(
    st.tuples(
        st.just("order"),
        st.integers(0, 15),
        st.lists(st.tuples(st.sampled_from(SKUS), st.integers(1, 4)), min_size=1, max_size=3),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 15)),
    st.tuples(st.just("restock"), st.sampled_from(SKUS[:3]), st.integers(1, 5)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(op, max_size=8), max_size=6), redeliver=st.booleans())
def test_stock_is_conserved_over_random_sequences(
    batches: list[list[tuple[object, ...]]], redeliver: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp, SqliteInventoryStore(Path(tmp) / "inv.db") as store:
        store.seed({"A": 6, "B": 3, "C": 0})
        service = service_for(store)
        emitted: dict[tuple[bytes | None, str], set[bytes | None]] = {}
        for ops in batches:
            batch: list[InRecord] = []
            for item in ops:
                if item[0] == "order":
                    items = item[2]
                    assert isinstance(items, list)
                    batch.append(placed(order(f"o{item[1]}", *items)))
                elif item[0] == "cancel":
                    batch.append(cancel(f"o{item[1]}"))
                else:
                    sku, qty = item[1], item[2]
                    assert isinstance(sku, str) and isinstance(qty, int)
                    store.restock(sku, qty)
            deliveries = 2 if redeliver else 1
            for _ in range(deliveries):
                for r in service.handle(batch):
                    if r.topic == EVENTS:
                        kind = type(schema.decode_event(r.value)).__name__
                        emitted.setdefault((r.key, kind), set()).add(r.value)
                check_invariants(store)
        # one decision per order and one release per cancel, whatever was redelivered
        assert all(len(values) == 1 for values in emitted.values())


def test_two_instances_on_one_db_never_over_reserve(opener: Callable[[], Store]) -> None:
    seeded = {"A": 50, "B": 30}
    with opener() as s1, opener() as s2:
        s1.seed(seeded)
        one, two = service_for(s1), service_for(s2)
        batches = [
            [placed(order(f"o{b}-{i}", ("A", 3), ("B", 2))) for i in range(4)] for b in range(10)
        ]
        outputs: dict[bytes | None, set[bytes | None]] = {}
        for n, batch in enumerate(batches):
            # each batch goes to one instance, and is redelivered to the other (rebalance)
            first, second = (one, two) if n % 2 else (two, one)
            for out in (first.handle(batch), second.handle(batch)):
                for r in out:
                    outputs.setdefault(r.key, set()).add(r.value)

        assert all(len(values) == 1 for values in outputs.values())
        rows = stock_of(s1)
        assert rows["A"][1] <= seeded["A"] and rows["B"][1] <= seeded["B"]
        assert rows == {"A": (5, 45), "B": (0, 30)}  # B ran out after 15 orders
        check_invariants(s1)


def test_two_instances_in_threads_serialize_on_the_db(opener: Callable[[], Store]) -> None:
    with opener() as seed_store:
        seed_store.seed({"A": 100})
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            with opener() as store:
                service = service_for(store)
                for b in range(20):
                    # both instances see the same orders (overlapping partitions) and own ones
                    shared = [placed(order(f"s{b}-{i}", ("A", 1))) for i in range(3)]
                    own = [placed(order(f"{name}{b}-{i}", ("A", 1))) for i in range(3)]
                    service.handle(shared + own)
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors
    with opener() as store:
        outcomes = store.order_outcomes()
        reserved = sum(1 for o in outcomes.values() if o.status == "RESERVED")
        assert len(outcomes) == 20 * 3 * 3
        assert reserved == 100  # exactly the seeded stock, never more
        assert store.stock("A") == [StockRow("A", 0, 100)]
        check_invariants(store)


def interleaved(
    store: Store, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], object]
) -> None:
    """Run ``meanwhile`` (another instance's batch) right after the first ``load_stock``
    of ``store``: between the core's reads without locks and its transaction."""
    read = store.load_stock
    calls = itertools.count()

    def load_stock(skus: object) -> dict[str, StockRow]:
        rows = read(skus)  # type: ignore[arg-type]
        if next(calls) == 0:
            meanwhile()
        return rows

    monkeypatch.setattr(store, "load_stock", load_stock)


def test_stock_taken_between_the_read_and_the_locks_is_decided_again(
    opener: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    with opener() as mine, opener() as theirs:
        mine.seed({"A": 3, "B": 10})
        interleaved(
            mine, monkeypatch, lambda: service_for(theirs).handle([placed(order("x1", ("A", 2)))])
        )
        batch = [
            placed(order("o1", ("A", 2))),
            placed(order("o2", ("A", 1))),
            placed(order("o3", ("B", 1))),
        ]
        service = service_for(mine)
        out = service.handle(batch)

        # read without locks, A had 3: o1 and o2 fitted; locked, A has 1 left
        first, second, third = events(out)
        assert isinstance(first, OrderRejected) and "available 1" in first.detail
        assert isinstance(second, OrderReserved) and isinstance(third, OrderReserved)
        assert stock_of(mine) == {"A": (0, 3), "B": (9, 1)}
        assert service.stats.reserved == 2 and service.stats.rejected == {"OUT_OF_STOCK": 1}
        # what was stored is what was emitted
        assert [r.value for r in service_for(mine, now=9.0).handle(batch)] == [r.value for r in out]
        check_invariants(mine)


def test_stock_moved_between_the_read_and_the_locks_is_not_lost(
    opener: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    with opener() as mine, opener() as theirs:
        mine.seed({"A": 10})
        service = service_for(mine)
        service.handle([placed(order("p0", ("A", 1)))])
        interleaved(
            mine, monkeypatch, lambda: service_for(theirs).handle([placed(order("x1", ("A", 4)))])
        )
        out = service.handle(
            [placed(order("o1", ("A", 2))), cancel("p0"), placed(order("o2", ("A", 3)))]
        )

        assert [type(e).__name__ for e in events(out)] == [
            "OrderReserved",
            "StockReleased",
            "OrderCancelled",
            "OrderReserved",
        ]
        # 10 - p0 (cancelled) - x1 - o1 - o2: the other instance's 4 units are kept
        assert stock_of(mine) == {"A": (1, 9)}
        check_invariants(mine)


def test_an_order_recorded_meanwhile_by_another_instance_is_answered_with_its_bytes(
    opener: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    with opener() as mine, opener() as theirs:
        mine.seed({"A": 10})
        batch = [placed(order("o1", ("A", 2)))]
        # after a rebalance both instances see o1; the other one commits it first
        recorded: list[OutRecord] = []
        interleaved(
            mine, monkeypatch, lambda: recorded.extend(service_for(theirs, now=2.0).handle(batch))
        )
        service = service_for(mine, now=1.0)
        out = service.handle(batch)

        assert [r.value for r in out] == [r.value for r in recorded]
        assert service.stats.conflicts == 1 and service.stats.duplicates == 1
        assert stock_of(mine) == {"A": (8, 2)}
        check_invariants(mine)


stock_row = st.one_of(
    st.none(), st.tuples(st.integers(0, 8), st.integers(0, 4))
)  # (available, reserved) of a sku, or no such sku


@settings(max_examples=300, deadline=None)
@given(
    seen_rows=st.fixed_dictionaries({sku: stock_row for sku in SKUS}),
    moved=st.fixed_dictionaries({sku: stock_row for sku in SKUS}),
    moves=st.sets(st.sampled_from(SKUS)),
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("order"),
                st.integers(0, 9),
                st.lists(
                    st.tuples(st.sampled_from(SKUS), st.integers(1, 4)), min_size=1, max_size=3
                ),
            ),
            st.tuples(st.just("cancel"), st.integers(0, 9)),
        ),
        max_size=10,
    ),
)
def test_decisions_said_to_hold_on_the_locked_rows_are_the_ones_taken_on_them(
    seen_rows: dict[str, tuple[int, int] | None],
    moved: dict[str, tuple[int, int] | None],
    moves: set[str],
    ops: list[tuple[object, ...]],
) -> None:
    """The batch is decided on stock read without locks; the locked rows (``moves``
    changed by another instance in between) keep those decisions only if deciding
    again on them gives the same events, rows and stock changes."""

    def rows(values: dict[str, tuple[int, int] | None]) -> dict[str, StockRow]:
        return {sku: StockRow(sku, *v) for sku, v in values.items() if v is not None}

    seen = rows(seen_rows)
    # an sku once there stays there; a moved one may appear or change its figures
    locked = rows({sku: moved[sku] if sku in moves else seen_rows[sku] for sku in SKUS})
    for sku, row in seen.items():
        locked.setdefault(sku, row)
    # earlier decided orders o0..o4: RESERVED on the seen stock's skus (cancellable)
    known = {
        f"o{n}": KnownOrder("RESERVED", ((sku, 1),), b"{}", None, None)
        for n, sku in enumerate(sorted(seen))
    }
    service = service_for(cast(Store, None))
    work: list[Any] = []
    for item in ops:
        if item[0] == "order":
            items = item[2]
            assert isinstance(items, list)
            o = order(f"o{item[1]}", *items)
            work.append((placed(o), o, schema.order_fingerprint(o)))
        else:
            command = CancelOrder(order_id=f"o{item[1]}", requested_at=900.0, reason="")
            work.append((cancel(f"o{item[1]}"), command, b""))
    try:
        planned = service._run(work, known, {}, seen, set(), 1000.0)
    except StoreError:  # a cancel of an order whose sku the seen stock lacks
        return
    holds = _still_holds(planned, seen, locked)
    event(f"holds={holds} moved={locked != seen} rejected={bool(planned.stats.rejected)}")
    if not holds:
        return
    again = service._run(work, known, {}, locked, set(), 1000.0)
    assert again.out == planned.out
    assert again.decided() == planned.decided()
    assert again.cancellations == planned.cancellations
    for sku in planned.changed | again.changed:
        moved_by = [a - b for a, b in zip(locked[sku][1:], seen[sku][1:], strict=True)]
        assert again.stock[sku] == [
            figure + by for figure, by in zip(planned.stock[sku], moved_by, strict=True)
        ]


def test_batch_of_only_dead_letters_does_not_lock_the_db(
    sqlite_store: SqliteInventoryStore,
) -> None:
    service = service_for(sqlite_store)
    other = sqlite3.connect(sqlite_store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another instance holds the write lock
        out = service.handle([rec(ORDERS, b"garbage", b"k")])
        assert [r.topic for r in out] == [DLQ]
    finally:
        other.close()


def test_every_output_names_the_input_it_was_made_from(
    store: Store, service: InventoryService
) -> None:
    """The runner dead-letters an output's source if Kafka refuses the output for good:
    the cancel's outputs are the cancel's, not the order's, though they share its key."""
    first, again = placed(order("o1", ("A", 1))), placed(order("o1", ("A", 1)))
    stop, stop_again = cancel("o1"), cancel("o1")
    out = service.handle([first, again, stop, stop_again])
    kinds = [(type(e).__name__, r.source) for e, r in zip(events(out), out, strict=True)]
    assert kinds == [
        ("OrderReserved", first),
        ("OrderReserved", again),
        ("StockReleased", stop),
        ("OrderCancelled", stop),
        ("StockReleased", stop_again),
        ("OrderCancelled", stop_again),
    ]
    # a cancel of an order that was rejected: its CancelRejected is the cancel's
    short = placed(order("o2", ("C", 5)))
    late = cancel("o2")
    out = service.handle([short, late])
    kinds = [(type(e).__name__, r.source) for e, r in zip(events(out), out, strict=True)]
    assert kinds == [("OrderRejected", short), ("CancelRejected", late)]
