"""``TrackerStore`` and ``OrderQueries`` on PostgreSQL; see ``stores/tracker.py`` (what is
kept) and ``stores/postgres.py`` (pool, migrations).

Tables as in SQLite (``orders``, ``history``, ``pending``), in the ``tracker`` schema
(version 2, the whole life, widens the status CHECK in place and adds its columns;
version 3 adds ``api_client``, who placed the order, and its index);
``orders.order_id`` is ``COLLATE "C"`` so pages come in SQLite's (byte) order whatever
the database's locale, straight from the primary key's index.

- A tracker batch is exclusive across instances, as the Protocol promises: its
  transaction first takes one advisory lock (``pg_advisory_xact_lock``). Row locks
  would not do: the tracker reads ``orders`` and ``order-events``, whose partitions of one
  order may be assigned to two instances, and one that parks an event as "order not
  here yet" while the other inserts the order would leave the event parked for good.
  A batch holds the lock for a few milliseconds; trackers scale by batch size.
- Decisions wake the API's long polls: the write transaction sends
  ``NOTIFY ordermesh_orders`` with the ids of the orders it decided (JSON arrays, split
  under PostgreSQL's payload limit); PostgreSQL delivers them at COMMIT, never for a
  rolled-back batch. ``PostgresOrderQueries.subscribe`` listens on its own connection
  in a background thread.
- Reads are single statements (an order and its history in one join), so each sees one
  snapshot without a transaction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Final

import msgspec
import psycopg

from ordermesh.errors import StoreError
from ordermesh.repeats import Repeats
from ordermesh.stores.postgres import PgMigration, PostgresDatabase
from ordermesh.stores.sqlite_tracker import BACKFILL_PRIOR
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

SCHEMA: Final = "tracker"
CHANNEL: Final = "ordermesh_orders"
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
_PAYLOAD_MAX: Final = 7000
# pg_advisory_xact_lock key making tracker batches exclusive across instances
_TRACKER_LOCK: Final = 0x6F6D5F74726B  # "om_trk"
_LISTEN_RETRY_S: Final = 1.0

# Append only: the n-th step brings the schema to version n (stores/postgres.py).
MIGRATIONS: Final = (
    PgMigration(
        "orders, history and pending events",
        (
            """
            CREATE TABLE orders (
                order_id TEXT COLLATE "C" PRIMARY KEY,
                customer_id TEXT COLLATE "C" NOT NULL,
                status TEXT NOT NULL
                    CHECK (status IN ('PLACED', 'RESERVED', 'REJECTED', 'CANCELLED')),
                items TEXT NOT NULL,
                total DOUBLE PRECISION NOT NULL,
                currency TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                placed_at DOUBLE PRECISION NOT NULL,
                decided_at DOUBLE PRECISION,
                cancelled_at DOUBLE PRECISION,
                reason TEXT,
                detail TEXT,
                updated_at DOUBLE PRECISION NOT NULL,
                seq BIGINT NOT NULL,
                body_hash BYTEA
            )
            """,
            "CREATE INDEX orders_status ON orders (status, order_id)",
            "CREATE INDEX orders_customer ON orders (customer_id, order_id)",
            """
            CREATE TABLE history (
                order_id TEXT NOT NULL,
                event TEXT NOT NULL,
                status TEXT,
                at DOUBLE PRECISION NOT NULL,
                detail TEXT NOT NULL,
                source TEXT,
                PRIMARY KEY (order_id, event)
            )
            """,
            """
            CREATE TABLE pending (
                order_id TEXT NOT NULL,
                event TEXT NOT NULL,
                payload BYTEA NOT NULL,
                source TEXT,
                PRIMARY KEY (order_id, event)
            )
            """,
        ),
    ),
    PgMigration(
        "the whole life: payment, shipment, deadlines, transitions",
        (
            # the column's CHECK of version 1, under PostgreSQL's own name for it
            "ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_status_check",
            """
            ALTER TABLE orders ADD CONSTRAINT orders_status_check
                CHECK (status IN ('PLACED', 'RESERVED', 'PAID', 'SHIPPED', 'REJECTED',
                                  'PAYMENT_FAILED', 'EXPIRED', 'CANCELLED'))
            """,
            # nullable or with a constant default: no table rewrite, whatever its size
            """
            ALTER TABLE orders
                ADD COLUMN expires_at DOUBLE PRECISION,
                ADD COLUMN paid_at DOUBLE PRECISION,
                ADD COLUMN shipped_at DOUBLE PRECISION,
                ADD COLUMN ended_at DOUBLE PRECISION,
                ADD COLUMN authorization_id TEXT,
                ADD COLUMN authorized DOUBLE PRECISION NOT NULL DEFAULT 0,
                ADD COLUMN captured DOUBLE PRECISION NOT NULL DEFAULT 0,
                ADD COLUMN voided DOUBLE PRECISION NOT NULL DEFAULT 0,
                ADD COLUMN refunded DOUBLE PRECISION NOT NULL DEFAULT 0,
                ADD COLUMN shipment_id TEXT
            """,
            "ALTER TABLE history ADD COLUMN prior TEXT",
            *BACKFILL_PRIOR,
        ),
    ),
    PgMigration(
        "orders.api_client: the API client that placed the order",
        (
            # nullable: no table rewrite; NULL in the rows before (no API client's)
            'ALTER TABLE orders ADD COLUMN api_client TEXT COLLATE "C"',
            "CREATE INDEX orders_api_client ON orders (api_client, order_id)",
        ),
    ),
)

_COLUMNS: Final = ", ".join(TrackedOrder._fields)
_O_COLUMNS: Final = ", ".join(f"o.{name}" for name in TrackedOrder._fields)
# the SQL types of TrackedOrder's fields, in order
_TYPES: Final = (
    *("text", "text", "text", "text", "float8", "text", "float8", "float8", "float8"),
    *("float8", "text", "text", "float8", "int8", "bytea"),
    *("float8", "float8", "float8", "float8", "text", "float8", "float8", "float8", "float8"),
    *("text", "text"),
)
_TYPE_OF: Final = dict(zip(TrackedOrder._fields, _TYPES, strict=True))
_INSERT: Final = (
    f"INSERT INTO orders ({_COLUMNS}) SELECT * FROM unnest("
    + ", ".join(f"%s::{t}[]" for t in _TYPES)
    + ") ORDER BY 1"
)
_UPDATE: Final = (
    f"UPDATE orders SET {', '.join(f'{name} = v.{name}' for name in UPDATED_FIELDS)}"
    f" FROM unnest(%s::text[], {', '.join(f'%s::{_TYPE_OF[n]}[]' for n in UPDATED_FIELDS)})"
    f" AS v (order_id, {', '.join(UPDATED_FIELDS)}) WHERE orders.order_id = v.order_id"
)
_payload_decoder: Final = msgspec.json.Decoder(list[str])


def notify_payloads(order_ids: Iterable[str]) -> list[str]:
    """``order_ids`` as NOTIFY payloads: JSON arrays, each under the payload limit."""
    payloads: list[str] = []
    chunk: list[str] = []
    size = 2
    for order_id in order_ids:
        cost = len(msgspec.json.encode(order_id)) + 1
        if chunk and size + cost > _PAYLOAD_MAX:
            payloads.append(msgspec.json.encode(chunk).decode())
            chunk, size = [], 2
        chunk.append(order_id)
        size += cost
    if chunk:
        payloads.append(msgspec.json.encode(chunk).decode())
    return payloads


def parse_payload(payload: str) -> list[str] | None:
    """The order ids of a NOTIFY payload; None for anything else (recheck every order)."""
    try:
        return _payload_decoder.decode(payload)
    except msgspec.DecodeError:
        return None


def _tracked(row: Any) -> TrackedOrder:
    order = TrackedOrder._make(row)
    if order.body_hash is not None:
        order = order._replace(body_hash=bytes(order.body_hash))
    return order


class PostgresOrderQueries:
    """Read-only ``OrderQueries`` over the tracker's schema; safe to share between threads.

    Opens lazily: until the schema is migrated, reads and ``ping`` raise ``StoreError``.
    """

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self._db = PostgresDatabase(
            url, name=SCHEMA, migrations=MIGRATIONS, max_size=pool_size, lazy=True
        )
        self.label = self._db.label
        self._listeners: list[_Listener] = []

    def close(self) -> None:
        for listener in self._listeners:
            listener.stop()
        self._listeners.clear()
        self._db.close()

    def __enter__(self) -> PostgresOrderQueries:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def subscribe(self, wake: Callable[[list[str] | None], None]) -> Callable[[], None]:
        """Call ``wake(order_ids)`` from a background thread when orders were decided
        (``wake(None)``: possibly any order, e.g. after the listening connection was
        lost and re-established). Returns the function that stops listening."""
        listener = _Listener(self._db.url, self.label, wake)
        self._listeners.append(listener)
        listener.start()
        return listener.stop

    def ping(self) -> None:
        with self._db.reader("ping") as conn:
            conn.execute("SELECT 1 FROM orders LIMIT 1").fetchall()

    def get_order(self, order_id: str, *, api_client: str | None = None) -> OrderView | None:
        text = (
            f"SELECT {_O_COLUMNS}, h.event, h.status, h.at, h.detail, h.prior FROM orders o"
            " LEFT JOIN history h ON h.order_id = o.order_id WHERE o.order_id = %s"
        )
        params: tuple[str, ...] = (order_id,)
        if api_client is not None:
            text += " AND o.api_client = %s"
            params += (api_client,)
        with self._db.reader("get order") as conn:
            rows = conn.execute(text.encode(), params).fetchall()
        if not rows:
            return None
        width = len(TrackedOrder._fields)
        order = _tracked(rows[0][:width])
        stored = (HistoryEntry(*row[width:]) for row in rows if row[width] is not None)
        return order.view(order_history(order.created_at, stored))

    def list_orders(
        self,
        *,
        status: OrderStatus | None = None,
        customer_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        api_client: str | None = None,
    ) -> OrderPage:
        text, params, limit = list_orders_query(
            _COLUMNS,
            status=status,
            customer_id=customer_id,
            limit=limit,
            cursor=cursor,
            mark="%s",
            api_client=api_client,
        )
        with self._db.reader("list orders") as conn:
            rows = conn.execute(text.encode(), params).fetchall()
        more = len(rows) > limit
        views = [_tracked(row).view([]) for row in rows[:limit]]
        return OrderPage(views, encode_cursor(views[-1].order_id) if more else None)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(ORDER_STATUSES, 0)
        with self._db.reader("count statuses") as conn:
            rows = conn.execute("SELECT status, COUNT(*) FROM orders GROUP BY status").fetchall()
        for status, count in rows:
            counts[status] = int(count)
        return counts

    def statuses(self) -> dict[str, OrderStatus]:
        with self._db.reader("read statuses") as conn:
            return dict(conn.execute("SELECT order_id, status FROM orders").fetchall())

    def pending_count(self) -> int:
        with self._db.reader("count pending") as conn:
            row = conn.execute("SELECT COUNT(*) FROM pending").fetchone()
        return int(row[0]) if row else 0


class PostgresTrackerStore(PostgresOrderQueries):
    """The tracker's own read-write ``TrackerStore`` (which answers the queries too)."""

    def __init__(self, url: str, *, pool_size: int = 2) -> None:
        """Open the ``tracker`` schema at ``url``; StoreError unless it is migrated."""
        self._db = PostgresDatabase(url, name=SCHEMA, migrations=MIGRATIONS, max_size=pool_size)
        self.label = self._db.label
        self._listeners = []

    def __enter__(self) -> PostgresTrackerStore:
        return self

    def transaction(self) -> AbstractContextManager[None]:
        return self._exclusive_transaction()

    @contextmanager
    def _exclusive_transaction(self) -> Iterator[None]:
        with self._db.transaction():
            with self._db.translate("lock the tracker"):
                self._db.writer().execute("SELECT pg_advisory_xact_lock(%s)", (_TRACKER_LOCK,))
            yield

    # --- batch primitives for the service (call inside transaction()) -----------------

    def _select(self, what: str, text: str, order_ids: Collection[str]) -> list[Any]:
        if not order_ids:
            return []
        with self._db.reader(what) as conn:
            return conn.execute(text.encode(), (list(order_ids),)).fetchall()

    def load_orders(self, order_ids: Collection[str]) -> dict[str, TrackedOrder]:
        rows = self._select(
            "load orders", f"SELECT {_COLUMNS} FROM orders WHERE order_id = ANY(%s)", order_ids
        )
        return {row[0]: _tracked(row) for row in rows}

    def load_history_keys(self, order_ids: Collection[str]) -> set[tuple[str, str]]:
        rows = self._select(
            "load history",
            "SELECT order_id, event FROM history WHERE order_id = ANY(%s)",
            order_ids,
        )
        return {(order_id, event) for order_id, event in rows}

    def load_pending(self, order_ids: Collection[str]) -> list[PendingEvent]:
        rows = self._select(
            "load pending",
            "SELECT order_id, event, payload, source FROM pending WHERE order_id = ANY(%s)",
            order_ids,
        )
        return [PendingEvent(oid, event, bytes(payload), src) for oid, event, payload, src in rows]

    def _write(self, what: str, text: str, columns: list[list[Any]]) -> None:
        conn = self._db.writer()
        with self._db.translate(what):
            conn.execute(text.encode(), columns)

    def _notify(self, rows: list[TrackedOrder]) -> None:
        decided = sorted({r.order_id for r in rows if r.status != "PLACED"})
        if decided:
            self._write(
                "notify",
                f"SELECT pg_notify('{CHANNEL}', p) FROM unnest(%s::text[]) AS p",
                [notify_payloads(decided)],
            )

    def insert_orders(self, rows: Iterable[TrackedOrder]) -> None:
        ordered = sorted(rows)
        if not ordered:
            return
        self._write(
            "insert orders", _INSERT, [list(column) for column in zip(*ordered, strict=True)]
        )
        self._notify(ordered)

    def update_orders(self, rows: Iterable[TrackedOrder]) -> None:
        ordered = sorted(rows)
        if not ordered:
            return
        self._write(
            "update orders",
            _UPDATE,
            [[r.order_id for r in ordered]]
            + [[getattr(r, name) for r in ordered] for name in UPDATED_FIELDS],
        )
        self._notify(ordered)

    def insert_history(self, rows: Iterable[HistoryRow]) -> None:
        ordered = sorted(rows, key=lambda r: (r.order_id, r.event))
        if ordered:
            self._write(
                "insert history",
                "INSERT INTO history (order_id, event, status, at, detail, source, prior)"
                " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[],"
                " %s::text[], %s::text[], %s::text[]) ON CONFLICT (order_id, event) DO NOTHING",
                [list(column) for column in zip(*ordered, strict=True)],
            )

    def insert_pending(self, rows: Iterable[PendingEvent]) -> None:
        ordered = sorted(rows, key=lambda r: (r.order_id, r.event))
        if ordered:
            self._write(
                "insert pending",
                "INSERT INTO pending (order_id, event, payload, source)"
                " SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::text[])"
                " ON CONFLICT (order_id, event) DO NOTHING",
                [list(column) for column in zip(*ordered, strict=True)],
            )

    def delete_pending(self, order_ids: Iterable[str]) -> None:
        ids = sorted(set(order_ids))
        if ids:
            self._write("delete pending", "DELETE FROM pending WHERE order_id = ANY(%s)", [ids])


class _Listener:
    """``LISTEN ordermesh_orders`` on a dedicated connection, in a daemon thread."""

    def __init__(self, url: str, label: str, wake: Callable[[list[str] | None], None]) -> None:
        self._url = url
        self._label = label
        self._wake = wake
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tracker-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        failures = Repeats(every=60)
        while not self._stopped.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if failures.succeeded():
                        logger.info("%s: listening for decisions again", self._label)
                    # whatever was decided while not listening: every waiter looks again
                    self._wake(None)
                    while not self._stopped.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._wake(parse_payload(note.payload))
            except (psycopg.Error, StoreError) as exc:
                if failures.failed():
                    logger.warning(
                        "%s: listening for decisions failed (%d times): %s",
                        self._label,
                        failures.count,
                        exc,
                    )
                self._stopped.wait(_LISTEN_RETRY_S)
            except Exception:
                logger.exception("%s: decision listener crashed; restarting it", self._label)
                self._stopped.wait(_LISTEN_RETRY_S)
