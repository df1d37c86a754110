"""``FulfilmentStore`` on a SQLite file (``fulfilment.db``); see ``stores/fulfilment.py``.

The batch handler and the worker each open their own store (their own connection) on
the one file; ``BEGIN IMMEDIATE`` makes each transaction exclusive.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Final

from ordermesh.stores.fulfilment import ShipmentRow
from ordermesh.stores.order_rows import SqliteOrderRows
from ordermesh.stores.outbox import SQLITE_TABLE, SqliteOutbox, WithOutbox
from ordermesh.stores.sqlite import Migration, SqliteDatabase, statements

_COLUMN_LIST: Final = ", ".join(ShipmentRow._fields)

# Append only: the n-th step brings a database to schema version n (stores/sqlite.py).
MIGRATIONS: Final = (
    Migration(
        "shipments and their outbox",
        statements(
            """
            CREATE TABLE shipments (
                order_id TEXT PRIMARY KEY,
                shipment_id TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('scheduled', 'ready', 'dropped')),
                due_at REAL NOT NULL,
                paid_at REAL NOT NULL,
                done_at REAL NOT NULL
            )
            """,
            "CREATE INDEX shipments_due ON shipments (due_at) WHERE state = 'scheduled'",
            *SQLITE_TABLE,
        ),
    ),
)


class SqliteFulfilmentStore(WithOutbox):
    """Shipments and their outbox in a SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteDatabase(path, name="fulfilment", migrations=MIGRATIONS)
        self._db.connection()
        self._outbox = SqliteOutbox(self._db)
        self._rows = SqliteOrderRows(self._db, "shipments", ShipmentRow._fields, ShipmentRow._make)

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
                " AND due_at <= ? ORDER BY due_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [ShipmentRow(*row) for row in rows]

    def scheduled_count(self) -> int:
        return self._rows.count("count scheduled shipments", "state = 'scheduled'")

    def close(self) -> None:
        self._db.close()
