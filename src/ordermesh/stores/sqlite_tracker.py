"""``TrackerStore`` and ``OrderQueries`` on a SQLite file; see ``stores/tracker.py``.

The tracker service writes the file (``SqliteTrackerStore``, every write inside
``transaction()``); readers (the API, the CLI, ``verify``) open it read-only
(``SqliteOrderQueries``, ``mode=ro``), so they can never change an order. WAL lets them
read while the tracker writes; the busy timeout makes writers (several tracker instances
sharing one file) take turns.

Tables: ``orders`` (one row per order, the columns of ``TrackedOrder``), ``history``
(primary key (order_id, event)) and ``pending`` (the same key, raw event bytes).

Schema version 3 (the whole life) rebuilds ``orders``: SQLite cannot change the CHECK
on ``status`` in place, and the table's other columns come along in the copy. Version 4
adds ``orders.api_client`` (NULL in the rows before: no API client's) and its index,
which a client's page of orders reads.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager
from operator import attrgetter
from pathlib import Path
from typing import Any, Final

from ordermesh.errors import StoreError
from ordermesh.stores.sqlite import Migration, SqliteDatabase, Synchronous, add_column, statements
from ordermesh.stores.tracker import (
    ORDER_STATUSES,
    UPDATED_FIELDS,
    HistoryEntry,
    HistoryRow,
    OrderPage,
    OrderStatus,
    OrderView,
    PendingEvent,
    TrackedOrder,
    encode_cursor,
    list_orders_query,
    order_history,
)

logger = logging.getLogger(__name__)

# Schema version 3's orders table. Frozen as written: a later change is a new step.
_ORDERS_V3: Final = """
    CREATE TABLE orders_v3 (
        order_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('PLACED', 'RESERVED', 'PAID', 'SHIPPED', 'REJECTED',
                              'PAYMENT_FAILED', 'EXPIRED', 'CANCELLED')),
        items TEXT NOT NULL,
        total REAL NOT NULL,
        currency TEXT NOT NULL,
        created_at REAL NOT NULL,
        placed_at REAL NOT NULL,
        decided_at REAL,
        cancelled_at REAL,
        reason TEXT,
        detail TEXT,
        updated_at REAL NOT NULL,
        seq INTEGER NOT NULL,
        body_hash BLOB,
        expires_at REAL,
        paid_at REAL,
        shipped_at REAL,
        ended_at REAL,
        authorization_id TEXT,
        authorized REAL NOT NULL DEFAULT 0,
        captured REAL NOT NULL DEFAULT 0,
        voided REAL NOT NULL DEFAULT 0,
        refunded REAL NOT NULL DEFAULT 0,
        shipment_id TEXT
    )
"""
# Which event moved the orders of the releases before (their four statuses): the
# decision matching the status, and the cancel of a reserved order.
BACKFILL_PRIOR: Final = (
    """
    UPDATE history SET prior = 'PLACED' WHERE event = 'OrderReserved' AND order_id IN
        (SELECT order_id FROM orders WHERE status IN ('RESERVED', 'CANCELLED'))
    """,
    """
    UPDATE history SET prior = 'PLACED' WHERE event = 'OrderRejected' AND order_id IN
        (SELECT order_id FROM orders WHERE status = 'REJECTED')
    """,
    """
    UPDATE history SET prior = 'RESERVED' WHERE event = 'OrderCancelled' AND order_id IN
        (SELECT order_id FROM orders WHERE status = 'CANCELLED')
    """,
    # the orders that ended then, ended when they were rejected or cancelled
    """
    UPDATE orders SET ended_at = coalesce(cancelled_at, decided_at)
    WHERE status IN ('REJECTED', 'CANCELLED') AND ended_at IS NULL
    """,
)


def _whole_life(conn: sqlite3.Connection) -> None:
    """Schema version 3: every status of the lifecycle, the life's columns, and each
    history row's ``prior``; a no-op on a file that has them (from before versioning)."""
    (table_sql,) = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'orders'"
    ).fetchone()
    if "'SHIPPED'" not in table_sql:
        old = [row[1] for row in conn.execute("PRAGMA table_info(orders)")]
        conn.execute(_ORDERS_V3)
        kept = ", ".join(old)
        conn.execute(f"INSERT INTO orders_v3 ({kept}) SELECT {kept} FROM orders")
        conn.execute("DROP TABLE orders")
        conn.execute("ALTER TABLE orders_v3 RENAME TO orders")
        conn.execute("CREATE INDEX IF NOT EXISTS orders_status ON orders (status, order_id)")
        conn.execute("CREATE INDEX IF NOT EXISTS orders_customer ON orders (customer_id, order_id)")
    present = {row[1] for row in conn.execute("PRAGMA table_info(history)")}
    if "prior" not in present:
        conn.execute("ALTER TABLE history ADD COLUMN prior TEXT")
        for statement in BACKFILL_PRIOR:
            conn.execute(statement)


def _api_client(conn: sqlite3.Connection) -> None:
    """Schema version 4: who placed each order, and the index of a client's orders."""
    add_column("orders", "api_client", "TEXT")(conn)
    conn.execute("CREATE INDEX IF NOT EXISTS orders_api_client ON orders (api_client, order_id)")


# Append only: the n-th step brings a database to schema version n (stores/sqlite.py).
MIGRATIONS: Final = (
    Migration(
        "orders, history and pending events",
        statements(
            # PostgreSQL: REAL -> DOUBLE PRECISION, seq BIGINT
            """
            CREATE TABLE IF NOT EXISTS orders (
                order_id TEXT PRIMARY KEY,
                customer_id TEXT NOT NULL,
                status TEXT NOT NULL
                    CHECK (status IN ('PLACED', 'RESERVED', 'REJECTED', 'CANCELLED')),
                items TEXT NOT NULL,
                total REAL NOT NULL,
                currency TEXT NOT NULL,
                created_at REAL NOT NULL,
                placed_at REAL NOT NULL,
                decided_at REAL,
                cancelled_at REAL,
                reason TEXT,
                detail TEXT,
                updated_at REAL NOT NULL,
                seq INTEGER NOT NULL
            )
            """,
            "CREATE INDEX IF NOT EXISTS orders_status ON orders (status, order_id)",
            "CREATE INDEX IF NOT EXISTS orders_customer ON orders (customer_id, order_id)",
            """
            CREATE TABLE IF NOT EXISTS history (
                order_id TEXT NOT NULL,
                event TEXT NOT NULL,
                status TEXT,
                at REAL NOT NULL,
                detail TEXT NOT NULL,
                source TEXT,
                PRIMARY KEY (order_id, event)
            )
            """,
            # PostgreSQL: payload BYTEA
            """
            CREATE TABLE IF NOT EXISTS pending (
                order_id TEXT NOT NULL,
                event TEXT NOT NULL,
                payload BLOB NOT NULL,
                source TEXT,
                PRIMARY KEY (order_id, event)
            )
            """,
        ),
    ),
    # NULL in rows recorded before: any copy of such an order is taken as a redelivery
    Migration("orders.body_hash", add_column("orders", "body_hash", "BLOB")),
    Migration("the whole life: payment, shipment, deadlines, transitions", _whole_life),
    Migration("orders.api_client: the API client that placed the order", _api_client),
)

_COLUMNS: Final = ", ".join(TrackedOrder._fields)
_INSERT: Final = (
    f"INSERT INTO orders ({_COLUMNS}) VALUES ({', '.join('?' * len(TrackedOrder._fields))})"
)
_UPDATE: Final = (
    f"UPDATE orders SET {', '.join(f'{name} = ?' for name in UPDATED_FIELDS)} WHERE order_id = ?"
)
_update_params: Final = attrgetter(*UPDATED_FIELDS, "order_id")
_HISTORY_COLUMNS: Final = "event, status, at, detail, prior"


def _tracked(row: Any) -> TrackedOrder:
    return TrackedOrder._make(row)


class SqliteOrderQueries:
    """Read-only ``OrderQueries`` over the tracker's file; safe to share between threads.

    Opens lazily: if the tracker has not created the file yet (or not upgraded it to
    this code's schema version), reads and ``ping`` raise ``StoreError`` until it has.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteDatabase(path, name="tracker", migrations=MIGRATIONS, readonly=True)
        try:
            self._db.connection()
        except StoreError as exc:
            logger.warning("tracker db %s not readable yet: %s", path, exc)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqliteOrderQueries:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def data_version(self) -> int:
        """Changes whenever the tracker commits (see ``api/tracking.py``'s ``ChangeCounter``)."""
        return self._db.data_version()

    def ping(self) -> None:
        with self._db.read("ping") as conn:
            conn.execute("SELECT 1 FROM orders LIMIT 1").fetchall()

    def get_order(self, order_id: str, *, api_client: str | None = None) -> OrderView | None:
        text = f"SELECT {_COLUMNS} FROM orders WHERE order_id = ?"
        params: tuple[str, ...] = (order_id,)
        if api_client is not None:
            text += " AND api_client = ?"
            params += (api_client,)
        with self._db.read("get order") as conn:
            row = conn.execute(text, params).fetchone()
            if row is None:
                return None
            entries = conn.execute(
                f"SELECT {_HISTORY_COLUMNS} FROM history WHERE order_id = ?", (order_id,)
            ).fetchall()
        order = _tracked(row)
        return order.view(order_history(order.created_at, (HistoryEntry(*e) for e in entries)))

    def list_orders(
        self,
        *,
        status: OrderStatus | None = None,
        customer_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        api_client: str | None = None,
    ) -> OrderPage:
        sql, params, limit = list_orders_query(
            _COLUMNS,
            status=status,
            customer_id=customer_id,
            limit=limit,
            cursor=cursor,
            mark="?",
            api_client=api_client,
        )
        with self._db.read("list orders") as conn:
            rows = conn.execute(sql, params).fetchall()
        more = len(rows) > limit
        views = [_tracked(row).view([]) for row in rows[:limit]]
        return OrderPage(views, encode_cursor(views[-1].order_id) if more else None)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(ORDER_STATUSES, 0)
        with self._db.read("count statuses") as conn:
            for status, count in conn.execute(
                "SELECT status, COUNT(*) FROM orders GROUP BY status"
            ):
                counts[status] = int(count)
        return counts

    def statuses(self) -> dict[str, OrderStatus]:
        with self._db.read("read statuses") as conn:
            return dict(conn.execute("SELECT order_id, status FROM orders").fetchall())

    def pending_count(self) -> int:
        with self._db.read("count pending") as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM pending").fetchone()
        return int(count)


class SqliteTrackerStore(SqliteOrderQueries):
    """The tracker's own read-write ``TrackerStore`` (which answers the queries too)."""

    def __init__(self, path: Path, *, synchronous: Synchronous = "FULL") -> None:
        """Open, creating and migrating it, the database at ``path``."""
        self.path = path
        self._db = SqliteDatabase(
            path, name="tracker", migrations=MIGRATIONS, synchronous=synchronous
        )
        self._db.connection()

    def __enter__(self) -> SqliteTrackerStore:
        return self

    def transaction(self) -> AbstractContextManager[None]:
        return self._db.transaction()

    # --- batch primitives for the service (call inside transaction()) -----------------

    def load_orders(self, order_ids: Collection[str]) -> dict[str, TrackedOrder]:
        rows = self._db.select_in(
            f"SELECT {_COLUMNS} FROM orders WHERE order_id IN ({{marks}})", order_ids
        )
        return {row[0]: _tracked(row) for row in rows}

    def load_history_keys(self, order_ids: Collection[str]) -> set[tuple[str, str]]:
        rows = self._db.select_in(
            "SELECT order_id, event FROM history WHERE order_id IN ({marks})", order_ids
        )
        return {(order_id, event) for order_id, event in rows}

    def load_pending(self, order_ids: Collection[str]) -> list[PendingEvent]:
        with self._db.read("pending") as conn:
            if conn.execute("SELECT 1 FROM pending LIMIT 1").fetchone() is None:
                return []  # the usual case: no lookup per order
        rows = self._db.select_in(
            "SELECT order_id, event, payload, source FROM pending WHERE order_id IN ({marks})",
            order_ids,
        )
        return [PendingEvent(oid, event, bytes(payload), src) for oid, event, payload, src in rows]

    def insert_orders(self, rows: Iterable[TrackedOrder]) -> None:
        self._db.write_many("insert orders", _INSERT, list(rows))

    def update_orders(self, rows: Iterable[TrackedOrder]) -> None:
        self._db.write_many("update orders", _UPDATE, [_update_params(r) for r in rows])

    def insert_history(self, rows: Iterable[HistoryRow]) -> None:
        self._db.write_many(
            "insert history",
            "INSERT INTO history (order_id, event, status, at, detail, source, prior)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (order_id, event) DO NOTHING",
            list(rows),
        )

    def insert_pending(self, rows: Iterable[PendingEvent]) -> None:
        self._db.write_many(
            "insert pending",
            "INSERT INTO pending (order_id, event, payload, source) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (order_id, event) DO NOTHING",
            list(rows),
        )

    def delete_pending(self, order_ids: Iterable[str]) -> None:
        self._db.write_many(
            "delete pending",
            "DELETE FROM pending WHERE order_id = ?",
            [(order_id,) for order_id in order_ids],
        )
