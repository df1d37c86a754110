"""``InventoryStore`` on PostgreSQL, shared by every inventory instance; see
``stores/inventory.py`` (what is kept) and ``stores/postgres.py`` (pool, migrations).

Tables as in SQLite (``stock``, ``stock_movements``, ``orders``, ``cancellations``), in
the ``inventory`` schema. How N instances on N hosts stay correct:

- The core runs a batch in one ``transaction()`` (READ COMMITTED). ``load_stock`` locks
  the batch's stock rows with ``SELECT ... ORDER BY sku FOR UPDATE``: every instance
  takes its locks in the same global order, so two batches over overlapping skus queue
  up instead of deadlocking, and each reads the stock as the previous one left it.
- A decision is recorded with ``INSERT ... ON CONFLICT (order_id) DO NOTHING``. If an
  instance that saw the same order (a rebalance hands a partition over while a batch is
  in flight) stored it first, fewer rows come back: ``StoreConflictError``, the batch
  rolls back and the core runs it again from scratch, which re-reads the order and
  re-emits the stored bytes. Cancellations alike (``cancellations``' primary key).
- A deadlock or serialization failure anyway (an operator's restock, a lock order not
  foreseen) is a ``StoreConflictError`` too: the same whole-batch retry.
- Every batch statement is set-based (``= ANY(array)`` reads, ``unnest`` writes): a batch
  costs the same handful of round trips whatever its size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Final

from ordermesh.errors import StoreConflictError
from ordermesh.stores.inventory import (
    MAX_STOCK,
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
from ordermesh.stores.postgres import PgMigration, PostgresDatabase

logger = logging.getLogger(__name__)

SCHEMA: Final = "inventory"

# Append only: the n-th step brings the schema to version n (stores/postgres.py).
MIGRATIONS: Final = (
    PgMigration(
        "stock, stock movements, orders and cancellations",
        (
            """
            CREATE TABLE stock (
                sku TEXT PRIMARY KEY,
                available BIGINT NOT NULL CHECK (available >= 0),
                reserved BIGINT NOT NULL CHECK (reserved >= 0)
            )
            """,
            """
            CREATE TABLE stock_movements (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                sku TEXT NOT NULL,
                kind TEXT NOT NULL CHECK (kind IN ('seed', 'restock')),
                quantity BIGINT NOT NULL CHECK (quantity >= 0),
                at DOUBLE PRECISION NOT NULL
            )
            """,
            """
            CREATE TABLE orders (
                order_id TEXT PRIMARY KEY,
                status TEXT NOT NULL CHECK (status IN ('RESERVED', 'REJECTED', 'CANCELLED')),
                reason TEXT,
                items TEXT NOT NULL,
                outcome BYTEA NOT NULL,
                decided_at DOUBLE PRECISION NOT NULL,
                source TEXT,
                body_hash BYTEA
            )
            """,
            """
            CREATE TABLE cancellations (
                order_id TEXT PRIMARY KEY REFERENCES orders (order_id),
                released BYTEA NOT NULL,
                cancelled BYTEA NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                source TEXT
            )
            """,
        ),
    ),
)

_INSERT_ORDERS: Final = """
    INSERT INTO orders (order_id, status, reason, items, outcome, decided_at, source, body_hash)
    SELECT * FROM unnest(
        %s::text[], %s::text[], %s::text[], %s::text[], %s::bytea[], %s::float8[],
        %s::text[], %s::bytea[]
    ) ORDER BY 1
    ON CONFLICT (order_id) DO NOTHING
    RETURNING order_id
"""
_INSERT_CANCELLATIONS: Final = """
    INSERT INTO cancellations (order_id, released, cancelled, at, source)
    SELECT * FROM unnest(%s::text[], %s::bytea[], %s::bytea[], %s::float8[], %s::text[])
    ORDER BY 1
    ON CONFLICT (order_id) DO NOTHING
    RETURNING order_id
"""


def _lost(what: str, wanted: list[str], stored: Iterable[tuple[str]]) -> StoreConflictError:
    missing = sorted(set(wanted) - {row[0] for row in stored})
    return StoreConflictError(
        f"inventory db: {len(missing)} {what} recorded meanwhile by another instance"
        f" (first: {missing[0]!r}); the batch is run again"
    )


class PostgresInventoryStore:
    """The inventory database on a PostgreSQL pool; one thread at a time."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
        pool_size: int = 2,
    ) -> None:
        """Open the ``inventory`` schema at ``url``; StoreError unless it is migrated.

        ``readonly`` (``verify``) only promises not to write: every open checks the
        schema version and none migrates (``ordermesh db migrate`` does).
        """
        self._clock = clock
        self.readonly = readonly
        self._db = PostgresDatabase(url, name=SCHEMA, migrations=MIGRATIONS, max_size=pool_size)
        self.label = self._db.label

    def transaction(self) -> AbstractContextManager[None]:
        return self._db.transaction()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PostgresInventoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- operator commands ------------------------------------------------------------

    def seed(self, skus: Mapping[str, int]) -> int:
        check_seed(skus)
        now = self._clock()
        names = sorted(skus)
        with self._db.transaction(), self._db.translate("seed"):
            conn = self._db.writer()
            created = conn.execute(
                "INSERT INTO stock (sku, available, reserved)"
                " SELECT sku, quantity, 0 FROM unnest(%s::text[], %s::bigint[])"
                " AS v (sku, quantity) ORDER BY sku"
                " ON CONFLICT (sku) DO NOTHING RETURNING sku, available",
                (names, [skus[sku] for sku in names]),
            ).fetchall()
            if created:
                conn.execute(
                    "INSERT INTO stock_movements (sku, kind, quantity, at)"
                    " SELECT sku, 'seed', quantity, %s"
                    " FROM unnest(%s::text[], %s::bigint[]) AS v (sku, quantity)",
                    (now, [row[0] for row in created], [row[1] for row in created]),
                )
        logger.info("%s: seeded %d new skus of %d", self.label, len(created), len(skus))
        return len(created)

    def restock(self, sku: str, quantity: int) -> StockRow:
        check_restock(sku, quantity, None)
        with self._db.transaction(), self._db.translate("restock"):
            conn = self._db.writer()
            held = conn.execute(
                "SELECT available + reserved FROM stock WHERE sku = %s FOR UPDATE", (sku,)
            ).fetchone()
            check_restock(sku, quantity, None if held is None else int(held[0]))
            row = conn.execute(
                "INSERT INTO stock (sku, available, reserved) VALUES (%s, %s, 0)"
                " ON CONFLICT (sku) DO UPDATE SET available = stock.available + excluded.available"
                " RETURNING sku, available, reserved",
                (sku, quantity),
            ).fetchone()
            assert row is not None  # an upsert returns its row
            if row[1] + row[2] > MAX_STOCK:  # created meanwhile by a concurrent restock
                check_restock(sku, quantity, row[1] + row[2] - quantity)
            conn.execute(
                "INSERT INTO stock_movements (sku, kind, quantity, at)"
                " VALUES (%s, 'restock', %s, %s)",
                (sku, quantity, self._clock()),
            )
        logger.info("%s: restocked %s by %d", self.label, sku, quantity)
        return StockRow(*row)

    # --- reads for operators and verify ---------------------------------------------

    def stock(self, sku: str | None = None) -> list[StockRow]:
        with self._db.reader("read stock") as conn:
            if sku is None:
                rows = conn.execute(
                    "SELECT sku, available, reserved FROM stock ORDER BY sku"
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT sku, available, reserved FROM stock WHERE sku = %s", (sku,)
                ).fetchall()
        return [StockRow(*row) for row in rows]

    def movements_total(self) -> dict[str, int]:
        with self._db.reader("read movements") as conn:
            rows = conn.execute(
                "SELECT sku, SUM(quantity) FROM stock_movements GROUP BY sku"
            ).fetchall()
        return {sku: int(total) for sku, total in rows}

    def order_outcomes(self) -> dict[str, OrderOutcome]:
        with self._db.reader("read orders") as conn:
            rows = conn.execute("SELECT order_id, status, items FROM orders").fetchall()
        return {
            order_id: OrderOutcome(status, decode_items(items)) for order_id, status, items in rows
        }

    # --- batch primitives for the service (call inside transaction()) -----------------

    def load_stock(self, skus: Collection[str]) -> dict[str, StockRow]:
        if not skus:
            return {}
        # sorted locks: two instances over overlapping skus queue up, never deadlock
        lock = " ORDER BY sku FOR UPDATE" if self._db.in_transaction else ""
        with self._db.reader("load stock") as conn:
            rows = conn.execute(
                "SELECT sku, available, reserved FROM stock WHERE sku = ANY(%s)" + lock,
                (list(skus),),
            ).fetchall()
        return {row[0]: StockRow(*row) for row in rows}

    def load_orders(self, order_ids: Collection[str]) -> dict[str, KnownOrder]:
        if not order_ids:
            return {}
        with self._db.reader("load orders") as conn:
            rows = conn.execute(
                "SELECT o.order_id, o.status, o.items, o.outcome, c.released, c.cancelled,"
                " o.body_hash"
                " FROM orders o LEFT JOIN cancellations c ON c.order_id = o.order_id"
                " WHERE o.order_id = ANY(%s)",
                (list(order_ids),),
            ).fetchall()
        known: dict[str, KnownOrder] = {}
        for order_id, status, items, outcome, released, cancelled, body_hash in rows:
            cancel = None if released is None else (bytes(released), bytes(cancelled))
            digest = None if body_hash is None else bytes(body_hash)
            known[order_id] = KnownOrder(
                status, decode_items(items), bytes(outcome), cancel, digest
            )
        return known

    def update_stock(self, rows: Iterable[StockRow]) -> None:
        ordered = sorted(rows)
        if not ordered:
            return
        conn = self._db.writer()
        with self._db.translate("update stock"):
            conn.execute(
                "UPDATE stock SET available = v.available, reserved = v.reserved"
                " FROM unnest(%s::text[], %s::bigint[], %s::bigint[])"
                " AS v (sku, available, reserved) WHERE stock.sku = v.sku",
                (
                    [row.sku for row in ordered],
                    [row.available for row in ordered],
                    [row.reserved for row in ordered],
                ),
            )

    def insert_orders(self, orders: Iterable[NewOrder]) -> None:
        rows = list(orders)
        if not rows:
            return
        conn = self._db.writer()
        ids = [o.order_id for o in rows]
        with self._db.translate("insert orders"):
            stored = conn.execute(
                _INSERT_ORDERS,
                (
                    ids,
                    [o.status for o in rows],
                    [o.reason for o in rows],
                    [encode_items(o.items) for o in rows],
                    [o.outcome for o in rows],
                    [o.decided_at for o in rows],
                    [o.source for o in rows],
                    [o.body_hash for o in rows],
                ),
            ).fetchall()
        if len(stored) != len(rows):
            raise _lost("orders", ids, stored)

    def insert_cancellations(self, cancellations: Iterable[NewCancellation]) -> None:
        rows = list(cancellations)
        if not rows:
            return
        conn = self._db.writer()
        ids = [c.order_id for c in rows]
        with self._db.translate("insert cancellations"):
            stored = conn.execute(
                _INSERT_CANCELLATIONS,
                (
                    ids,
                    [c.released for c in rows],
                    [c.cancelled for c in rows],
                    [c.at for c in rows],
                    [c.source for c in rows],
                ),
            ).fetchall()
            if len(stored) != len(rows):
                raise _lost("cancellations", ids, stored)
            conn.execute(
                "UPDATE orders SET status = 'CANCELLED'"
                " WHERE order_id = ANY(%s) AND status = 'RESERVED'",
                (ids,),
            )
