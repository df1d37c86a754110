"""``IdempotencyStore`` on a SQLite file (``api.db``); see ``stores/idempotency.py``.

One connection shared by the API's worker threads behind the database's lock; WAL with
``synchronous=NORMAL``: a reservation survives the API being killed (kill -9), and a
reservation lost to a power cut is harmless (every attempt for one key produces the
identical record, see ``api/idempotency.py``).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Final

from ordermesh.errors import StoreError
from ordermesh.stores.idempotency import KeyRecord
from ordermesh.stores.sqlite import Migration, SqliteDatabase, statements

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S: Final = 10.0

_COLUMNS: Final = "client, idempotency_key, body_hash, order_id, created_at, acked_at"
_SELECT_KEY: Final = (
    f"SELECT {_COLUMNS} FROM idempotency_keys WHERE client = ? AND idempotency_key = ?"
)
_SCOPED_TABLE: Final = """
    CREATE TABLE idempotency_keys (
        client TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        order_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        acked_at REAL,
        PRIMARY KEY (client, idempotency_key)
    )
"""


def _scope_keys(conn: sqlite3.Connection) -> None:
    """Keys of the first release were global; they become the keys of client ``""``
    (what a server without API keys uses)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(idempotency_keys)")}
    if "client" in columns:  # a file from before versioning, scoped already
        return
    statements(
        "ALTER TABLE idempotency_keys RENAME TO idempotency_keys_unscoped",
        _SCOPED_TABLE,
        f"INSERT INTO idempotency_keys ({_COLUMNS}) SELECT '', idempotency_key, body_hash,"
        " order_id, created_at, acked_at FROM idempotency_keys_unscoped",
        "DROP TABLE idempotency_keys_unscoped",
    )(conn)


# Append only: the n-th step brings a database to schema version n (stores/sqlite.py).
MIGRATIONS: Final = (
    Migration(
        "idempotency keys",
        statements(
            """
            CREATE TABLE IF NOT EXISTS idempotency_keys (
                idempotency_key TEXT PRIMARY KEY,
                body_hash TEXT NOT NULL,
                order_id TEXT NOT NULL,
                created_at REAL NOT NULL,
                acked_at REAL
            )
            """
        ),
    ),
    Migration("idempotency keys scoped per client", _scope_keys),
)


class SqliteIdempotencyStore:
    """Idempotency keys of the API in a SQLite file; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteDatabase(
            path,
            name="api",
            migrations=MIGRATIONS,
            synchronous="NORMAL",
            busy_timeout_s=BUSY_TIMEOUT_S,
        )
        self._db.connection()

    def reserve(
        self, client: str, key: str, body_hash: str, order_id: str, created_at: float
    ) -> KeyRecord:
        db = self._db
        with db.lock, db.translate("reserve key"):
            conn = db.connection()
            # one statement each, both autocommit: the INSERT is atomic across API
            # processes, and whoever lost the race reads the winner's row
            conn.execute(
                "INSERT INTO idempotency_keys"
                " (client, idempotency_key, body_hash, order_id, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (client, idempotency_key) DO NOTHING",
                (client, key, body_hash, order_id, created_at),
            )
            row = conn.execute(_SELECT_KEY, (client, key)).fetchone()
        if row is None:  # cannot happen short of someone deleting rows under us
            raise StoreError(f"{db.label}: key vanished after insert")
        return KeyRecord(*row)

    def mark_acked(self, client: str, key: str, at: float) -> bool:
        db = self._db
        with db.lock, db.translate("mark key acknowledged"):
            cursor = db.connection().execute(
                "UPDATE idempotency_keys SET acked_at = ?"
                " WHERE client = ? AND idempotency_key = ? AND acked_at IS NULL",
                (at, client, key),
            )
        return bool(cursor.rowcount == 1)

    def get(self, client: str, key: str) -> KeyRecord | None:
        db = self._db
        with db.lock, db.translate("read key"):
            row = db.connection().execute(_SELECT_KEY, (client, key)).fetchone()
        return None if row is None else KeyRecord(*row)

    def ping(self) -> None:
        db = self._db
        with db.lock, db.translate("ping"):
            db.connection().execute("SELECT 1 FROM idempotency_keys LIMIT 1").fetchall()

    def close(self) -> None:
        self._db.close()
