"""Store plumbing: schema migrations, the backend factory, and the cores' shared guard."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from ordermesh import schema
from ordermesh.config import Settings
from ordermesh.errors import ConfigError, StoreError
from ordermesh.records import ERROR_HEADER_PREFIX, InRecord, header
from ordermesh.services.inventory import InventoryService
from ordermesh.services.tracker import TrackerService
from ordermesh.stores import sqlite_idempotency, sqlite_inventory, sqlite_tracker
from ordermesh.stores.factory import (
    backend,
    open_idempotency_store,
    open_inventory_store,
    open_order_queries,
    open_tracker_store,
)
from ordermesh.stores.inventory import StatusMove, StockRow
from ordermesh.stores.sqlite import (
    CHECKPOINT_EVERY_S,
    Migration,
    SqliteDatabase,
    schema_version,
    statements,
)
from ordermesh.stores.sqlite_idempotency import SqliteIdempotencyStore
from ordermesh.stores.sqlite_inventory import SqliteInventoryStore
from ordermesh.stores.sqlite_tracker import SqliteOrderQueries, SqliteTrackerStore

LATEST = {
    "inventory": len(sqlite_inventory.MIGRATIONS),
    "tracker": len(sqlite_tracker.MIGRATIONS),
    "api": len(sqlite_idempotency.MIGRATIONS),
}


def version_of(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return schema_version(conn)


def columns_of(path: Path, table: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def at_version(path: Path, migrations: tuple[Migration, ...], version: int) -> None:
    """A database as a release whose schema was ``version`` left it."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for step in migrations[:version]:
            step.apply(conn)
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.close()


def order(order_id: str) -> schema.OrderPlaced:
    return schema.OrderPlaced(
        order_id=order_id,
        customer_id="c-1",
        items=(schema.OrderItem(sku="A", quantity=1, unit_price=1.0),),
        currency="EUR",
        total=1.0,
        created_at=1.0,
    )


def placed(o: schema.OrderPlaced, offset: int = 0) -> InRecord:
    return InRecord("orders", 0, offset, o.order_id.encode(), schema.encode(o), [], 0)


# --- migrations -----------------------------------------------------------------------


def test_a_new_database_gets_the_latest_version(tmp_path: Path) -> None:
    SqliteInventoryStore(tmp_path / "i.db").close()
    SqliteTrackerStore(tmp_path / "t.db").close()
    SqliteIdempotencyStore(tmp_path / "a.db").close()
    assert version_of(tmp_path / "i.db") == LATEST["inventory"]
    assert version_of(tmp_path / "t.db") == LATEST["tracker"]
    assert version_of(tmp_path / "a.db") == LATEST["api"]
    assert columns_of(tmp_path / "i.db", "orders")[-2:] == ["body_hash", "expires_at"]
    assert "client" in columns_of(tmp_path / "a.db", "idempotency_keys")


def test_an_older_inventory_database_is_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "inventory.db"
    at_version(path, sqlite_inventory.MIGRATIONS, 1)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO stock VALUES ('A', 5, 0)")
    assert "body_hash" not in columns_of(path, "orders")

    # read-only opens (verify) do not upgrade: refused, and the file stays as it was
    with pytest.raises(StoreError, match="schema version 1 is older than this OrderMesh"):
        SqliteInventoryStore(path, readonly=True)
    assert version_of(path) == 1

    with SqliteInventoryStore(path) as store:
        assert [tuple(row) for row in store.stock()] == [("A", 5, 0, 0, 0)]
    assert version_of(path) == LATEST["inventory"]
    assert columns_of(path, "orders").count("body_hash") == 1
    with SqliteInventoryStore(path, readonly=True) as reader:
        assert reader.stock("A")[0].available == 5


def test_a_version_2_inventory_database_gets_the_lifecycle_and_keeps_its_orders(
    tmp_path: Path,
) -> None:
    """Step 3 rebuilds ``orders`` (SQLite cannot widen a CHECK in place): every row and
    cancellation survives, and the old reservations keep holding for ever."""
    path = tmp_path / "inventory.db"
    at_version(path, sqlite_inventory.MIGRATIONS, 2)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO stock VALUES ('A', 3, 2)")
        conn.execute(
            "INSERT INTO stock_movements (sku, kind, quantity, at) VALUES ('A', 'seed', 5, 1)"
        )
        for order_id, status in (("held", "RESERVED"), ("gone", "CANCELLED")):
            conn.execute(
                "INSERT INTO orders VALUES (?, ?, NULL, '[[\"A\",1]]', X'7B7D', 1.0, NULL, X'01')",
                (order_id, status),
            )
        conn.execute("INSERT INTO cancellations VALUES ('gone', X'01', X'02', 2.0, NULL)")

    with SqliteInventoryStore(path) as store:
        assert store.stock() == [StockRow("A", 3, 2, 0, 0)]
        known = store.load_orders(["held", "gone"])
        assert known["held"].status == "RESERVED" and known["held"].expires_at is None
        assert known["gone"].cancel_outcome == (b"\x01", b"\x02")
        assert store.expired_reservations(now=1e12, limit=10) == []  # no deadline: never
        levels = store.stock_levels("A")
        assert levels[0][1:] == (5, 0, 3, 2, 0, 0) and levels[0].conserved
        with store.transaction():  # the new statuses are allowed now
            store.move_orders([StatusMove("held", "RESERVED", "PAID")])
    assert version_of(path) == LATEST["inventory"] == 3
    assert "committed" in columns_of(path, "stock") and "shipped" in columns_of(path, "stock")


@pytest.mark.parametrize(
    "opener",
    [
        lambda p: SqliteInventoryStore(p),
        lambda p: SqliteInventoryStore(p, readonly=True),
        lambda p: SqliteTrackerStore(p),
        lambda p: SqliteIdempotencyStore(p),
    ],
    ids=["inventory", "inventory-readonly", "tracker", "api"],
)
def test_a_newer_database_is_refused(tmp_path: Path, opener: object) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE from_the_future (x)")
        conn.execute("PRAGMA user_version = 99")
    assert callable(opener)
    # the number is each store's own latest version
    with pytest.raises(StoreError, match=r"schema version 99 is newer than this OrderMesh \(\d+\)"):
        opener(path)
    assert version_of(path) == 99  # untouched


def test_a_newer_tracker_database_is_refused_to_readers_too(tmp_path: Path) -> None:
    path = tmp_path / "tracker.db"
    SqliteTrackerStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 7")
    reader = SqliteOrderQueries(path)
    with pytest.raises(StoreError, match="schema version 7 is newer"):
        reader.ping()
    reader.close()


def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    good = Migration("a table", statements("CREATE TABLE t (x INTEGER)"))
    SqliteDatabase(path, name="x", migrations=[good]).connection().close()

    broken = Migration("broken", statements("CREATE TABLE u (y)", "INSERT INTO nowhere VALUES (1)"))
    db = SqliteDatabase(path, name="x", migrations=[good, broken])
    with pytest.raises(StoreError, match="no such table: nowhere"):
        db.connection()
    assert version_of(path) == 1
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert tables == {"t"}


def test_the_wal_is_checkpointed_in_the_background(tmp_path: Path) -> None:
    """2 MB written stays in the WAL until a checkpoint copies it into the file: SQLite's
    own automatic one would not start before ``WAL_FALLBACK_PAGES``, so only the
    background thread can grow the file meanwhile."""
    path = tmp_path / "c.db"
    table = statements("CREATE TABLE t (v BLOB NOT NULL)")
    db = SqliteDatabase(path, name="c", migrations=[Migration("t", table)])
    try:
        with db.transaction():
            db.writer().executemany("INSERT INTO t VALUES (?)", [(b"x" * 4000,)] * 500)
        assert path.stat().st_size < 100_000  # all of it is in the WAL so far
        deadline = time.monotonic() + 30 * CHECKPOINT_EVERY_S
        while path.stat().st_size < 2_000_000 and time.monotonic() < deadline:
            time.sleep(CHECKPOINT_EVERY_S / 5)
        assert path.stat().st_size >= 2_000_000
    finally:
        db.close()
    assert not db.path.with_name("c.db-wal").exists()  # the last close removes the WAL


def test_a_file_from_before_versioning_is_taken_as_it_is(tmp_path: Path) -> None:
    # files of the releases before schema versions: tables complete, user_version 0
    path = tmp_path / "tracker.db"
    SqliteTrackerStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 0")
    with SqliteTrackerStore(path) as store:
        TrackerService(store, orders_topic="orders", events_topic="ev", dlq_topic="dlq").handle(
            [placed(order("o1"))]
        )
        assert store.statuses() == {"o1": "PLACED"}
    assert version_of(path) == LATEST["tracker"]
    assert columns_of(path, "orders").count("body_hash") == 1


# --- factory --------------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, "", "sqlite:", "sqlite://", "SQLite:"])
def test_sqlite_is_the_default_backend(tmp_path: Path, url: str | None) -> None:
    settings = Settings(data_dir=tmp_path, database_url=url)
    assert backend(settings) == "sqlite"
    open_inventory_store(settings).close()
    open_tracker_store(settings).close()
    open_idempotency_store(settings).close()
    queries = open_order_queries(settings)
    assert queries.status_counts()["PLACED"] == 0
    queries.close()
    assert {p.name for p in tmp_path.iterdir()} >= {"inventory.db", "tracker.db", "api.db"}


def test_the_database_url_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nothing listens on port 1: every opener fails, naming the server but no password
    monkeypatch.setenv("ORDERMESH_DATABASE_URL", "postgresql://u:secret@127.0.0.1:1/ordermesh")
    settings = Settings(data_dir=tmp_path)
    assert backend(settings) == "postgres"
    assert backend(Settings(data_dir=tmp_path, database_url="postgres://db/x")) == "postgres"
    for opener in (open_inventory_store, open_tracker_store, open_idempotency_store):
        with pytest.raises(StoreError, match=r"127\.0\.0\.1:1/ordermesh") as err:
            opener(settings)
        assert "secret" not in str(err.value)
    assert not list(tmp_path.iterdir())  # no SQLite file opened or created


@pytest.mark.parametrize("url", ["mysql://db/x", "sqlite:///elsewhere/x.db", "nonsense"])
def test_other_database_urls_are_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="ORDERMESH_DATABASE_URL"):
        open_inventory_store(Settings(data_dir=tmp_path, database_url=url))


# --- the cores' shared guard ------------------------------------------------------------


def test_a_record_that_breaks_the_core_is_dead_lettered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise ZeroDivisionError("bug")

    with SqliteInventoryStore(tmp_path / "i.db") as store:
        store.seed({"A": 10})
        inventory = InventoryService(
            store, orders_topic="orders", commands_topic="cmd", events_topic="ev", dlq_topic="dlq"
        )
        monkeypatch.setattr(inventory, "_place", broken)
        (dlq,) = inventory.handle([placed(order("o1"))])
    with SqliteTrackerStore(tmp_path / "t.db") as tstore:
        tracker = TrackerService(tstore, orders_topic="orders", events_topic="ev", dlq_topic="dlq")
        monkeypatch.setattr(tracker, "_place", broken)
        (tdlq,) = tracker.handle([placed(order("o1"))])
    for out, service in ((dlq, inventory), (tdlq, tracker)):
        assert out.topic == "dlq"
        assert header(out.headers, ERROR_HEADER_PREFIX + "stage") == b"process"
        assert header(out.headers, ERROR_HEADER_PREFIX + "class") == b"ZeroDivisionError"
        assert service.stats.dlq == 1
