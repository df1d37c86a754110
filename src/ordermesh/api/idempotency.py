"""The API's own small SQLite DB: (client, ``Idempotency-Key``) -> (body hash, order id).

Keys are scoped per client: with API keys configured, the client is a digest of the API
key that authenticated the request (``client_for_api_key``; the key itself is never
stored), so two clients choosing the same Idempotency-Key get two orders and neither
learns of the other's. Without API keys every request is the one client ``""``.

A keyed POST reserves its key *before* producing (``reserve``) and marks it acknowledged
after Kafka acked (``mark_acked``). The order id is derived from the key
(``order_id_for_key``, from the client and the key) and the reservation keeps the order's
``created_at``, so every
attempt for one key produces the identical record: a crash between producing and
recording, or two concurrent requests with the same key, at worst produce the same
``OrderPlaced`` twice, which the inventory (idempotent per order_id) decides once.

Keys are kept for good: since the order id is a function of the key, forgetting a key
and accepting it again for another body would hand out an existing order's id.

One connection shared by the API's worker threads behind a lock; WAL with
``synchronous=NORMAL``: a reservation survives the API being killed (kill -9), and a
reservation lost to a power cut is harmless for the reason above.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final, NamedTuple

from ordermesh.errors import StoreError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S: Final = 10.0
MAX_KEY_LENGTH: Final = 255

_SCHEMA: Final = """
    CREATE TABLE IF NOT EXISTS idempotency_keys (
        client TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        order_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        acked_at REAL,
        PRIMARY KEY (client, idempotency_key)
    )
"""
# A table of the first release had no client column (keys were global); moved over as the
# keys of client "" (what a server without API keys uses).
_UPGRADE: Final = (
    "ALTER TABLE idempotency_keys RENAME TO idempotency_keys_unscoped",
    _SCHEMA,
    "INSERT INTO idempotency_keys (client, idempotency_key, body_hash, order_id, created_at,"
    " acked_at) SELECT '', idempotency_key, body_hash, order_id, created_at, acked_at"
    " FROM idempotency_keys_unscoped",
    "DROP TABLE idempotency_keys_unscoped",
)
_COLUMNS: Final = "client, idempotency_key, body_hash, order_id, created_at, acked_at"


class KeyRecord(NamedTuple):
    client: str
    key: str
    body_hash: str
    order_id: str
    created_at: float
    acked_at: float | None


def client_for_api_key(api_key: bytes) -> str:
    """The idempotency scope of an API key: a digest, so the DB never holds the secret."""
    return "key-" + hashlib.sha256(b"ordermesh-idempotency\0" + api_key).hexdigest()[:32]


def order_id_for_key(key: str, client: str = "") -> str:
    """The order id of a keyed POST: a function of client and key alone, so retries agree.

    Client ``""`` (no API keys) hashes the key alone, as the first release did, so ids
    handed out before scoping stay the same.
    """
    scoped = key if not client else f"{client}\0{key}"
    return "ord-" + hashlib.sha256(scoped.encode("utf-8")).hexdigest()[:32]


def valid_key(key: str) -> bool:
    """1..255 visible ASCII characters (what the header spec drafts recommend)."""
    return 0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()


class IdempotencyStore:
    """Idempotency keys of the API; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open api db {path}: {exc}") from exc
        try:
            with self._translate("configure"):
                self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                (mode,) = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if str(mode).lower() != "wal":
                    raise StoreError(f"{path}: cannot switch to WAL journal (got {mode!r})")
                self._conn.execute("PRAGMA synchronous = NORMAL")
                self._create_or_upgrade()
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"api db {self.path}: {what} failed: {exc}") from exc

    def _create_or_upgrade(self) -> None:
        conn = self._conn
        # IMMEDIATE: two API processes opening one old file upgrade it once
        conn.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(idempotency_keys)")}
            if columns and "client" not in columns:
                for statement in _UPGRADE:
                    conn.execute(statement)
                log.info("api db %s: idempotency keys are now scoped per client", self.path)
            else:
                conn.execute(_SCHEMA)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def reserve(
        self, client: str, key: str, body_hash: str, order_id: str, created_at: float
    ) -> KeyRecord:
        """Insert the client's key unless present; the record stored for it (maybe a twin's)."""
        with self._lock, self._translate("reserve key"):
            # one statement each, both autocommit: the INSERT is atomic across API
            # processes, and whoever lost the race reads the winner's row
            self._conn.execute(
                "INSERT INTO idempotency_keys"
                " (client, idempotency_key, body_hash, order_id, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (client, idempotency_key) DO NOTHING",
                (client, key, body_hash, order_id, created_at),
            )
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM idempotency_keys WHERE client = ? AND idempotency_key = ?",
                (client, key),
            ).fetchone()
        if row is None:  # cannot happen short of someone deleting rows under us
            raise StoreError(f"api db {self.path}: key vanished after insert")
        return KeyRecord(*row)

    def mark_acked(self, client: str, key: str, at: float) -> bool:
        """Record the ack; True if this was the first (the order was accepted just now)."""
        with self._lock, self._translate("mark key acknowledged"):
            updated = self._conn.execute(
                "UPDATE idempotency_keys SET acked_at = ?"
                " WHERE client = ? AND idempotency_key = ? AND acked_at IS NULL",
                (at, client, key),
            ).rowcount
        return bool(updated == 1)

    def get(self, client: str, key: str) -> KeyRecord | None:
        with self._lock, self._translate("read key"):
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM idempotency_keys WHERE client = ? AND idempotency_key = ?",
                (client, key),
            ).fetchone()
        return None if row is None else KeyRecord(*row)

    def ping(self) -> None:
        with self._lock, self._translate("ping"):
            self._conn.execute("SELECT 1 FROM idempotency_keys LIMIT 1").fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
