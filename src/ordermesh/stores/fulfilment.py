"""The fulfilment database: one shipment per paid order, and the outbox.

``FulfilmentStore`` is the contract (``stores/sqlite_fulfilment.py``,
``stores/postgres_fulfilment.py`` implement it; ``stores/factory.py`` picks one). The
batch handler schedules and drops shipments (``load`` + ``save`` in ``transaction()``);
the worker, with its own store object, takes the due ones (``claim_due``), marks them
ready and records their ShipmentReady in the outbox, all in one ``transaction()``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from typing import Final, Literal, NamedTuple, Protocol, get_args

from ordermesh.stores.outbox import OutboxRecord, OutboxStore

# scheduled: picking and packing until due_at; ready: ShipmentReady recorded;
# dropped: the order was cancelled first
ShipmentState = Literal["scheduled", "ready", "dropped"]
SHIPMENT_STATES: Final[tuple[ShipmentState, ...]] = get_args(ShipmentState)


class ShipmentRow(NamedTuple):
    order_id: str
    shipment_id: str
    state: ShipmentState
    # when the parcel is packed (the OrderPaid's ``at`` plus the pick-and-pack delay)
    due_at: float
    paid_at: float
    # when it became ready or was dropped (0: not yet)
    done_at: float


class FulfilmentStore(OutboxStore, Protocol):
    """The fulfilment database, used by one thread at a time per store object.

    Failures raise ``StoreError``; writes outside ``transaction()`` raise it too.
    """

    def transaction(self) -> AbstractContextManager[None]: ...

    def load(self, order_ids: Collection[str]) -> dict[str, ShipmentRow]:
        """The stored shipments of these orders (locked, inside a transaction)."""
        ...

    def save(self, rows: Sequence[ShipmentRow]) -> None:
        """Insert or replace these rows; inside ``transaction()``."""
        ...

    def claim_due(self, now: float, limit: int) -> list[ShipmentRow]:
        """Up to ``limit`` scheduled shipments due by ``now``, earliest first; inside
        ``transaction()``, locked until it ends (others' claims skip them)."""
        ...

    def add_outbox(self, records: Sequence[OutboxRecord], now: float) -> None: ...

    def scheduled_count(self) -> int:
        """Shipments still scheduled (due or not)."""
        ...

    def close(self) -> None: ...
