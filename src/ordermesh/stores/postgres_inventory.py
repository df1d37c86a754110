"""``InventoryStore`` on PostgreSQL, shared by every inventory instance; see
``stores/inventory.py`` (what is kept) and ``stores/postgres.py`` (pool, migrations).

Tables as in SQLite (``stock``, ``stock_movements``, ``orders``, ``cancellations``), in
the ``inventory`` schema. How N instances on N hosts stay correct, and why they do not
wait for each other long:

- The core reads a batch's known orders and stock without locks and decides on them;
  then it runs one ``transaction()`` (READ COMMITTED) that inserts the orders, locks the
  batch's stock rows, checks its decisions against the locked rows and writes the stock.
- A decision is recorded with ``INSERT ... ON CONFLICT (order_id) DO NOTHING``, before any
  stock row is locked. If an instance that saw the same order (a rebalance hands a
  partition over while a batch is in flight) stored it first, fewer rows are inserted:
  ``StoreConflictError``, the batch rolls back and the core runs it again from scratch,
  which re-reads the order and re-emits the stored bytes. Cancellations alike
  (``cancellations``' primary key). Two instances inserting the same orders insert them
  in ``order_id`` order, so the second waits for the first instead of deadlocking.
- ``load_stock`` inside the transaction locks the rows with
  ``SELECT ... ORDER BY sku FOR UPDATE``: every instance takes its locks in the same
  global order, so two batches over overlapping skus queue up instead of deadlocking.
  The locks are taken last and held only for the check, one ``UPDATE`` and the commit:
  hot skus are in nearly every batch, so this hold time is what instances take turns on
  (and why the statements that take or read the locks are shaped as they are, below).
- A deadlock or serialization failure anyway (an operator's restock, a lock order not
  foreseen) is a ``StoreConflictError`` too: the same whole-batch retry.
- Every batch statement is set-based (reads joined with an array, ``unnest`` writes),
  its arrays sent in binary (a text ``bytea[]`` of 5000 outcomes costs the server more to
  parse than the insert itself): a batch costs the same handful of round trips whatever
  its size.
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

# Joins with the sku array, not ``sku = ANY(...)``. psycopg prepares a statement that
# runs often, and PostgreSQL's generic plan for it then tests ``sku = ANY($1)`` by a pass
# over the whole array for every row (only a constant array gets a hash). That pass also
# runs again for every row another instance updated while this one waited for its lock
# (READ COMMITTED re-checks such a row against the query): about 25 ms per batch of 900
# skus, spent holding the rows locked so far. Joined, a re-check is one comparison.
_LOAD_STOCK: Final = """
    SELECT s.sku, s.available, s.reserved
    FROM unnest(%b::text[]) AS k (sku) JOIN stock AS s ON s.sku = k.sku
"""
# sorted locks: two instances over overlapping skus queue up, never deadlock
_LOCK_STOCK: Final = _LOAD_STOCK + " ORDER BY s.sku FOR UPDATE OF s"
# One index probe per id, whatever the statistics say: planned as a join (or as
# ``order_id = ANY(...)``), a batch's 5000 ids made the planner scan the whole table
# whenever its statistics lagged behind its growth (a fresh or fast-growing table), and
# that scan grows with every order ever decided. LIMIT 1 keeps the subqueries from being
# flattened into such a join.
_LOAD_ORDERS: Final = """
    SELECT o.order_id, o.status, o.items, o.outcome, c.released, c.cancelled, o.body_hash
    FROM unnest(%b::text[]) AS k (order_id)
    CROSS JOIN LATERAL (SELECT * FROM orders WHERE orders.order_id = k.order_id LIMIT 1) AS o
    LEFT JOIN LATERAL (
        SELECT released, cancelled FROM cancellations
        WHERE cancellations.order_id = o.order_id LIMIT 1
    ) AS c ON true
"""
# %b: binary parameters. ORDER BY: inserting in order_id order, two instances that insert
# the same orders wait for each other rather than deadlock.
_INSERT_ORDERS: Final = """
    INSERT INTO orders (order_id, status, reason, items, outcome, decided_at, source, body_hash)
    SELECT * FROM unnest(
        %b::text[], %b::text[], %b::text[], %b::text[], %b::bytea[], %b::float8[],
        %b::text[], %b::bytea[]
    ) ORDER BY 1
    ON CONFLICT (order_id) DO NOTHING
"""
_UPDATE_ORDERS: Final = """
    UPDATE orders SET status = v.status, reason = v.reason, outcome = v.outcome
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::bytea[])
        AS v (order_id, status, reason, outcome)
    WHERE orders.order_id = v.order_id
"""
_INSERT_CANCELLATIONS: Final = """
    INSERT INTO cancellations (order_id, released, cancelled, at, source)
    SELECT * FROM unnest(%b::text[], %b::bytea[], %b::bytea[], %b::float8[], %b::text[])
    ORDER BY 1
    ON CONFLICT (order_id) DO NOTHING
"""
_UPDATE_STOCK: Final = """
    UPDATE stock SET available = v.available, reserved = v.reserved
    FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) AS v (sku, available, reserved)
    WHERE stock.sku = v.sku
"""


def _lost(what: str, wanted: int, stored: int) -> StoreConflictError:
    return StoreConflictError(
        f"inventory db: {wanted - stored} of {wanted} {what} recorded meanwhile by another"
        " instance; the batch is run again"
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

    # --- batch primitives for the service (writes inside transaction()) ---------------

    def load_stock(self, skus: Collection[str]) -> dict[str, StockRow]:
        if not skus:
            return {}
        query = _LOCK_STOCK if self._db.in_transaction else _LOAD_STOCK
        with self._db.reader("load stock") as conn:
            rows = conn.execute(query, (list(skus),)).fetchall()
        return {row[0]: StockRow(*row) for row in rows}

    def load_orders(self, order_ids: Collection[str]) -> dict[str, KnownOrder]:
        if not order_ids:
            return {}
        with self._db.reader("load orders") as conn:
            rows = conn.execute(_LOAD_ORDERS, (list(order_ids),)).fetchall()
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
                _UPDATE_STOCK,
                (
                    [row.sku for row in ordered],
                    [row.available for row in ordered],
                    [row.reserved for row in ordered],
                ),
            )

    def insert_orders(self, orders: Iterable[NewOrder]) -> None:
        rows = sorted(orders)  # by order_id: the server's sort then finds them in order
        if not rows:
            return
        conn = self._db.writer()
        with self._db.translate("insert orders"):
            inserted = conn.execute(
                _INSERT_ORDERS,
                (
                    [o.order_id for o in rows],
                    [o.status for o in rows],
                    [o.reason for o in rows],
                    [encode_items(o.items) for o in rows],
                    [o.outcome for o in rows],
                    [o.decided_at for o in rows],
                    [o.source for o in rows],
                    [o.body_hash for o in rows],
                ),
            ).rowcount
        if inserted != len(rows):
            raise _lost("orders", len(rows), inserted)

    def update_orders(self, orders: Iterable[NewOrder]) -> None:
        rows = sorted(orders)
        if not rows:
            return
        conn = self._db.writer()
        with self._db.translate("update orders"):
            conn.execute(
                _UPDATE_ORDERS,
                (
                    [o.order_id for o in rows],
                    [o.status for o in rows],
                    [o.reason for o in rows],
                    [o.outcome for o in rows],
                ),
            )

    def insert_cancellations(self, cancellations: Iterable[NewCancellation]) -> None:
        rows = sorted(cancellations)
        if not rows:
            return
        conn = self._db.writer()
        ids = [c.order_id for c in rows]
        with self._db.translate("insert cancellations"):
            inserted = conn.execute(
                _INSERT_CANCELLATIONS,
                (
                    ids,
                    [c.released for c in rows],
                    [c.cancelled for c in rows],
                    [c.at for c in rows],
                    [c.source for c in rows],
                ),
            ).rowcount
            if inserted != len(rows):
                raise _lost("cancellations", len(rows), inserted)
            conn.execute(
                "UPDATE orders SET status = 'CANCELLED'"
                " WHERE order_id = ANY(%b::text[]) AND status = 'RESERVED'",
                (ids,),
            )
