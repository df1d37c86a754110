"""The API's own small SQLite DB: ``Idempotency-Key`` -> (body hash, order id).

A keyed POST reserves its key *before* producing (``reserve``) and marks it acknowledged
after Kafka acked (``mark_acked``). The order id is derived from the key
(``order_id_for_key``) and the reservation keeps the order's ``created_at``, so every
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
        idempotency_key TEXT PRIMARY KEY,
        body_hash TEXT NOT NULL,
        order_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        acked_at REAL
    )
"""


class KeyRecord(NamedTuple):
    key: str
    body_hash: str
    order_id: str
    created_at: float
    acked_at: float | None


def order_id_for_key(key: str) -> str:
    """The order id of a keyed POST: a function of the key alone, so retries agree."""
    return "ord-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


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
                self._conn.execute(_SCHEMA)
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"api db {self.path}: {what} failed: {exc}") from exc

    def reserve(self, key: str, body_hash: str, order_id: str, created_at: float) -> KeyRecord:
        """Insert the key unless present; the record stored for it (maybe another's)."""
        with self._lock, self._translate("reserve key"):
            # one statement each, both autocommit: the INSERT is atomic across API
            # processes, and whoever lost the race reads the winner's row
            self._conn.execute(
                "INSERT INTO idempotency_keys (idempotency_key, body_hash, order_id, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
                (key, body_hash, order_id, created_at),
            )
            row = self._conn.execute(
                "SELECT idempotency_key, body_hash, order_id, created_at, acked_at"
                " FROM idempotency_keys WHERE idempotency_key = ?",
                (key,),
            ).fetchone()
        if row is None:  # cannot happen short of someone deleting rows under us
            raise StoreError(f"api db {self.path}: key vanished after insert")
        return KeyRecord(*row)

    def mark_acked(self, key: str, at: float) -> bool:
        """Record the ack; True if this was the first (the order was accepted just now)."""
        with self._lock, self._translate("mark key acknowledged"):
            updated = self._conn.execute(
                "UPDATE idempotency_keys SET acked_at = ?"
                " WHERE idempotency_key = ? AND acked_at IS NULL",
                (at, key),
            ).rowcount
        return bool(updated == 1)

    def get(self, key: str) -> KeyRecord | None:
        with self._lock, self._translate("read key"):
            row = self._conn.execute(
                "SELECT idempotency_key, body_hash, order_id, created_at, acked_at"
                " FROM idempotency_keys WHERE idempotency_key = ?",
                (key,),
            ).fetchone()
        return None if row is None else KeyRecord(*row)

    def ping(self) -> None:
        with self._lock, self._translate("ping"):
            self._conn.execute("SELECT 1 FROM idempotency_keys LIMIT 1").fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
