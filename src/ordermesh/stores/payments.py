"""The payments database: one row per order, its money's state and the work still due.

``PaymentsStore`` is the contract (``stores/sqlite_payments.py``,
``stores/postgres_payments.py`` implement it; ``stores/factory.py`` picks one). What the
columns mean, and which operation a row still needs, is decided in
``services/payments.py``; the store only keeps rows, hands out due work under a lease,
and holds the outbox (``stores/outbox.py``) written in the same transactions.

Two users, each with its own store object (its own connection): the batch handler
records intents (``load`` + ``save`` inside ``transaction()``), the worker claims due
work (``claim``), then records outcomes (``load`` + ``save`` + ``add_outbox`` inside
``transaction()``). Inside a transaction ``load`` locks the rows it returns (SQLite: the
whole file, ``BEGIN IMMEDIATE``; PostgreSQL: ``FOR UPDATE``), so the two never decide on
a stale copy of one order.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from typing import Final, Literal, NamedTuple, Protocol, get_args

from ordermesh.gateway.protocol import Operation
from ordermesh.stores.outbox import OutboxRecord, OutboxStore

# pending: the authorization is not decided yet; abandoned: the order ended before it was
# ever tried (never started, never will); failed: the gateway refused a capture, void or
# refund (an operator's case, logged at ERROR)
PaymentState = Literal[
    "pending", "authorized", "declined", "captured", "voided", "refunded", "abandoned", "failed"
]
PAYMENT_STATES: Final[tuple[PaymentState, ...]] = get_args(PaymentState)
# what the order's events asked for so far; it only moves forward
Goal = Literal["authorized", "captured", "closed"]
GOAL_RANK: Final[dict[Goal, int]] = {"authorized": 0, "captured": 1, "closed": 2}


class PaymentRow(NamedTuple):
    order_id: str
    amount_cents: int
    currency: str
    customer_id: str
    card: str
    state: PaymentState
    goal: Goal
    # why the order closed (CANCELLED, EXPIRED); "" while it has not
    cause: str
    authorization_id: str
    # whether an authorize was ever sent (claimed): a closed order that never started
    # is never authorized, one that did is voided once the authorization lands
    started: bool
    # the next gateway operation the row needs (None: nothing to do)
    op: Operation | None
    # failed tries of ``op`` in a row, and when it may be tried again
    attempts: int
    due_at: float
    # the lease of the worker performing ``op``; its token tells its outcome is still
    # the one to record (a lease that ran out may have been taken over)
    claimed_until: float
    claim_token: str
    created_at: float
    updated_at: float


class PaymentsStore(OutboxStore, Protocol):
    """The payments database, used by one thread at a time per store object.

    Failures raise ``StoreError``; writes outside ``transaction()`` raise it too.
    """

    def transaction(self) -> AbstractContextManager[None]:
        """One atomic write transaction (exclusive per row across instances)."""
        ...

    def load(self, order_ids: Collection[str]) -> dict[str, PaymentRow]:
        """The stored rows of these orders (locked, inside a transaction)."""
        ...

    def save(self, rows: Sequence[PaymentRow]) -> None:
        """Insert or replace these rows; inside ``transaction()``."""
        ...

    def add_outbox(self, records: Sequence[OutboxRecord], now: float) -> None:
        """Record events to publish; inside ``transaction()``."""
        ...

    def claim(self, now: float, lease_s: float, limit: int, token: str) -> list[PaymentRow]:
        """Up to ``limit`` rows with an ``op`` due by ``now`` and no live lease, earliest
        due first; each now leased to ``token`` until ``now + lease_s`` (and
        ``started`` when its op is an authorize). Its own transaction."""
        ...

    def due_count(self) -> int:
        """Rows with an op still to perform (due now or waiting for a retry)."""
        ...

    def close(self) -> None: ...
