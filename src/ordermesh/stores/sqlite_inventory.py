"""``InventoryStore`` on a SQLite file (the embedded default); see ``stores/inventory.py``.

Tables (the SQL sticks to what PostgreSQL also accepts, except where a comment says so):
``stock`` (sku, available, reserved, committed, shipped), ``stock_movements`` (every seed
and restock), ``orders`` (one row per decided order, with its outcome bytes, ``body_hash``
and ``expires_at``), ``cancellations`` (one row per cancelled order with its two events'
bytes), ``order_steps`` (one row per other status move, with the bytes it emitted) and
``reorders`` (one row per restock id). Separate tables rather than columns of ``orders``
because most orders take few steps, and each step has its own time and source offset;
``orders.status`` still says where the order is, so one table answers that.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Final

from ordermesh.errors import StoreConflictError
from ordermesh.stores.inventory import (
    DUE_REORDERS_SQL,
    EXPIRED_RESERVATIONS_SQL,
    AppliedRestock,
    KnownOrder,
    NewCancellation,
    NewOrder,
    OrderOutcome,
    OrderStep,
    Reorder,
    StatusMove,
    StockLevels,
    StockRow,
    check_restock,
    check_seed,
    collapse_moves,
    decode_items,
    decode_step_events,
    encode_items,
    reorder_of,
    step_columns,
    sum_levels,
)
from ordermesh.stores.sqlite import Migration, SqliteDatabase, Synchronous, add_column, statements

logger = logging.getLogger(__name__)

# Append only: the n-th step brings a database to schema version n (stores/sqlite.py).
MIGRATIONS: Final = (
    Migration(
        "stock, stock movements, orders and cancellations",
        statements(
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
                source TEXT
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
        ),
    ),
    # NULL in rows decided before: such orders are answered as redeliveries, as they were
    Migration("orders.body_hash", add_column("orders", "body_hash", "BLOB")),
    Migration(
        "the whole life of an order: paid/shipped stock, deadlines, steps, reorders",
        lambda conn: _lifecycle(conn),
    ),
)

_STATUSES_CHECK: Final = (
    "status IN ('RESERVED', 'PAID', 'SHIPPED', 'REJECTED', 'PAYMENT_FAILED', 'EXPIRED',"
    " 'CANCELLED')"
)


def _lifecycle(conn: sqlite3.Connection) -> None:
    """Schema step 3. SQLite cannot change a CHECK constraint in place, so ``orders`` is
    rebuilt (rows kept; ``expires_at`` NULL in them: their reservations hold for ever,
    as they did when they were decided)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(orders)")}
    if "expires_at" not in columns:
        conn.execute(
            f"""
            CREATE TABLE orders_v3 (
                order_id TEXT PRIMARY KEY,
                status TEXT NOT NULL CHECK ({_STATUSES_CHECK}),
                reason TEXT,
                items TEXT NOT NULL,
                outcome BLOB NOT NULL,
                decided_at REAL NOT NULL,
                source TEXT,
                body_hash BLOB,
                expires_at REAL
            )
            """
        )
        conn.execute(
            "INSERT INTO orders_v3 (order_id, status, reason, items, outcome, decided_at,"
            " source, body_hash) SELECT order_id, status, reason, items, outcome, decided_at,"
            " source, body_hash FROM orders"
        )
        conn.execute("DROP TABLE orders")
        conn.execute("ALTER TABLE orders_v3 RENAME TO orders")
    # only RESERVED orders have a deadline to watch: the sweep's index holds only them
    conn.execute(
        "CREATE INDEX IF NOT EXISTS orders_reserved_expiry ON orders (expires_at)"
        " WHERE status = 'RESERVED'"
    )
    stock = {row[1] for row in conn.execute("PRAGMA table_info(stock)")}
    for column in ("committed", "shipped"):
        if column not in stock:
            conn.execute(
                f"ALTER TABLE stock ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
                f" CHECK ({column} >= 0)"
            )
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS order_steps (
            order_id TEXT NOT NULL REFERENCES orders (order_id),
            status TEXT NOT NULL,
            trigger TEXT NOT NULL,
            first BLOB NOT NULL,
            second BLOB,
            at REAL NOT NULL,
            source TEXT,
            PRIMARY KEY (order_id, status)
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS reorders (
            restock_id TEXT PRIMARY KEY,
            sku TEXT NOT NULL,
            quantity INTEGER NOT NULL CHECK (quantity >= 1),
            opened_at REAL NOT NULL,
            due_at REAL NOT NULL,
            applied_at REAL,
            source TEXT
        )
        """
    )
    # at most one open reorder per sku, whichever instance opens it
    conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS reorders_open_sku ON reorders (sku)"
        " WHERE applied_at IS NULL"
    )
    conn.execute(
        "CREATE INDEX IF NOT EXISTS reorders_open_due ON reorders (due_at) WHERE applied_at IS NULL"
    )


_STOCK_COLUMNS: Final = "sku, available, reserved, committed, shipped"
_EXPIRED_RESERVATIONS: Final = EXPIRED_RESERVATIONS_SQL.format(p="?")
_DUE_REORDERS: Final = DUE_REORDERS_SQL.format(p="?")


class SqliteInventoryStore:
    """The inventory database on one SQLite connection; one thread at a time."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous = "FULL",
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
    ) -> None:
        """Open (creating and migrating it unless ``readonly``) the database at ``path``.

        ``readonly=True`` (``verify``) opens an existing file of the current schema
        version: a missing file or another version is a StoreError, and writes fail.
        """
        self.path = path
        self._clock = clock
        self._db = SqliteDatabase(
            path,
            name="inventory",
            migrations=MIGRATIONS,
            readonly=readonly,
            synchronous=synchronous,
        )
        self._db.connection()

    def transaction(self) -> AbstractContextManager[None]:
        return self._db.transaction()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqliteInventoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- operator commands ------------------------------------------------------------

    def seed(self, skus: Mapping[str, int]) -> int:
        check_seed(skus)
        now = self._clock()
        with self._db.transaction():
            existing = self.load_stock(skus)
            created = [(sku, qty) for sku, qty in skus.items() if sku not in existing]
            conn = self._db.writer()
            with self._db.translate("seed"):
                conn.executemany(
                    "INSERT INTO stock (sku, available, reserved) VALUES (?, ?, 0)", created
                )
                conn.executemany(
                    "INSERT INTO stock_movements (sku, kind, quantity, at)"
                    " VALUES (?, 'seed', ?, ?)",
                    [(sku, qty, now) for sku, qty in created],
                )
        logger.info("inventory db %s: seeded %d new skus of %d", self.path, len(created), len(skus))
        return len(created)

    def restock(self, sku: str, quantity: int) -> StockRow:
        check_restock(sku, quantity, None)
        with self._db.transaction(), self._db.translate("restock"):
            conn = self._db.writer()
            held = conn.execute(
                "SELECT available + reserved + committed FROM stock WHERE sku = ?", (sku,)
            ).fetchone()
            check_restock(sku, quantity, None if held is None else int(held[0]))
            conn.execute(
                "INSERT INTO stock (sku, available, reserved) VALUES (?, ?, 0)"
                " ON CONFLICT (sku) DO UPDATE SET available = stock.available + excluded.available",
                (sku, quantity),
            )
            conn.execute(
                "INSERT INTO stock_movements (sku, kind, quantity, at) VALUES (?, 'restock', ?, ?)",
                (sku, quantity, self._clock()),
            )
            row = conn.execute(
                f"SELECT {_STOCK_COLUMNS} FROM stock WHERE sku = ?", (sku,)
            ).fetchone()
        logger.info("inventory db %s: restocked %s by %d", self.path, sku, quantity)
        return StockRow(*row)

    # --- reads for operators and verify ---------------------------------------------

    def stock(self, sku: str | None = None) -> list[StockRow]:
        with self._db.read("read stock") as conn:
            if sku is None:
                rows = conn.execute(f"SELECT {_STOCK_COLUMNS} FROM stock ORDER BY sku")
            else:
                rows = conn.execute(f"SELECT {_STOCK_COLUMNS} FROM stock WHERE sku = ?", (sku,))
            return [StockRow(*row) for row in rows]

    def movements_total(self) -> dict[str, int]:
        with self._db.read("read movements") as conn:
            rows = conn.execute(
                "SELECT sku, SUM(quantity) FROM stock_movements GROUP BY sku"
            ).fetchall()
        return {sku: int(total) for sku, total in rows}

    def stock_levels(self, sku: str | None = None) -> list[StockLevels]:
        query = (
            "SELECT s.sku,"
            " COALESCE(SUM(CASE WHEN m.kind = 'seed' THEN m.quantity END), 0),"
            " COALESCE(SUM(CASE WHEN m.kind = 'restock' THEN m.quantity END), 0),"
            " s.available, s.reserved, s.committed, s.shipped"
            " FROM stock s LEFT JOIN stock_movements m ON m.sku = s.sku"
        )
        with self._db.read("read stock levels") as conn:
            if sku is None:
                rows = conn.execute(query + " GROUP BY s.sku ORDER BY s.sku").fetchall()
            else:
                rows = conn.execute(query + " WHERE s.sku = ? GROUP BY s.sku", (sku,)).fetchall()
        return [StockLevels(*(row[0], *(int(v) for v in row[1:]))) for row in rows]

    def stock_totals(self) -> StockLevels:
        return sum_levels(self.stock_levels())

    def expired_reservations(self, now: float, limit: int) -> list[tuple[str, float]]:
        with self._db.read("read expired reservations") as conn:
            rows = conn.execute(_EXPIRED_RESERVATIONS, (now, limit)).fetchall()
        return [(order_id, float(at)) for order_id, at in rows]

    def due_reorders(self, now: float, limit: int) -> list[Reorder]:
        with self._db.read("read due reorders") as conn:
            rows = conn.execute(_DUE_REORDERS, (now, limit)).fetchall()
        return [reorder_of(row) for row in rows]

    def order_outcomes(self) -> dict[str, OrderOutcome]:
        with self._db.read("read orders") as conn:
            rows = conn.execute("SELECT order_id, status, items FROM orders").fetchall()
        return {
            order_id: OrderOutcome(status, decode_items(items)) for order_id, status, items in rows
        }

    # --- batch primitives for the service (writes inside transaction()) ---------------

    def load_stock(self, skus: Collection[str]) -> dict[str, StockRow]:
        rows = self._db.select_in(
            f"SELECT {_STOCK_COLUMNS} FROM stock WHERE sku IN ({{marks}})", skus
        )
        return {row[0]: StockRow(*row) for row in rows}

    def load_orders(self, order_ids: Collection[str]) -> dict[str, KnownOrder]:
        rows = self._db.select_in(
            "SELECT o.order_id, o.status, o.items, o.outcome, c.released, c.cancelled,"
            " o.body_hash, o.expires_at"
            " FROM orders o LEFT JOIN cancellations c ON c.order_id = o.order_id"
            " WHERE o.order_id IN ({marks})",
            order_ids,
        )
        known: dict[str, KnownOrder] = {}
        for order_id, status, items, outcome, released, cancelled, body_hash, expires in rows:
            cancel = None if released is None else (bytes(released), bytes(cancelled))
            digest = None if body_hash is None else bytes(body_hash)
            known[order_id] = KnownOrder(
                status, decode_items(items), bytes(outcome), cancel, digest, expires
            )
        return known

    def load_steps(self, order_ids: Collection[str]) -> dict[str, tuple[OrderStep, ...]]:
        rows = self._db.select_in(
            "SELECT order_id, status, trigger, first, second, at, source FROM order_steps"
            " WHERE order_id IN ({marks}) ORDER BY order_id, at",
            order_ids,
        )
        steps: dict[str, tuple[OrderStep, ...]] = {}
        for order_id, status, trigger, first, second, at, source in rows:
            step = OrderStep(
                order_id, status, trigger, decode_step_events(first, second), at, source
            )
            steps[order_id] = (*steps.get(order_id, ()), step)
        return steps

    def applied_restocks(self, restock_ids: Collection[str]) -> set[str]:
        rows = self._db.select_in(
            "SELECT restock_id FROM reorders WHERE applied_at IS NOT NULL"
            " AND restock_id IN ({marks})",
            restock_ids,
        )
        return {row[0] for row in rows}

    def open_reorders(self, skus: Collection[str]) -> set[str]:
        rows = self._db.select_in(
            "SELECT sku FROM reorders WHERE applied_at IS NULL AND sku IN ({marks})", skus
        )
        return {row[0] for row in rows}

    def update_stock(self, rows: Iterable[StockRow]) -> None:
        self._db.write_many(
            "update stock",
            "UPDATE stock SET available = ?, reserved = ?, committed = ?, shipped = ?"
            " WHERE sku = ?",
            [(row.available, row.reserved, row.committed, row.shipped, row.sku) for row in rows],
        )

    def insert_orders(self, orders: Iterable[NewOrder]) -> None:
        rows = [
            (
                o.order_id,
                o.status,
                o.reason,
                encode_items(o.items),
                o.outcome,
                o.decided_at,
                o.source,
                o.body_hash,
                o.expires_at,
            )
            for o in orders
        ]
        inserted = self._db.write_many(
            "insert orders",
            "INSERT INTO orders (order_id, status, reason, items, outcome, decided_at,"
            " source, body_hash, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (order_id) DO NOTHING",
            rows,
        )
        if inserted != len(rows):
            # the core read the known orders before this transaction: another process on
            # this file decided some of them meanwhile
            raise _lost("orders", len(rows), inserted)

    def update_orders(self, orders: Iterable[NewOrder]) -> None:
        self._db.write_many(
            "update orders",
            "UPDATE orders SET status = ?, reason = ?, outcome = ?, expires_at = ?"
            " WHERE order_id = ?",
            [(o.status, o.reason, o.outcome, o.expires_at, o.order_id) for o in orders],
        )

    def insert_cancellations(self, cancellations: Iterable[NewCancellation]) -> None:
        rows = list(cancellations)
        inserted = self._db.write_many(
            "insert cancellations",
            "INSERT INTO cancellations (order_id, released, cancelled, at, source)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (order_id) DO NOTHING",
            rows,
        )
        if inserted != len(rows):
            raise _lost("cancellations", len(rows), inserted)

    def insert_steps(self, steps: Iterable[OrderStep]) -> None:
        rows = [
            (s.order_id, s.status, s.trigger, *step_columns(s.events), s.at, s.source)
            for s in steps
        ]
        inserted = self._db.write_many(
            "insert steps",
            "INSERT INTO order_steps (order_id, status, trigger, first, second, at, source)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (order_id, status) DO NOTHING",
            rows,
        )
        if inserted != len(rows):
            raise _lost("order steps", len(rows), inserted)

    def move_orders(self, moves: Iterable[StatusMove]) -> None:
        rows = collapse_moves(moves)
        moved = self._db.write_many(
            "move orders",
            "UPDATE orders SET status = ? WHERE order_id = ? AND status = ?",
            [(m.status, m.order_id, m.expected) for m in rows],
        )
        if moved != len(rows):
            raise _lost("status moves", len(rows), moved)

    def apply_restocks(self, restocks: Iterable[AppliedRestock]) -> None:
        rows = list(restocks)
        # a restock of an open reorder closes it; one of an unknown id is recorded applied
        applied = self._db.write_many(
            "apply restocks",
            "INSERT INTO reorders (restock_id, sku, quantity, opened_at, due_at, applied_at,"
            " source) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (restock_id) DO UPDATE"
            " SET applied_at = excluded.applied_at, source = excluded.source"
            " WHERE reorders.applied_at IS NULL",
            [(r.restock_id, r.sku, r.quantity, r.at, r.at, r.at, r.source) for r in rows],
        )
        if applied != len(rows):
            raise _lost("restocks", len(rows), applied)
        self._db.write_many(
            "restock movements",
            "INSERT INTO stock_movements (sku, kind, quantity, at) VALUES (?, 'restock', ?, ?)",
            [(r.sku, r.quantity, r.at) for r in rows],
        )

    def insert_reorders(self, reorders: Iterable[Reorder]) -> int:
        # DO NOTHING on any conflict: the one-open-per-sku index too (opened meanwhile)
        return self._db.write_many(
            "insert reorders",
            "INSERT INTO reorders (restock_id, sku, quantity, opened_at, due_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [tuple(r) for r in reorders],
        )


def _lost(what: str, wanted: int, stored: int) -> StoreConflictError:
    return StoreConflictError(
        f"inventory db: {wanted - stored} of {wanted} {what} recorded meanwhile by another"
        " process; the batch is run again"
    )
