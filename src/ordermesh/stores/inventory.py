"""SQLite store of the inventory service: stock, stock movements and order decisions.

Several inventory instances may share one database file: every write runs inside
``transaction()`` (``BEGIN IMMEDIATE``), so the read-check-write of a whole batch is
atomic across processes, and the 30 s busy timeout makes the instances take turns.

Tables (the SQL sticks to what PostgreSQL also accepts, except where a comment says so,
so a PostgreSQL store can reuse it):

- ``stock``: ``available`` can be reserved; ``reserved`` is held by RESERVED orders.
- ``stock_movements``: every unit that entered the system (``seed``, ``restock``).
  Conservation: per sku, ``sum(quantity) == available + reserved``.
- ``orders``: one row per decided order (RESERVED, REJECTED, later CANCELLED) with the
  exact bytes of the outcome event, so a redelivered order re-emits identical bytes, and
  ``body_hash`` (``schema.order_fingerprint``), so a reused order_id with another body is
  told apart from a redelivery. NULL in rows decided before the column existed.
- ``cancellations``: one row per cancelled order with the exact bytes of its two events
  (``StockReleased``, ``OrderCancelled``). A separate table rather than columns of
  ``orders`` because most orders are never cancelled, and a cancel has its own time and
  source offset; ``orders.status`` still says CANCELLED so one table answers "where is
  this order".
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import msgspec

from ordermesh.errors import StoreError

logger = logging.getLogger(__name__)

OrderStatus = Literal["RESERVED", "REJECTED", "CANCELLED"]
MovementKind = Literal["seed", "restock"]
Synchronous = Literal["NORMAL", "FULL"]
Items = tuple[tuple[str, int], ...]

# SQLite allows 32766 host parameters per statement (999 before 3.32); 500 stays far
# below both and keeps the statement small enough to be cached and reused.
IN_CHUNK: Final = 500
BUSY_TIMEOUT_S: Final = 30.0
# Most units one sku may hold (available + reserved), and so the largest seed or restock.
# Far below SQLite's 2**63 integer limit, past which a sum silently turns into a float,
# and below 2**53, so every stock figure is also exact as a JSON number / double.
MAX_STOCK: Final = 10**12

_SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS stock (
        sku TEXT PRIMARY KEY,
        available INTEGER NOT NULL CHECK (available >= 0),
        reserved INTEGER NOT NULL CHECK (reserved >= 0)
    )
    """,
    # PostgreSQL: id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY
    """
    CREATE TABLE IF NOT EXISTS stock_movements (
        id INTEGER PRIMARY KEY,
        sku TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('seed', 'restock')),
        quantity INTEGER NOT NULL CHECK (quantity >= 0),
        at REAL NOT NULL
    )
    """,
    # PostgreSQL: outcome BYTEA, decided_at DOUBLE PRECISION
    """
    CREATE TABLE IF NOT EXISTS orders (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('RESERVED', 'REJECTED', 'CANCELLED')),
        reason TEXT,
        items TEXT NOT NULL,
        outcome BLOB NOT NULL,
        decided_at REAL NOT NULL,
        source TEXT,
        body_hash BLOB
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS cancellations (
        order_id TEXT PRIMARY KEY REFERENCES orders (order_id),
        released BLOB NOT NULL,
        cancelled BLOB NOT NULL,
        at REAL NOT NULL,
        source TEXT
    )
    """,
)

# Columns added after the first release: (table, column, type). A database created before
# gets them on open (ALTER TABLE ... ADD COLUMN, inside the schema transaction, so two
# instances opening one old file add each column once). New columns must be nullable.
_ADDED_COLUMNS: Final = (("orders", "body_hash", "BLOB"),)

_items_decoder: Final = msgspec.json.Decoder(tuple[tuple[str, int], ...])


class StockRow(NamedTuple):
    sku: str
    available: int
    reserved: int


class OrderOutcome(NamedTuple):
    """What ``verify`` needs of one order: its status and the (aggregated) items."""

    status: OrderStatus
    items: Items


class KnownOrder(NamedTuple):
    """An order already decided, as the service needs it to answer a redelivery."""

    status: OrderStatus
    items: Items
    outcome: bytes
    # (StockReleased, OrderCancelled) bytes once the order was cancelled
    cancel_outcome: tuple[bytes, bytes] | None
    # schema.order_fingerprint of the order decided; None if decided before it was kept
    body_hash: bytes | None


class NewOrder(NamedTuple):
    order_id: str
    status: OrderStatus
    reason: str | None
    items: Items
    outcome: bytes
    decided_at: float
    source: str | None
    body_hash: bytes | None = None


class NewCancellation(NamedTuple):
    order_id: str
    released: bytes
    cancelled: bytes
    at: float
    source: str | None


def encode_items(items: Items) -> str:
    """Items as the JSON text stored in ``orders.items``: ``[["sku", qty], ...]``."""
    return msgspec.json.encode(items).decode()


def decode_items(text: str) -> Items:
    return _items_decoder.decode(text)


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), IN_CHUNK):
        yield values[start : start + IN_CHUNK]


class InventoryStore:
    """The inventory database; one connection, used by one thread at a time."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous = "FULL",
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
    ) -> None:
        """Open the database, creating the file and its tables unless ``readonly``.

        ``readonly=True`` (``verify``) opens an existing file with SQLite's ``mode=ro``:
        it never creates a file or a table, so a missing database is a StoreError rather
        than a new empty one, and every write fails.
        """
        self.path = path
        self._clock = clock
        try:
            if readonly:
                target, uri = f"{path.resolve().as_uri()}?mode=ro", True
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                target, uri = str(path), False
            # isolation_level=None: no implicit BEGIN; transaction() issues BEGIN IMMEDIATE.
            # check_same_thread=False: the runner may hand the store to a worker thread;
            # it must still never be used by two threads at once.
            self._conn = sqlite3.connect(
                target,
                uri=uri,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open inventory db {path}: {exc}") from exc
        try:
            if readonly:
                with self._translate("open read-only"):
                    self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                    # fails here (not on the first query) when the file is not a database
                    self._conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                return
            self._configure(synchronous)
            with self.transaction():
                for statement in _SCHEMA:
                    self._conn.execute(statement)
                self._add_missing_columns()
        except BaseException:
            self._conn.close()
            raise

    def _configure(self, synchronous: Synchronous) -> None:
        with self._translate("configure"):
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            (mode,) = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL journal (got {mode!r})")
            # WAL + FULL fsyncs the WAL at every commit. The runner commits Kafka offsets
            # right after our COMMIT, so the transaction must survive not only kill -9
            # (NORMAL would be enough for that: the WAL is in the OS page cache) but also
            # a power loss or OS crash, which under NORMAL could roll back a transaction
            # whose events were produced and whose offsets were committed. With one
            # commit per batch the fsync costs little; NORMAL is available for runs
            # that only care about process crashes.
            self._conn.execute(f"PRAGMA synchronous = {synchronous}")

    def _add_missing_columns(self) -> None:
        """Bring a database created by an older release up to ``_SCHEMA`` (see above)."""
        with self._translate("add columns"):
            for table, column, sql_type in _ADDED_COLUMNS:
                present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
                    logger.info("inventory db %s: added column %s.%s", self.path, table, column)

    # --- plumbing ------------------------------------------------------------------

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"inventory db {self.path}: {what} failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``; rollback on error.

        IMMEDIATE takes the write lock up front, so stock read inside the transaction
        cannot be changed by another instance before we write it back.
        """
        if self._conn.in_transaction:
            raise StoreError("inventory db: nested transaction")
        with self._translate("begin"):
            self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            with self._translate("commit"):
                self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if not self._conn.in_transaction:
            return
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("inventory db %s: rollback failed", self.path)

    def _require_transaction(self) -> None:
        if not self._conn.in_transaction:
            raise StoreError("inventory db: write outside transaction()")

    def _select_in(self, sql: str, values: Collection[str]) -> Iterator[Any]:
        """Rows of ``sql`` (with one ``{marks}`` slot) for ``values``, in chunks."""
        ordered = list(values)
        full_sql = sql.format(marks=",".join("?" * IN_CHUNK))
        with self._translate("select"):
            for chunk in _chunks(ordered):
                text = (
                    full_sql
                    if len(chunk) == IN_CHUNK
                    else sql.format(marks=",".join("?" * len(chunk)))
                )
                yield from self._conn.execute(text, chunk)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> InventoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- operator commands ------------------------------------------------------------

    def seed(self, skus: dict[str, int]) -> int:
        """Make sure these skus exist; new ones get the given stock, existing ones are kept.

        Returns how many skus were created. Seeding is therefore safe to repeat (every
        ``ordermesh up`` seeds) and never silently changes live stock; use ``restock``
        to add units.
        """
        for sku, quantity in skus.items():
            if not sku or not 0 <= quantity <= MAX_STOCK:
                raise ValueError(f"bad seed {sku!r}: {quantity} (0..{MAX_STOCK})")
        now = self._clock()
        with self.transaction():
            existing = self.load_stock(skus)
            created = [(sku, qty) for sku, qty in skus.items() if sku not in existing]
            with self._translate("seed"):
                self._conn.executemany(
                    "INSERT INTO stock (sku, available, reserved) VALUES (?, ?, 0)", created
                )
                self._conn.executemany(
                    "INSERT INTO stock_movements (sku, kind, quantity, at)"
                    " VALUES (?, 'seed', ?, ?)",
                    [(sku, qty, now) for sku, qty in created],
                )
        logger.info("inventory db %s: seeded %d new skus of %d", self.path, len(created), len(skus))
        return len(created)

    def restock(self, sku: str, quantity: int) -> StockRow:
        """Add ``quantity`` available units of ``sku`` (created if unknown).

        ValueError, changing nothing, unless 1 <= quantity and the sku's stock
        (available + reserved) stays within ``MAX_STOCK``.
        """
        if not sku or not 1 <= quantity <= MAX_STOCK:
            raise ValueError(f"bad restock {sku!r}: {quantity} (1..{MAX_STOCK})")
        with self.transaction(), self._translate("restock"):
            held = self._conn.execute(
                "SELECT available + reserved FROM stock WHERE sku = ?", (sku,)
            ).fetchone()
            if held is not None and held[0] + quantity > MAX_STOCK:
                raise ValueError(
                    f"restock {sku!r} by {quantity}: it holds {held[0]}, and would exceed"
                    f" the maximum stock {MAX_STOCK}"
                )
            self._conn.execute(
                "INSERT INTO stock (sku, available, reserved) VALUES (?, ?, 0)"
                " ON CONFLICT (sku) DO UPDATE SET available = stock.available + excluded.available",
                (sku, quantity),
            )
            self._conn.execute(
                "INSERT INTO stock_movements (sku, kind, quantity, at) VALUES (?, 'restock', ?, ?)",
                (sku, quantity, self._clock()),
            )
            row = self._conn.execute(
                "SELECT sku, available, reserved FROM stock WHERE sku = ?", (sku,)
            ).fetchone()
        logger.info("inventory db %s: restocked %s by %d", self.path, sku, quantity)
        return StockRow(*row)

    # --- reads for operators and verify ---------------------------------------------

    def stock(self, sku: str | None = None) -> list[StockRow]:
        """Stock of one sku (empty list if unknown) or of every sku, ordered by sku."""
        with self._translate("read stock"):
            if sku is None:
                rows = self._conn.execute(
                    "SELECT sku, available, reserved FROM stock ORDER BY sku"
                ).fetchall()
            else:
                rows = self._conn.execute(
                    "SELECT sku, available, reserved FROM stock WHERE sku = ?", (sku,)
                ).fetchall()
        return [StockRow(*row) for row in rows]

    def movements_total(self) -> dict[str, int]:
        """Units that ever entered the system, per sku (seed + restock)."""
        with self._translate("read movements"):
            rows = self._conn.execute(
                "SELECT sku, SUM(quantity) FROM stock_movements GROUP BY sku"
            ).fetchall()
        return {sku: int(total) for sku, total in rows}

    def order_outcomes(self) -> dict[str, OrderOutcome]:
        """Status and items of every decided order."""
        with self._translate("read orders"):
            rows = self._conn.execute("SELECT order_id, status, items FROM orders").fetchall()
        return {
            order_id: OrderOutcome(status, decode_items(items)) for order_id, status, items in rows
        }

    # --- batch primitives for the service (call inside transaction()) -----------------

    def load_stock(self, skus: Collection[str]) -> dict[str, StockRow]:
        """Stock rows of the given skus; unknown skus are absent."""
        rows = self._select_in(
            "SELECT sku, available, reserved FROM stock WHERE sku IN ({marks})", skus
        )
        return {row[0]: StockRow(*row) for row in rows}

    def load_orders(self, order_ids: Collection[str]) -> dict[str, KnownOrder]:
        """Already decided orders among ``order_ids``, with their stored outcome bytes."""
        rows = self._select_in(
            "SELECT o.order_id, o.status, o.items, o.outcome, c.released, c.cancelled,"
            " o.body_hash"
            " FROM orders o LEFT JOIN cancellations c ON c.order_id = o.order_id"
            " WHERE o.order_id IN ({marks})",
            order_ids,
        )
        known: dict[str, KnownOrder] = {}
        for order_id, status, items, outcome, released, cancelled, body_hash in rows:
            cancel = None if released is None else (bytes(released), bytes(cancelled))
            digest = None if body_hash is None else bytes(body_hash)
            known[order_id] = KnownOrder(
                status, decode_items(items), bytes(outcome), cancel, digest
            )
        return known

    def update_stock(self, rows: Iterable[StockRow]) -> None:
        """Write final ``available``/``reserved`` values of existing skus."""
        params = [(row.available, row.reserved, row.sku) for row in rows]
        if not params:
            return
        self._require_transaction()
        with self._translate("update stock"):
            self._conn.executemany(
                "UPDATE stock SET available = ?, reserved = ? WHERE sku = ?", params
            )

    def insert_orders(self, orders: Iterable[NewOrder]) -> None:
        params = [
            (
                o.order_id,
                o.status,
                o.reason,
                encode_items(o.items),
                o.outcome,
                o.decided_at,
                o.source,
                o.body_hash,
            )
            for o in orders
        ]
        if not params:
            return
        self._require_transaction()
        with self._translate("insert orders"):
            self._conn.executemany(
                "INSERT INTO orders (order_id, status, reason, items, outcome, decided_at, source,"
                " body_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                params,
            )

    def insert_cancellations(self, cancellations: Iterable[NewCancellation]) -> None:
        """Record cancellations; orders already stored as RESERVED become CANCELLED."""
        rows = list(cancellations)
        if not rows:
            return
        self._require_transaction()
        with self._translate("insert cancellations"):
            self._conn.executemany(
                "UPDATE orders SET status = 'CANCELLED' WHERE order_id = ? AND status = 'RESERVED'",
                [(c.order_id,) for c in rows],
            )
            self._conn.executemany(
                "INSERT INTO cancellations (order_id, released, cancelled, at, source)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )
