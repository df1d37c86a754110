"""``InventoryStore`` on PostgreSQL, shared by every inventory instance; see
``stores/inventory.py`` (what is kept) and ``stores/postgres.py`` (pool, migrations).

Tables as in SQLite (``stock``, ``stock_movements``, ``orders``, ``cancellations``,
``order_steps``, ``reorders``), in the ``inventory`` schema. How N instances on N hosts
stay correct, and why they do not wait for each other long:

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
- A status move of a known order (paid, shipped, expired, cancelled) is a
  compare-and-set ``UPDATE ... WHERE status = <as read>``, also before the stock locks:
  an instance that moved the order meanwhile holds its row lock until it commits, after
  which the ``WHERE`` no longer matches, so fewer rows move: ``StoreConflictError``.
- A reorder is opened under the lock of its sku's stock row; a partial unique index
  (one open reorder per sku) backs that up with ``ON CONFLICT DO NOTHING``.
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
    DUE_REORDERS_SQL,
    EXPIRED_RESERVATIONS_SQL,
    MAX_STOCK,
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
    PgMigration(
        "the whole life of an order: paid/shipped stock, deadlines, steps, reorders",
        (
            "ALTER TABLE orders DROP CONSTRAINT orders_status_check",
            """
            ALTER TABLE orders ADD CONSTRAINT orders_status_check CHECK (status IN (
                'RESERVED', 'PAID', 'SHIPPED', 'REJECTED', 'PAYMENT_FAILED', 'EXPIRED',
                'CANCELLED'
            ))
            """,
            # NULL in rows decided before: their reservations hold for ever, as they did
            "ALTER TABLE orders ADD COLUMN expires_at DOUBLE PRECISION",
            # only RESERVED orders have a deadline to watch: the sweep's index holds them
            "CREATE INDEX orders_reserved_expiry ON orders (expires_at) WHERE status = 'RESERVED'",
            """
            ALTER TABLE stock
                ADD COLUMN committed BIGINT NOT NULL DEFAULT 0 CHECK (committed >= 0),
                ADD COLUMN shipped BIGINT NOT NULL DEFAULT 0 CHECK (shipped >= 0)
            """,
            """
            CREATE TABLE order_steps (
                order_id TEXT NOT NULL REFERENCES orders (order_id),
                status TEXT NOT NULL,
                trigger TEXT NOT NULL,
                first BYTEA NOT NULL,
                second BYTEA,
                at DOUBLE PRECISION NOT NULL,
                source TEXT,
                PRIMARY KEY (order_id, status)
            )
            """,
            """
            CREATE TABLE reorders (
                restock_id TEXT PRIMARY KEY,
                sku TEXT NOT NULL,
                quantity BIGINT NOT NULL CHECK (quantity >= 1),
                opened_at DOUBLE PRECISION NOT NULL,
                due_at DOUBLE PRECISION NOT NULL,
                applied_at DOUBLE PRECISION,
                source TEXT
            )
            """,
            "CREATE UNIQUE INDEX reorders_open_sku ON reorders (sku) WHERE applied_at IS NULL",
            "CREATE INDEX reorders_open_due ON reorders (due_at) WHERE applied_at IS NULL",
        ),
    ),
)

_STOCK_COLUMNS: Final = "sku, available, reserved, committed, shipped"

# Joins with the sku array, not ``sku = ANY(...)``. psycopg prepares a statement that
# runs often, and PostgreSQL's generic plan for it then tests ``sku = ANY($1)`` by a pass
# over the whole array for every row (only a constant array gets a hash). That pass also
# runs again for every row another instance updated while this one waited for its lock
# (READ COMMITTED re-checks such a row against the query): about 25 ms per batch of 900
# skus, spent holding the rows locked so far. Joined, a re-check is one comparison.
_LOAD_STOCK: Final = """
    SELECT s.sku, s.available, s.reserved, s.committed, s.shipped
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
    SELECT o.order_id, o.status, o.items, o.outcome, c.released, c.cancelled, o.body_hash,
        o.expires_at
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
    INSERT INTO orders (
        order_id, status, reason, items, outcome, decided_at, source, body_hash, expires_at
    )
    SELECT * FROM unnest(
        %b::text[], %b::text[], %b::text[], %b::text[], %b::bytea[], %b::float8[],
        %b::text[], %b::bytea[], %b::float8[]
    ) ORDER BY 1
    ON CONFLICT (order_id) DO NOTHING
"""
_UPDATE_ORDERS: Final = """
    UPDATE orders SET status = v.status, reason = v.reason, outcome = v.outcome,
        expires_at = v.expires_at
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::bytea[], %b::float8[])
        AS v (order_id, status, reason, outcome, expires_at)
    WHERE orders.order_id = v.order_id
"""
_INSERT_CANCELLATIONS: Final = """
    INSERT INTO cancellations (order_id, released, cancelled, at, source)
    SELECT * FROM unnest(%b::text[], %b::bytea[], %b::bytea[], %b::float8[], %b::text[])
    ORDER BY 1
    ON CONFLICT (order_id) DO NOTHING
"""
_UPDATE_STOCK: Final = """
    UPDATE stock SET available = v.available, reserved = v.reserved,
        committed = v.committed, shipped = v.shipped
    FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[])
        AS v (sku, available, reserved, committed, shipped)
    WHERE stock.sku = v.sku
"""
_LOAD_STEPS: Final = """
    SELECT order_id, status, trigger, first, second, at, source FROM order_steps
    WHERE order_id = ANY(%b::text[]) ORDER BY order_id, at
"""
_INSERT_STEPS: Final = """
    INSERT INTO order_steps (order_id, status, trigger, first, second, at, source)
    SELECT * FROM unnest(
        %b::text[], %b::text[], %b::text[], %b::bytea[], %b::bytea[], %b::float8[], %b::text[]
    ) ORDER BY 1, 2
    ON CONFLICT (order_id, status) DO NOTHING
"""
# compare-and-set: a row another transaction moved (and committed) meanwhile no longer
# matches once its lock is released, so it is not counted
_MOVE_ORDERS: Final = """
    UPDATE orders SET status = v.status
    FROM unnest(%b::text[], %b::text[], %b::text[]) AS v (order_id, expected, status)
    WHERE orders.order_id = v.order_id AND orders.status = v.expected
"""
_APPLY_RESTOCKS: Final = """
    INSERT INTO reorders (restock_id, sku, quantity, opened_at, due_at, applied_at, source)
    SELECT id, sku, quantity, at, at, at, source
    FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::float8[], %b::text[])
        AS v (id, sku, quantity, at, source)
    ORDER BY 1
    ON CONFLICT (restock_id) DO UPDATE SET applied_at = excluded.applied_at,
        source = excluded.source
    WHERE reorders.applied_at IS NULL
"""
_RESTOCK_MOVEMENTS: Final = """
    INSERT INTO stock_movements (sku, kind, quantity, at)
    SELECT sku, 'restock', quantity, at
    FROM unnest(%b::text[], %b::bigint[], %b::float8[]) AS v (sku, quantity, at)
"""
_INSERT_REORDERS: Final = """
    INSERT INTO reorders (restock_id, sku, quantity, opened_at, due_at)
    SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::float8[], %b::float8[])
    ON CONFLICT DO NOTHING
"""
_EXPIRED_RESERVATIONS: Final = EXPIRED_RESERVATIONS_SQL.format(p="%s")
_DUE_REORDERS: Final = DUE_REORDERS_SQL.format(p="%s")
_STOCK_LEVELS: Final = """
    SELECT s.sku,
        COALESCE(SUM(m.quantity) FILTER (WHERE m.kind = 'seed'), 0),
        COALESCE(SUM(m.quantity) FILTER (WHERE m.kind = 'restock'), 0),
        s.available, s.reserved, s.committed, s.shipped
    FROM stock AS s LEFT JOIN stock_movements AS m ON m.sku = s.sku
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
                "SELECT available + reserved + committed FROM stock WHERE sku = %s FOR UPDATE",
                (sku,),
            ).fetchone()
            check_restock(sku, quantity, None if held is None else int(held[0]))
            row = conn.execute(
                "INSERT INTO stock (sku, available, reserved) VALUES (%s, %s, 0)"
                " ON CONFLICT (sku) DO UPDATE SET available = stock.available + excluded.available"
                f" RETURNING {_STOCK_COLUMNS}",
                (sku, quantity),
            ).fetchone()
            assert row is not None  # an upsert returns its row
            held_now = row[1] + row[2] + row[3]
            if held_now > MAX_STOCK:  # created meanwhile by a concurrent restock
                check_restock(sku, quantity, held_now - quantity)
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
                rows = conn.execute(f"SELECT {_STOCK_COLUMNS} FROM stock ORDER BY sku").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_STOCK_COLUMNS} FROM stock WHERE sku = %s", (sku,)
                ).fetchall()
        return [StockRow(*row) for row in rows]

    def stock_levels(self, sku: str | None = None) -> list[StockLevels]:
        with self._db.reader("read stock levels") as conn:
            if sku is None:
                rows = conn.execute(_STOCK_LEVELS + " GROUP BY s.sku ORDER BY s.sku").fetchall()
            else:
                rows = conn.execute(
                    _STOCK_LEVELS + " WHERE s.sku = %s GROUP BY s.sku", (sku,)
                ).fetchall()
        return [StockLevels(*(row[0], *(int(v) for v in row[1:]))) for row in rows]

    def stock_totals(self) -> StockLevels:
        return sum_levels(self.stock_levels())

    def expired_reservations(self, now: float, limit: int) -> list[tuple[str, float]]:
        with self._db.reader("read expired reservations") as conn:
            rows = conn.execute(_EXPIRED_RESERVATIONS, (now, limit)).fetchall()
        return [(order_id, float(at)) for order_id, at in rows]

    def due_reorders(self, now: float, limit: int) -> list[Reorder]:
        with self._db.reader("read due reorders") as conn:
            rows = conn.execute(_DUE_REORDERS, (now, limit)).fetchall()
        return [reorder_of(row) for row in rows]

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
        for order_id, status, items, outcome, released, cancelled, body_hash, expires in rows:
            cancel = None if released is None else (bytes(released), bytes(cancelled))
            digest = None if body_hash is None else bytes(body_hash)
            known[order_id] = KnownOrder(
                status, decode_items(items), bytes(outcome), cancel, digest, expires
            )
        return known

    def load_steps(self, order_ids: Collection[str]) -> dict[str, tuple[OrderStep, ...]]:
        if not order_ids:
            return {}
        with self._db.reader("load steps") as conn:
            rows = conn.execute(_LOAD_STEPS, (list(order_ids),)).fetchall()
        steps: dict[str, tuple[OrderStep, ...]] = {}
        for order_id, status, trigger, first, second, at, source in rows:
            step = OrderStep(
                order_id, status, trigger, decode_step_events(first, second), at, source
            )
            steps[order_id] = (*steps.get(order_id, ()), step)
        return steps

    def applied_restocks(self, restock_ids: Collection[str]) -> set[str]:
        if not restock_ids:
            return set()
        with self._db.reader("load restocks") as conn:
            rows = conn.execute(
                "SELECT restock_id FROM reorders"
                " WHERE restock_id = ANY(%b::text[]) AND applied_at IS NOT NULL",
                (list(restock_ids),),
            ).fetchall()
        return {row[0] for row in rows}

    def open_reorders(self, skus: Collection[str]) -> set[str]:
        if not skus:
            return set()
        with self._db.reader("load reorders") as conn:
            rows = conn.execute(
                "SELECT sku FROM reorders WHERE sku = ANY(%b::text[]) AND applied_at IS NULL",
                (list(skus),),
            ).fetchall()
        return {row[0] for row in rows}

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
                    [row.committed for row in ordered],
                    [row.shipped for row in ordered],
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
                    [o.expires_at for o in rows],
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
                    [o.expires_at for o in rows],
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

    def insert_steps(self, steps: Iterable[OrderStep]) -> None:
        rows = sorted(steps, key=lambda s: (s.order_id, s.status))
        if not rows:
            return
        columns = [step_columns(s.events) for s in rows]
        conn = self._db.writer()
        with self._db.translate("insert steps"):
            inserted = conn.execute(
                _INSERT_STEPS,
                (
                    [s.order_id for s in rows],
                    [s.status for s in rows],
                    [s.trigger for s in rows],
                    [first for first, _ in columns],
                    [second for _, second in columns],
                    [s.at for s in rows],
                    [s.source for s in rows],
                ),
            ).rowcount
        if inserted != len(rows):
            raise _lost("order steps", len(rows), inserted)

    def move_orders(self, moves: Iterable[StatusMove]) -> None:
        rows = collapse_moves(moves)  # by order_id: row locks in one global order
        if not rows:
            return
        conn = self._db.writer()
        with self._db.translate("move orders"):
            moved = conn.execute(
                _MOVE_ORDERS,
                ([m.order_id for m in rows], [m.expected for m in rows], [m.status for m in rows]),
            ).rowcount
        if moved != len(rows):
            raise _lost("status moves", len(rows), moved)

    def apply_restocks(self, restocks: Iterable[AppliedRestock]) -> None:
        rows = sorted(restocks)
        if not rows:
            return
        conn = self._db.writer()
        with self._db.translate("apply restocks"):
            applied = conn.execute(
                _APPLY_RESTOCKS,
                (
                    [r.restock_id for r in rows],
                    [r.sku for r in rows],
                    [r.quantity for r in rows],
                    [r.at for r in rows],
                    [r.source for r in rows],
                ),
            ).rowcount
            if applied != len(rows):
                raise _lost("restocks", len(rows), applied)
            conn.execute(
                _RESTOCK_MOVEMENTS,
                ([r.sku for r in rows], [r.quantity for r in rows], [r.at for r in rows]),
            )

    def insert_reorders(self, reorders: Iterable[Reorder]) -> int:
        rows = sorted(reorders, key=lambda r: r.sku)
        if not rows:
            return 0
        conn = self._db.writer()
        with self._db.translate("insert reorders"):
            return conn.execute(
                _INSERT_REORDERS,
                (
                    [r.restock_id for r in rows],
                    [r.sku for r in rows],
                    [r.quantity for r in rows],
                    [r.opened_at for r in rows],
                    [r.due_at for r in rows],
                ),
            ).rowcount
