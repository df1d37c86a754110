"""``FulfilmentStore`` on PostgreSQL, shared by every fulfilment instance; see
``stores/fulfilment.py`` and ``stores/postgres.py`` (pool, migrations).

Tables ``shipments`` and ``outbox`` in the ``fulfilment`` schema. ``load`` inside a
transaction locks its rows (``FOR UPDATE``, in order_id order); ``claim_due`` takes due
shipments with ``FOR UPDATE SKIP LOCKED``, so instances shipping at once split them and
each shipment is marked ready, with its one event, by one of them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from typing import Final

from ordermesh.stores.fulfilment import ShipmentRow
from ordermesh.stores.outbox import POSTGRES_TABLE, OutboxRecord, OutboxRow, PostgresOutbox
from ordermesh.stores.postgres import PgMigration, PostgresDatabase

SCHEMA: Final = "fulfilment"
_COLUMN_LIST: Final = ", ".join(ShipmentRow._fields)

# Append only: the n-th step brings the schema to version n (stores/postgres.py).
MIGRATIONS: Final = (
    PgMigration(
        "shipments and their outbox",
        (
            """
            CREATE TABLE shipments (
                order_id TEXT PRIMARY KEY,
                shipment_id TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('scheduled', 'ready', 'dropped')),
                due_at DOUBLE PRECISION NOT NULL,
                paid_at DOUBLE PRECISION NOT NULL,
                done_at DOUBLE PRECISION NOT NULL
            )
            """,
            "CREATE INDEX shipments_due ON shipments (due_at) WHERE state = 'scheduled'",
            *POSTGRES_TABLE,
        ),
    ),
)

_UPSERT: Final = (
    f"INSERT INTO shipments ({_COLUMN_LIST}) VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (order_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in ShipmentRow._fields[1:])
)


class PostgresFulfilmentStore:
    """Shipments and their outbox in PostgreSQL; one object per thread."""

    def __init__(self, url: str, *, pool_size: int = 2) -> None:
        self._db = PostgresDatabase(url, name=SCHEMA, migrations=MIGRATIONS, max_size=pool_size)
        self.label = self._db.label
        self._outbox = PostgresOutbox(self._db)

    def transaction(self) -> AbstractContextManager[None]:
        return self._db.transaction()

    def load(self, order_ids: Collection[str]) -> dict[str, ShipmentRow]:
        if not order_ids:
            return {}
        lock = " ORDER BY order_id FOR UPDATE" if self._db.in_transaction else ""
        with self._db.reader("load shipments") as conn:
            rows = conn.execute(
                f"SELECT {_COLUMN_LIST} FROM shipments WHERE order_id = ANY(%s){lock}",
                (sorted(order_ids),),
            ).fetchall()
        return {row[0]: ShipmentRow(*row) for row in rows}

    def save(self, rows: Sequence[ShipmentRow]) -> None:
        if not rows:
            return
        conn = self._db.writer()
        with self._db.translate("save shipments"), conn.cursor() as cur:
            cur.executemany(_UPSERT, [tuple(r) for r in sorted(rows)])

    def claim_due(self, now: float, limit: int) -> list[ShipmentRow]:
        conn = self._db.writer()
        with self._db.translate("claim due shipments"):
            rows = conn.execute(
                f"SELECT {_COLUMN_LIST} FROM shipments WHERE state = 'scheduled'"
                " AND due_at <= %s ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (now, limit),
            ).fetchall()
        return [ShipmentRow(*row) for row in rows]

    def add_outbox(self, records: Sequence[OutboxRecord], now: float) -> None:
        self._outbox.add(records, now)

    def scheduled_count(self) -> int:
        with self._db.reader("count scheduled shipments") as conn:
            row = conn.execute(
                "SELECT count(*) FROM shipments WHERE state = 'scheduled'"
            ).fetchone()
        return int(row[0]) if row else 0

    # --- outbox ---------------------------------------------------------------------

    def claim_outbox(self, now: float, lease_s: float, limit: int) -> list[OutboxRow]:
        return self._outbox.claim(now, lease_s, limit)

    def mark_published(self, ids: Sequence[int], now: float) -> None:
        self._outbox.mark_published(ids, now)

    def release_outbox(self, ids: Sequence[int]) -> None:
        self._outbox.release(ids)

    def unpublished_count(self) -> int:
        return self._outbox.unpublished_count()

    def close(self) -> None:
        self._db.close()
