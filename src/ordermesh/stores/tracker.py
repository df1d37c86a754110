"""SQLite store of the order tracker: one row per order with its status, plus its history.

The tracker service writes it (every write inside ``transaction()``, ``BEGIN IMMEDIATE``);
the HTTP API reads it through a second, read-only connection (``readonly=True`` opens the
file with ``mode=ro``), so the API can never change an order. WAL lets those readers run
while the tracker writes; the 30 s busy timeout makes writers (several tracker instances
sharing one file) take turns.

Tables (portable SQL, as in ``stores/inventory.py``):

- ``orders``: the current view of an order. ``items`` is JSON text
  ``[[sku, quantity, unit_price], ...]`` as placed. ``created_at`` is the order's own
  time, ``placed_at`` when the tracker recorded it, ``decided_at``/``cancelled_at`` the
  ``at`` of the inventory's events, ``updated_at`` the latest status transition.
  ``seq`` is the version of the order's view: 1 on insert, +1 for every history entry
  applied later, so a reader can tell that anything (status or history) changed.
  ``body_hash`` is ``schema.order_fingerprint`` of the order recorded, so a later copy
  with the same order_id but another body is recognised (NULL in rows recorded before
  the column existed).
- ``history``: one row per (order, event type). Redelivered events hit the primary key
  and change nothing; ``status`` is the status the event stands for (NULL for
  ``StockReleased``/``CancelRejected``, which do not move the status).
- ``pending``: events that arrived before their ``OrderPlaced`` (``orders`` and
  ``order-events`` are separate topics, so the tracker may read an order's events
  first), kept as raw bytes until the order arrives.
"""

from __future__ import annotations

import base64
import binascii
import logging
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, get_args

import msgspec

from ordermesh.errors import StoreError

logger = logging.getLogger(__name__)

OrderStatus = Literal["PLACED", "RESERVED", "REJECTED", "CANCELLED"]
ORDER_STATUSES: Final[tuple[OrderStatus, ...]] = get_args(OrderStatus)
Synchronous = Literal["NORMAL", "FULL"]

# Same limits and reasoning as the inventory store.
IN_CHUNK: Final = 500
BUSY_TIMEOUT_S: Final = 30.0
MAX_PAGE: Final = 500

# Where an event sorts among events of the same instant (clocks of different hosts may
# also put them out of order): placed, then decided, then released, then cancelled.
EVENT_RANK: Final[dict[str, int]] = {
    "OrderPlaced": 0,
    "OrderReserved": 1,
    "OrderRejected": 1,
    "CancelRejected": 2,
    "StockReleased": 2,
    "OrderCancelled": 3,
}

_SCHEMA: Final = (
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
        seq INTEGER NOT NULL,
        body_hash BLOB
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
)

# Columns added after the first release: (table, column, type). A database created before
# gets them when a writer opens it (ALTER TABLE ... ADD COLUMN, inside the schema
# transaction, so two trackers opening one old file add each column once). New columns
# must be nullable; read-only openers (the API) never select them.
_ADDED_COLUMNS: Final = (("orders", "body_hash", "BLOB"),)

_ORDER_COLUMNS: Final = (
    "order_id, customer_id, status, items, total, currency, created_at, updated_at, reason, detail"
)

ItemTuple = tuple[str, int, float]
_items_decoder: Final = msgspec.json.Decoder(list[tuple[str, int, float]])


# --- read interface (used by the HTTP API) ------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    event: str
    status: OrderStatus | None
    at: float
    detail: str


@dataclass(frozen=True)
class OrderItemView:
    sku: str
    quantity: int
    unit_price: float


@dataclass(frozen=True)
class OrderView:
    """An order as the tracker knows it; ``history`` is empty in list results."""

    order_id: str
    customer_id: str
    status: OrderStatus
    items: list[OrderItemView]
    total: float
    currency: str
    created_at: float
    updated_at: float
    reason: str | None
    detail: str | None
    history: list[HistoryEntry]


@dataclass(frozen=True)
class OrderPage:
    orders: list[OrderView]
    next_cursor: str | None


def encode_cursor(order_id: str) -> str:
    """Opaque cursor pointing after ``order_id`` (URL-safe base64, no padding)."""
    return base64.urlsafe_b64encode(order_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The order_id a cursor points after; ValueError if it is not one of ours."""
    if not cursor:
        raise ValueError("empty cursor")
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        order_id = raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError(f"invalid cursor {cursor[:80]!r}") from None
    if not order_id or encode_cursor(order_id) != cursor:
        raise ValueError(f"invalid cursor {cursor[:80]!r}")
    return order_id


def encode_items(items: Iterable[ItemTuple]) -> str:
    """Items as the JSON text stored in ``orders.items``: ``[[sku, qty, price], ...]``."""
    return msgspec.json.encode(list(items)).decode()


def decode_items(text: str) -> list[ItemTuple]:
    return _items_decoder.decode(text)


# --- rows the service reads and writes ------------------------------------------------


class TrackedOrder(NamedTuple):
    """The mutable part of an order row, as the service needs it to apply events."""

    status: OrderStatus
    decided_at: float | None
    cancelled_at: float | None
    reason: str | None
    detail: str | None
    updated_at: float
    seq: int
    body_hash: bytes | None  # None for rows recorded before it was kept


class OrderRow(NamedTuple):
    order_id: str
    customer_id: str
    status: OrderStatus
    items: str  # JSON text, see encode_items
    total: float
    currency: str
    created_at: float
    placed_at: float
    decided_at: float | None
    cancelled_at: float | None
    reason: str | None
    detail: str | None
    updated_at: float
    seq: int
    body_hash: bytes | None = None


class OrderUpdate(NamedTuple):
    order_id: str
    status: OrderStatus
    decided_at: float | None
    cancelled_at: float | None
    reason: str | None
    detail: str | None
    updated_at: float
    seq: int


class HistoryRow(NamedTuple):
    order_id: str
    event: str
    status: OrderStatus | None
    at: float
    detail: str
    source: str | None


class PendingEvent(NamedTuple):
    order_id: str
    event: str
    payload: bytes
    source: str | None


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), IN_CHUNK):
        yield values[start : start + IN_CHUNK]


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a database created by an older release up to ``_SCHEMA`` (see above)."""
    for table, column, sql_type in _ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
            logger.info("tracker db: added column %s.%s", table, column)


def _view(row: Sequence[Any], history: list[HistoryEntry]) -> OrderView:
    order_id, customer_id, status, items, total, currency, created, updated, reason, detail = row
    return OrderView(
        order_id=order_id,
        customer_id=customer_id,
        status=status,
        items=[OrderItemView(sku, qty, price) for sku, qty, price in decode_items(items)],
        total=total,
        currency=currency,
        created_at=created,
        updated_at=updated,
        reason=reason,
        detail=detail,
        history=history,
    )


class TrackerStore:
    """The tracker database over one connection; safe to share between threads.

    A read-only store (``readonly=True``, the API) opens lazily: if the tracker has not
    created the file yet, reads (and ``ping``) raise ``StoreError`` until it exists.
    """

    def __init__(
        self,
        path: Path,
        *,
        readonly: bool = False,
        synchronous: Synchronous = "FULL",
    ) -> None:
        self.path = path
        self.readonly = readonly
        self._synchronous = synchronous
        # sqlite3 connections must not run statements from two threads at once; the API
        # may call the store from a thread pool, so every use holds this lock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if readonly:
            try:
                self._connection()
            except StoreError as exc:
                logger.warning("tracker db %s not readable yet: %s", path, exc)
        else:
            self._connection()

    # --- plumbing ------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        path = self.path
        try:
            if self.readonly:
                uri = f"{path.resolve().as_uri()}?mode=ro"
                # isolation_level=None: no implicit BEGIN; reads use _read(), writes
                # transaction(). check_same_thread=False: guarded by self._lock.
                conn = sqlite3.connect(
                    uri,
                    uri=True,
                    timeout=BUSY_TIMEOUT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    str(path),
                    timeout=BUSY_TIMEOUT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open tracker db {path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if not self.readonly:
                (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if str(mode).lower() != "wal":
                    raise StoreError(f"{path}: cannot switch to WAL journal (got {mode!r})")
                # FULL for the reason given in stores/inventory.py: offsets are committed
                # right after our COMMIT, so it must survive an OS crash too
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                _add_missing_columns(conn)
                conn.execute("COMMIT")
            else:
                # fails here (not on the first query) when the file is not a database
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open tracker db {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"tracker db {self.path}: {what} failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``; rollback on error."""
        if self.readonly:
            raise StoreError(f"tracker db {self.path}: opened read-only")
        with self._lock:
            conn = self._connection()
            if conn.in_transaction:
                raise StoreError("tracker db: nested transaction")
            with self._translate("begin"):
                conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                with self._translate("commit"):
                    conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for a read of several statements."""
        with self._lock:
            conn = self._connection()
            if conn.in_transaction:  # inside the service's own transaction()
                with self._translate(what):
                    yield conn
                return
            with self._translate(what):
                conn.execute("BEGIN")
            try:
                with self._translate(what):
                    yield conn
            finally:
                self._rollback(conn)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("tracker db %s: rollback failed", self.path)

    def _writer(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None or not conn.in_transaction:
            raise StoreError("tracker db: write outside transaction()")
        return conn

    def _select_in(self, sql: str, values: Collection[str]) -> list[Any]:
        """Rows of ``sql`` (with one ``{marks}`` slot) for ``values``, in chunks."""
        ordered = list(values)
        if not ordered:
            return []
        full_sql = sql.format(marks=",".join("?" * IN_CHUNK))
        rows: list[Any] = []
        with self._read("select") as conn:
            for chunk in _chunks(ordered):
                text = (
                    full_sql
                    if len(chunk) == IN_CHUNK
                    else sql.format(marks=",".join("?" * len(chunk)))
                )
                rows += conn.execute(text, chunk).fetchall()
        return rows

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> TrackerStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- read interface -------------------------------------------------------------

    def ping(self) -> None:
        """Raise StoreError unless the database answers and holds the tracker's tables."""
        with self._read("ping") as conn:
            conn.execute("SELECT 1 FROM orders LIMIT 1").fetchall()

    def get_order(self, order_id: str) -> OrderView | None:
        """One order with its history (oldest first), or None if the tracker has not seen it."""
        with self._read("get order") as conn:
            row = conn.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders WHERE order_id = ?", (order_id,)
            ).fetchone()
            if row is None:
                return None
            entries = conn.execute(
                "SELECT event, status, at, detail FROM history WHERE order_id = ?", (order_id,)
            ).fetchall()
        entries.sort(key=lambda e: (e[2], EVENT_RANK.get(e[0], 9), e[0]))
        return _view(row, [HistoryEntry(*entry) for entry in entries])

    def list_orders(
        self,
        *,
        status: OrderStatus | None = None,
        customer_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> OrderPage:
        """A page of orders ordered by order_id (keyset pagination); ``history`` empty.

        ``limit`` is clamped to 1..500; an invalid ``cursor`` or ``status`` raises
        ValueError. ``next_cursor`` is None on the last page.
        """
        if status is not None and status not in ORDER_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        limit = max(1, min(MAX_PAGE, int(limit)))
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if customer_id is not None:
            where.append("customer_id = ?")
            params.append(customer_id)
        if cursor is not None:
            where.append("order_id > ?")
            params.append(decode_cursor(cursor))
        sql = f"SELECT {_ORDER_COLUMNS} FROM orders"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY order_id LIMIT ?"
        params.append(limit + 1)  # one more tells whether there is a next page
        with self._read("list orders") as conn:
            rows = conn.execute(sql, params).fetchall()
        more = len(rows) > limit
        views = [_view(row, []) for row in rows[:limit]]
        return OrderPage(views, encode_cursor(views[-1].order_id) if more else None)

    def status_counts(self) -> dict[str, int]:
        """Orders per status; every status is present, zero if none."""
        counts: dict[str, int] = dict.fromkeys(ORDER_STATUSES, 0)
        with self._read("count statuses") as conn:
            for status, count in conn.execute(
                "SELECT status, COUNT(*) FROM orders GROUP BY status"
            ):
                counts[status] = int(count)
        return counts

    def statuses(self) -> dict[str, OrderStatus]:
        """order_id -> status of every order (for verify)."""
        with self._read("read statuses") as conn:
            return dict(conn.execute("SELECT order_id, status FROM orders").fetchall())

    def pending_count(self) -> int:
        """Events still waiting for their OrderPlaced."""
        with self._read("count pending") as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM pending").fetchone()
        return int(count)

    # --- batch primitives for the service (call inside transaction()) -----------------

    def load_orders(self, order_ids: Collection[str]) -> dict[str, TrackedOrder]:
        rows = self._select_in(
            "SELECT order_id, status, decided_at, cancelled_at, reason, detail, updated_at, seq,"
            " body_hash FROM orders WHERE order_id IN ({marks})",
            order_ids,
        )
        known: dict[str, TrackedOrder] = {}
        for order_id, status, decided, cancelled, reason, detail, updated, seq, digest in rows:
            known[order_id] = TrackedOrder(
                status,
                decided,
                cancelled,
                reason,
                detail,
                updated,
                seq,
                None if digest is None else bytes(digest),
            )
        return known

    def load_history_keys(self, order_ids: Collection[str]) -> set[tuple[str, str]]:
        """(order_id, event) of the history rows of these orders."""
        rows = self._select_in(
            "SELECT order_id, event FROM history WHERE order_id IN ({marks})", order_ids
        )
        return {(order_id, event) for order_id, event in rows}

    def load_pending(self, order_ids: Collection[str]) -> list[PendingEvent]:
        rows = self._select_in(
            "SELECT order_id, event, payload, source FROM pending WHERE order_id IN ({marks})",
            order_ids,
        )
        return [PendingEvent(oid, event, bytes(payload), src) for oid, event, payload, src in rows]

    def _write_many(self, what: str, sql: str, params: list[Any]) -> None:
        """``executemany`` inside the open transaction; nothing to write needs none."""
        if not params:
            return
        conn = self._writer()
        with self._translate(what):
            conn.executemany(sql, params)

    def insert_orders(self, rows: Iterable[OrderRow]) -> None:
        self._write_many(
            "insert orders",
            "INSERT INTO orders (order_id, customer_id, status, items, total, currency,"
            " created_at, placed_at, decided_at, cancelled_at, reason, detail, updated_at,"
            " seq, body_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            list(rows),
        )

    def update_orders(self, updates: Iterable[OrderUpdate]) -> None:
        self._write_many(
            "update orders",
            "UPDATE orders SET status = ?, decided_at = ?, cancelled_at = ?, reason = ?,"
            " detail = ?, updated_at = ?, seq = ? WHERE order_id = ?",
            [(*u[1:], u.order_id) for u in updates],
        )

    def insert_history(self, rows: Iterable[HistoryRow]) -> None:
        self._write_many(
            "insert history",
            "INSERT INTO history (order_id, event, status, at, detail, source)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (order_id, event) DO NOTHING",
            list(rows),
        )

    def insert_pending(self, rows: Iterable[PendingEvent]) -> None:
        self._write_many(
            "insert pending",
            "INSERT INTO pending (order_id, event, payload, source) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (order_id, event) DO NOTHING",
            list(rows),
        )

    def delete_pending(self, order_ids: Iterable[str]) -> None:
        self._write_many(
            "delete pending",
            "DELETE FROM pending WHERE order_id = ?",
            [(order_id,) for order_id in order_ids],
        )
