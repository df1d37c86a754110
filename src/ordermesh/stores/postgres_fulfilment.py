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
from ordermesh.stores.order_rows import PostgresOrderRows
from ordermesh.stores.outbox import POSTGRES_TABLE, PostgresOutbox, WithOutbox
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


class PostgresFulfilmentStore(WithOutbox):
    """Shipments and their outbox in PostgreSQL; one object per thread."""

    def __init__(self, url: str, *, pool_size: int = 2) -> None:
        self._db = PostgresDatabase(url, name=SCHEMA, migrations=MIGRATIONS, max_size=pool_size)
        self.label = self._db.label
        self._outbox = PostgresOutbox(self._db)
        self._rows = PostgresOrderRows(
            self._db, "shipments", ShipmentRow._fields, ShipmentRow._make
        )

    def transaction(self) -> AbstractContextManager[None]:
        return self._db.transaction()

    def load(self, order_ids: Collection[str]) -> dict[str, ShipmentRow]:
        return self._rows.load(order_ids)

    def save(self, rows: Sequence[ShipmentRow]) -> None:
        self._rows.save(rows)

    def claim_due(self, now: float, limit: int) -> list[ShipmentRow]:
        conn = self._db.writer()
        with self._db.translate("claim due shipments"):
            rows = conn.execute(
                f"SELECT {_COLUMN_LIST} FROM shipments WHERE state = 'scheduled'"
                " AND due_at <= %s ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (now, limit),
            ).fetchall()
        return [ShipmentRow(*row) for row in rows]

    def scheduled_count(self) -> int:
        return self._rows.count("count scheduled shipments", "state = 'scheduled'")

    def close(self) -> None:
        self._db.close()
