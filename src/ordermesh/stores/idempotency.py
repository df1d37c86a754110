"""The API's idempotency keys: (client, ``Idempotency-Key``) -> (body hash, order id).

``IdempotencyStore`` is the contract; ``stores/sqlite_idempotency.py`` implements it on a
SQLite file, ``stores/factory.py`` picks the implementation. How the API uses the keys
(scopes, derived order ids, why keys are kept for good) is in ``api/idempotency.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class KeyRecord(NamedTuple):
    client: str
    key: str
    body_hash: str
    order_id: str
    created_at: float
    acked_at: float | None


class IdempotencyStore(Protocol):
    """Idempotency keys; safe to share between threads (the API's worker threads).

    Database failures raise ``StoreError``.
    """

    def reserve(
        self, client: str, key: str, body_hash: str, order_id: str, created_at: float
    ) -> KeyRecord:
        """Insert the client's key unless present; the record stored for it (maybe a twin's).

        Atomic across API processes: of two concurrent reservations of one key, both get
        the record of whichever was stored first.
        """
        ...

    def mark_acked(self, client: str, key: str, at: float) -> bool:
        """Record the ack; True if this was the first (the order was accepted just now)."""
        ...

    def get(self, client: str, key: str) -> KeyRecord | None: ...

    def ping(self) -> None:
        """Raise StoreError unless the database answers and holds the keys' table."""
        ...

    def close(self) -> None: ...
