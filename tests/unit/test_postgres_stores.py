"""The PostgreSQL stores: schema versions, several instances on one database, NOTIFY.

Each test gets its own database on the conftest's PostgreSQL server (``postgres_database``);
without a server these tests fail, never skip. What every backend must do alike is tested
by the parametrized store tests (``test_inventory_service.py``, ``test_tracker_service.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from ordermesh import schema
from ordermesh.api.tracking import DecisionFeed, OrderReader
from ordermesh.config import Settings
from ordermesh.errors import StoreConflictError, StoreError
from ordermesh.records import InRecord, OutRecord
from ordermesh.schema import ItemQty, OrderItem, OrderPlaced, OrderReserved
from ordermesh.services.inventory import InventoryService
from ordermesh.services.tracker import TrackerService
from ordermesh.stores.factory import (
    backend,
    migrate,
    open_idempotency_store,
    open_inventory_store,
    open_order_queries,
    open_tracker_store,
)
from ordermesh.stores.postgres_idempotency import PostgresIdempotencyStore
from ordermesh.stores.postgres_inventory import PostgresInventoryStore
from ordermesh.stores.postgres_tracker import (
    PostgresOrderQueries,
    PostgresTrackerStore,
    notify_payloads,
    parse_payload,
)

_offsets = itertools.count()


def order(order_id: str, *items: tuple[str, int]) -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id="c-1",
        items=tuple(OrderItem(sku=sku, quantity=qty, unit_price=1.0) for sku, qty in items),
        currency="EUR",
        total=float(sum(qty for _, qty in items)),
        created_at=500.0,
    )


def placed(o: OrderPlaced) -> InRecord:
    return InRecord("orders", 0, next(_offsets), o.order_id.encode(), schema.encode(o), [], 0)


def inventory(store: PostgresInventoryStore) -> InventoryService:
    return InventoryService(
        store, orders_topic="orders", commands_topic="cmd", events_topic="ev", dlq_topic="dlq"
    )


def run_threads(*targets: Callable[[], None]) -> None:
    """Run each target in its own thread; re-raise the first failure here."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    if errors:
        raise errors[0]


@pytest.fixture
def url(postgres_database: str) -> str:
    """This test's database with every store's schema migrated."""
    migrate(Settings(database_url=postgres_database))
    return postgres_database


# --- schema versions --------------------------------------------------------------------


def test_stores_refuse_an_unmigrated_database_until_migrate(postgres_database: str) -> None:
    settings = Settings(database_url=postgres_database)
    assert backend(settings) == "postgres"
    for opener in (open_inventory_store, open_tracker_store, open_idempotency_store):
        with pytest.raises(StoreError, match="run `ordermesh db migrate`"):
            opener(settings)
    queries = open_order_queries(settings)  # readers open lazily: the tracker may be late
    with pytest.raises(StoreError, match="run `ordermesh db migrate`"):
        queries.ping()

    applied = migrate(settings)
    assert applied == [
        "inventory: schema version 1: stock, stock movements, orders and cancellations",
        "inventory: schema version 2: the whole life of an order: paid/shipped stock, deadlines,"
        " steps, reorders",
        "tracker: schema version 1: orders, history and pending events",
        "tracker: schema version 2: the whole life: payment, shipment, deadlines, transitions",
        "tracker: schema version 3: orders.api_client: the API client that placed the order",
        "api: schema version 1: idempotency keys scoped per client",
        "payments: schema version 1: payments and their outbox",
        "fulfilment: schema version 1: shipments and their outbox",
    ]
    assert migrate(settings) == []  # up to date: nothing to do
    queries.ping()
    assert queries.status_counts()["PLACED"] == 0
    queries.close()
    for opener in (open_inventory_store, open_tracker_store, open_idempotency_store):
        opener(settings).close()


def test_a_newer_schema_is_refused(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO inventory.schema_version (version, summary) VALUES (9, 'x')")
    with pytest.raises(StoreError, match=r"schema version 9 is newer than this OrderMesh \(2\)"):
        PostgresInventoryStore(url)
    with pytest.raises(StoreError, match="schema version 9 is newer"):
        migrate(Settings(database_url=url))


def test_concurrent_migrations_apply_each_step_once(postgres_database: str) -> None:
    results: list[list[str]] = []
    settings = Settings(database_url=postgres_database)
    run_threads(*[lambda: results.append(migrate(settings))] * 3)
    # each store's steps ran once, by whichever migrator got there first
    lines = sorted(line for applied in results for line in applied)
    assert [line.split(":")[0] for line in lines] == [
        "api",
        "fulfilment",
        "inventory",
        "inventory",
        "payments",
        "tracker",
        "tracker",
        "tracker",
    ]


def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    settings = Settings(database_url="postgresql://u:secret@127.0.0.1:1/ordermesh")
    with pytest.raises(StoreError) as err:
        open_inventory_store(settings)
    assert "secret" not in str(err.value) and "127.0.0.1:1/ordermesh" in str(err.value)


# --- inventory instances sharing one database ------------------------------------------


def test_two_instances_reserving_overlapping_skus_neither_deadlock_nor_oversell(url: str) -> None:
    skus = ["A", "B", "C", "D"]
    with PostgresInventoryStore(url) as seeder:
        seeder.seed(dict.fromkeys(skus, 150))
    outputs: dict[str, list[list[OutRecord]]] = {"x": [], "y": []}

    def instance(name: str, order_skus: list[str]) -> Callable[[], None]:
        def run() -> None:
            with PostgresInventoryStore(url) as store:
                service = inventory(store)
                for b in range(30):
                    # the two instances name the skus in opposite orders
                    own = [
                        placed(order(f"{name}{b}-{i}", *[(sku, 1) for sku in order_skus]))
                        for i in range(4)
                    ]
                    # and both see the same orders (a partition moving between them)
                    shared = [placed(order(f"s{b}-{i}", ("B", 1), ("C", 1))) for i in range(2)]
                    outputs[name].append(service.handle(own + shared))

        return run

    run_threads(instance("x", skus), instance("y", skus[::-1]))

    with PostgresInventoryStore(url) as store:
        outcomes = store.order_outcomes()
        assert len(outcomes) == 30 * (4 + 4 + 2)
        held = {sku: 0 for sku in skus}
        for outcome in outcomes.values():
            if outcome.status == "RESERVED":
                for sku, qty in outcome.items:
                    held[sku] += qty
        rows = {row.sku: row for row in store.stock()}
        for sku in skus:
            assert rows[sku].reserved == held[sku] <= 150  # never oversold
            assert rows[sku].available + rows[sku].reserved == 150
        assert rows["B"].available == 0  # demand (300) exceeded stock: all of it went
    # an order both instances decided was recorded once, and both emitted those bytes
    by_key: dict[bytes | None, set[bytes | None]] = {}
    for batch in outputs["x"] + outputs["y"]:
        for record in batch:
            by_key.setdefault(record.key, set()).add(record.value)
    assert all(len(values) == 1 for values in by_key.values())


def test_the_same_order_decided_by_two_instances_at_once_is_recorded_once(url: str) -> None:
    with PostgresInventoryStore(url) as seeder:
        seeder.seed({"A": 1})
    stores = [PostgresInventoryStore(url), PostgresInventoryStore(url)]
    services = [inventory(s) for s in stores]
    batch = [placed(order("o1", ("A", 1))), placed(order("o2", ("A", 1)))]
    start = threading.Barrier(2)
    outs: list[list[OutRecord]] = [[], []]

    def run(n: int) -> Callable[[], None]:
        def go() -> None:
            start.wait()
            outs[n] = services[n].handle(batch)

        return go

    try:
        run_threads(run(0), run(1))
        assert [r.value for r in outs[0]] == [r.value for r in outs[1]]
        assert [type(schema.decode_event(r.value)).__name__ for r in outs[0]] == [
            "OrderReserved",
            "OrderRejected",
        ]
        assert stores[0].stock("A")[0][1:3] == (0, 1)  # one unit, reserved once
    finally:
        for s in stores:
            s.close()


def test_a_lost_batch_is_decided_again_from_scratch(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with PostgresInventoryStore(url) as store:
        store.seed({"A": 5})
        service = inventory(store)
        insert = store.insert_orders
        calls = itertools.count()

        def lose_first(orders: object) -> None:
            if next(calls) == 0:
                raise StoreConflictError("lost to another instance")
            insert(orders)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "insert_orders", lose_first)
        out = service.handle([placed(order("o1", ("A", 2)))])
        assert [type(schema.decode_event(r.value)).__name__ for r in out] == ["OrderReserved"]
        assert service.stats.conflicts == 1 and service.stats.reserved == 1
        assert store.stock("A")[0][1:3] == (3, 2)  # the rolled-back attempt left nothing


def test_a_deadlock_is_a_conflict_error(url: str) -> None:
    with PostgresInventoryStore(url) as seeder:
        seeder.seed({"A": 1, "B": 1})
    both_locked = threading.Barrier(2)
    errors: list[BaseException] = []

    def lock(first: str, second: str) -> Callable[[], None]:
        def run() -> None:
            with PostgresInventoryStore(url) as store:
                try:
                    with store.transaction():
                        store.load_stock([first])  # unsorted on purpose: two calls
                        both_locked.wait()
                        store.load_stock([second])
                except StoreConflictError as exc:
                    errors.append(exc)

        return run

    run_threads(lock("A", "B"), lock("B", "A"))
    assert len(errors) == 1 and "deadlock" in str(errors[0])


# --- idempotency keys across API replicas ------------------------------------------------


def test_two_replicas_reserving_one_key_get_one_order(url: str) -> None:
    stores = [PostgresIdempotencyStore(url), PostgresIdempotencyStore(url)]
    start = threading.Barrier(8)
    records = []

    def reserve(n: int) -> Callable[[], None]:
        def run() -> None:
            start.wait()
            records.append(stores[n % 2].reserve("client", "key-1", "h", f"ord-{n}", float(n)))

        return run

    try:
        run_threads(*[reserve(n) for n in range(8)])
        assert len({r.order_id for r in records}) == 1
        assert sum(stores[n % 2].mark_acked("client", "key-1", 9.0) for n in range(4)) == 1
    finally:
        for s in stores:
            s.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM api.idempotency_keys").fetchone() == (1,)


# --- decisions announced to the API -------------------------------------------------------


def test_notify_payloads_stay_under_the_limit_and_round_trip() -> None:
    ids = [f"order-{i:06d}" for i in range(2000)]
    payloads = notify_payloads(ids)
    assert len(payloads) > 1 and all(len(p.encode()) < 8000 for p in payloads)
    assert [oid for p in payloads for oid in parse_payload(p) or []] == ids
    assert parse_payload("*") is None


def tracker_batch(order_id: str) -> list[InRecord]:
    o = order(order_id, ("A", 1))
    decided = OrderReserved(order_id, (ItemQty("A", 1),), 1.0, "EUR", 500.0, 600.0)
    return [
        placed(o),
        InRecord("ev", 0, next(_offsets), order_id.encode(), schema.encode(decided), [], 0),
    ]


def test_committed_decisions_are_announced(url: str) -> None:
    heard: list[list[str] | None] = []
    queries = PostgresOrderQueries(url)
    stop = queries.subscribe(heard.append)
    try:
        deadline = time.monotonic() + 10
        while None not in heard:  # listening (it announces "recheck everything" first)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with PostgresTrackerStore(url) as store:
            tracker = TrackerService(store, orders_topic="orders", events_topic="ev", dlq_topic="d")
            tracker.handle([placed(order("p1", ("A", 1)))])  # PLACED only: nothing to say
            tracker.handle(tracker_batch("o1"))
        while ["o1"] not in heard:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert all(ids is None or ids == ["o1"] for ids in heard)
    finally:
        stop()
        queries.close()


def test_a_long_poll_is_woken_by_the_decision_not_by_polling(url: str) -> None:
    queries = open_order_queries(Settings(database_url=url))
    assert isinstance(queries, DecisionFeed)
    # a poll interval far beyond the test: only the notification can answer in time
    reader = OrderReader(queries, poll_interval_s=60.0)

    def decide_later() -> None:
        time.sleep(0.5)
        with PostgresTrackerStore(url) as store:
            TrackerService(store, orders_topic="orders", events_topic="ev", dlq_topic="d").handle(
                tracker_batch("o1")
            )

    async def scenario() -> float:
        started = time.monotonic()
        thread = threading.Thread(target=decide_later)
        thread.start()
        view = await reader.wait_decided("o1", 30.0)
        await asyncio.to_thread(thread.join)
        assert view is not None and view.status == "RESERVED"
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) < 1.9  # below FEED_RECHECK_S: the NOTIFY woke it
    finally:
        reader.close()
