"""``InventoryStore`` on a SQLite file (the embedded default); see ``stores/inventory.py``.

Tables (the SQL sticks to what PostgreSQL also accepts, except where a comment says so):
``stock`` (sku, available, reserved), ``stock_movements`` (every seed and restock),
``orders`` (one row per decided order, with its outcome bytes and ``body_hash``) and
``cancellations`` (one row per cancelled order with its two events' bytes). A separate
cancellations table rather than columns of ``orders`` because most orders are never
cancelled, and a cancel has its own time and source offset; ``orders.status`` still says
CANCELLED so one table answers "where is this order".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Final

from ordermesh.errors import StoreConflictError
from ordermesh.stores.inventory import (
    KnownOrder,
    NewCancellation,
    NewOrder,
    OrderOutcome,
    StockRow,
    check_restock,
    check_seed,
    decode_items,
    encode_items,
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
)


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
                "SELECT available + reserved FROM stock WHERE sku = ?", (sku,)
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
                "SELECT sku, available, reserved FROM stock WHERE sku = ?", (sku,)
            ).fetchone()
        logger.info("inventory db %s: restocked %s by %d", self.path, sku, quantity)
        return StockRow(*row)

    # --- reads for operators and verify ---------------------------------------------

    def stock(self, sku: str | None = None) -> list[StockRow]:
        with self._db.read("read stock") as conn:
            if sku is None:
                rows = conn.execute("SELECT sku, available, reserved FROM stock ORDER BY sku")
            else:
                rows = conn.execute(
                    "SELECT sku, available, reserved FROM stock WHERE sku = ?", (sku,)
                )
            return [StockRow(*row) for row in rows]

    def movements_total(self) -> dict[str, int]:
        with self._db.read("read movements") as conn:
            rows = conn.execute(
                "SELECT sku, SUM(quantity) FROM stock_movements GROUP BY sku"
            ).fetchall()
        return {sku: int(total) for sku, total in rows}

    def order_outcomes(self) -> dict[str, OrderOutcome]:
        with self._db.read("read orders") as conn:
            rows = conn.execute("SELECT order_id, status, items FROM orders").fetchall()
        return {
            order_id: OrderOutcome(status, decode_items(items)) for order_id, status, items in rows
        }

    # --- batch primitives for the service (writes inside transaction()) ---------------

    def load_stock(self, skus: Collection[str]) -> dict[str, StockRow]:
        rows = self._db.select_in(
            "SELECT sku, available, reserved FROM stock WHERE sku IN ({marks})", skus
        )
        return {row[0]: StockRow(*row) for row in rows}

    def load_orders(self, order_ids: Collection[str]) -> dict[str, KnownOrder]:
        rows = self._db.select_in(
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
        self._db.write_many(
            "update stock",
            "UPDATE stock SET available = ?, reserved = ? WHERE sku = ?",
            [(row.available, row.reserved, row.sku) for row in rows],
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
            )
            for o in orders
        ]
        inserted = self._db.write_many(
            "insert orders",
            "INSERT INTO orders (order_id, status, reason, items, outcome, decided_at,"
            " source, body_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
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
            "UPDATE orders SET status = ?, reason = ?, outcome = ? WHERE order_id = ?",
            [(o.status, o.reason, o.outcome, o.order_id) for o in orders],
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
        self._db.write_many(
            "cancel orders",
            "UPDATE orders SET status = 'CANCELLED' WHERE order_id = ? AND status = 'RESERVED'",
            [(c.order_id,) for c in rows],
        )


def _lost(what: str, wanted: int, stored: int) -> StoreConflictError:
    return StoreConflictError(
        f"inventory db: {wanted - stored} of {wanted} {what} recorded meanwhile by another"
        " process; the batch is run again"
    )
