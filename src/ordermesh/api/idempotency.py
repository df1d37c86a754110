"""Idempotency keys of the API: (client, ``Idempotency-Key``) -> (body hash, order id).

The keys live in an ``IdempotencyStore`` (``stores/idempotency.py``; ``api.db`` by
default); this module holds what the API decides about them.

Keys are scoped per client: with API keys configured, the client is a digest of the API
key that authenticated the request (``client_for_api_key``; the key itself is never
stored), so two clients choosing the same Idempotency-Key get two orders and neither
learns of the other's. Without API keys every request is the one client ``""``.

A keyed POST reserves its key *before* producing (``reserve``) and marks it acknowledged
after Kafka acked (``mark_acked``). The order id is derived from the key
(``order_id_for_key``, from the client and the key) and the reservation keeps the order's
``created_at``, so every attempt for one key produces the identical record: a crash
between producing and recording, or two concurrent requests with the same key, at worst
produce the same ``OrderPlaced`` twice, which the inventory (idempotent per order_id)
decides once.

Keys are kept for good: since the order id is a function of the key, forgetting a key
and accepting it again for another body would hand out an existing order's id.
"""

from __future__ import annotations

import hashlib
from typing import Final

MAX_KEY_LENGTH: Final = 255


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
