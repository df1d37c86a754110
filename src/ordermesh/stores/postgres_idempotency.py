"""``IdempotencyStore`` on PostgreSQL, shared by every API replica; see
``stores/idempotency.py`` and ``stores/postgres.py`` (pool, migrations).

One table, ``idempotency_keys`` in the ``api`` schema, whose primary key (client, key)
makes a reservation atomic across replicas: ``INSERT ... ON CONFLICT DO NOTHING`` waits
for a concurrent insert of the same key to commit, then does nothing, and the re-read
that follows (a new statement, so a new snapshot) returns the winner's record.
"""

from __future__ import annotations

import logging
from typing import Final

from ordermesh.errors import StoreError
from ordermesh.stores.idempotency import KeyRecord
from ordermesh.stores.postgres import PgMigration, PostgresDatabase

logger = logging.getLogger(__name__)

SCHEMA: Final = "api"

# Append only: the n-th step brings the schema to version n (stores/postgres.py).
MIGRATIONS: Final = (
    PgMigration(
        "idempotency keys scoped per client",
        (
            """
            CREATE TABLE idempotency_keys (
                client TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                body_hash TEXT NOT NULL,
                order_id TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                acked_at DOUBLE PRECISION,
                PRIMARY KEY (client, idempotency_key)
            )
            """,
        ),
    ),
)

_COLUMNS: Final = "client, idempotency_key, body_hash, order_id, created_at, acked_at"
_SELECT_KEY: Final = (
    f"SELECT {_COLUMNS} FROM idempotency_keys WHERE client = %s AND idempotency_key = %s"
)


class PostgresIdempotencyStore:
    """Idempotency keys of the API in PostgreSQL; safe to share between threads."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        """Open the ``api`` schema at ``url``; StoreError unless it is migrated."""
        self._db = PostgresDatabase(url, name=SCHEMA, migrations=MIGRATIONS, max_size=pool_size)
        self.label = self._db.label

    def reserve(
        self, client: str, key: str, body_hash: str, order_id: str, created_at: float
    ) -> KeyRecord:
        with self._db.reader("reserve key") as conn:
            row = conn.execute(
                f"INSERT INTO idempotency_keys ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, NULL)"
                f" ON CONFLICT (client, idempotency_key) DO NOTHING RETURNING {_COLUMNS}",
                (client, key, body_hash, order_id, created_at),
            ).fetchone()
            if row is None:  # a twin stored it first: its record, read in a new snapshot
                row = conn.execute(_SELECT_KEY, (client, key)).fetchone()
        if row is None:  # cannot happen short of someone deleting rows under us
            raise StoreError(f"{self.label}: key vanished after insert")
        return KeyRecord(*row)

    def mark_acked(self, client: str, key: str, at: float) -> bool:
        with self._db.reader("mark key acknowledged") as conn:
            cursor = conn.execute(
                "UPDATE idempotency_keys SET acked_at = %s"
                " WHERE client = %s AND idempotency_key = %s AND acked_at IS NULL",
                (at, client, key),
            )
        return cursor.rowcount == 1

    def get(self, client: str, key: str) -> KeyRecord | None:
        with self._db.reader("read key") as conn:
            row = conn.execute(_SELECT_KEY, (client, key)).fetchone()
        return None if row is None else KeyRecord(*row)

    def ping(self) -> None:
        with self._db.reader("ping") as conn:
            conn.execute("SELECT 1 FROM idempotency_keys LIMIT 1").fetchall()

    def close(self) -> None:
        self._db.close()
