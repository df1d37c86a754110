"""The inventory store: what the inventory core, its CLI and ``verify`` need of a database.

``InventoryStore`` is the contract; ``stores/sqlite_inventory.py`` implements it on a
SQLite file, ``stores/factory.py`` picks the implementation from the settings. The rows
here are backend-neutral; no SQL in this module.

What an implementation keeps (every backend the same):

- stock per sku: ``available`` can be reserved; ``reserved`` is held by RESERVED orders.
- stock movements: every unit that entered the system (``seed``, ``restock``).
  Conservation: per sku, ``sum(quantity) == available + reserved``.
- one row per decided order (RESERVED, REJECTED, later CANCELLED) with the exact bytes
  of the outcome event, so a redelivered order re-emits identical bytes, and its
  ``body_hash`` (``schema.order_fingerprint``), so a reused order_id with another body is
  told apart from a redelivery (None in rows decided before the hash was kept).
- one row per cancelled order with the exact bytes of its two events (``StockReleased``,
  ``OrderCancelled``); the order's status says CANCELLED.

Several inventory instances may share one database. The core reads a batch's known
orders and stock without locks, decides, and then writes inside ``transaction()``, which
must make the write-check atomic across processes (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: the stock rows locked by ``load_stock``): it inserts the orders first (an
order another instance recorded meanwhile is a ``StoreConflictError``), then loads the
stock again inside the transaction and checks its decisions against it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Final, Literal, NamedTuple, Protocol

import msgspec

OrderStatus = Literal["RESERVED", "REJECTED", "CANCELLED"]
MovementKind = Literal["seed", "restock"]
Items = tuple[tuple[str, int], ...]

# Most units one sku may hold (available + reserved), and so the largest seed or restock.
# Far below SQLite's 2**63 integer limit, past which a sum silently turns into a float,
# and below 2**53, so every stock figure is also exact as a JSON number / double.
MAX_STOCK: Final = 10**12

_items_decoder: Final = msgspec.json.Decoder(tuple[tuple[str, int], ...])


class StockRow(NamedTuple):
    sku: str
    available: int
    reserved: int


class OrderOutcome(NamedTuple):
    """What ``verify`` needs of one order: its status and the (aggregated) items."""

    status: OrderStatus
    items: Items


class KnownOrder(NamedTuple):
    """An order already decided, as the service needs it to answer a redelivery."""

    status: OrderStatus
    items: Items
    outcome: bytes
    # (StockReleased, OrderCancelled) bytes once the order was cancelled
    cancel_outcome: tuple[bytes, bytes] | None
    # schema.order_fingerprint of the order decided; None if decided before it was kept
    body_hash: bytes | None


class NewOrder(NamedTuple):
    order_id: str
    status: OrderStatus
    reason: str | None
    items: Items
    outcome: bytes
    decided_at: float
    source: str | None
    body_hash: bytes | None = None


class NewCancellation(NamedTuple):
    order_id: str
    released: bytes
    cancelled: bytes
    at: float
    source: str | None


def encode_items(items: Items) -> str:
    """Items as the JSON text stored with an order: ``[["sku", qty], ...]``."""
    return msgspec.json.encode(items).decode()


def decode_items(text: str) -> Items:
    return _items_decoder.decode(text)


def check_seed(skus: Mapping[str, int]) -> None:
    """ValueError unless every sku is named and its quantity is within 0..MAX_STOCK."""
    for sku, quantity in skus.items():
        if not sku or not 0 <= quantity <= MAX_STOCK:
            raise ValueError(f"bad seed {sku!r}: {quantity} (0..{MAX_STOCK})")


def check_restock(sku: str, quantity: int, held: int | None) -> None:
    """ValueError unless adding ``quantity`` to the ``held`` units (None: a new sku) is
    allowed: 1 <= quantity and the sku stays within MAX_STOCK."""
    if not sku or not 1 <= quantity <= MAX_STOCK:
        raise ValueError(f"bad restock {sku!r}: {quantity} (1..{MAX_STOCK})")
    if held is not None and held + quantity > MAX_STOCK:
        raise ValueError(
            f"restock {sku!r} by {quantity}: it holds {held}, and would exceed"
            f" the maximum stock {MAX_STOCK}"
        )


class InventoryStore(Protocol):
    """The inventory database, used by one thread at a time.

    Failures of the database raise ``StoreError``; the batch primitives that write must
    be called inside ``transaction()`` (writes outside one raise ``StoreError``), and
    reads inside one see its writes.
    """

    # --- the core's batch: one transaction, set-based reads and writes -----------------

    def transaction(self) -> AbstractContextManager[None]:
        """One atomic write transaction (exclusive across instances); rollback on error.

        Nested transactions raise ``StoreError``.
        """
        ...

    def load_stock(self, skus: Collection[str]) -> dict[str, StockRow]:
        """Stock rows of the given skus; unknown skus are absent.

        Inside ``transaction()`` the rows stay locked against other instances until the
        end of the transaction (taken in one global order, so overlapping batches queue
        instead of deadlocking); outside one, a plain read.
        """
        ...

    def load_orders(self, order_ids: Collection[str]) -> dict[str, KnownOrder]:
        """Already decided orders among ``order_ids``, with their stored outcome bytes
        (inside or outside ``transaction()``)."""
        ...

    def update_stock(self, rows: Iterable[StockRow]) -> None:
        """Write final ``available``/``reserved`` values of existing skus."""
        ...

    def insert_orders(self, orders: Iterable[NewOrder]) -> None:
        """Record new decisions; ``StoreConflictError`` if any of these orders is already
        recorded (another instance decided it meanwhile: the batch must be run again)."""
        ...

    def update_orders(self, orders: Iterable[NewOrder]) -> None:
        """Replace status, reason and outcome of orders this transaction inserted."""
        ...

    def insert_cancellations(self, cancellations: Iterable[NewCancellation]) -> None:
        """Record cancellations; orders already stored as RESERVED become CANCELLED.

        ``StoreConflictError`` if any of them is already recorded.
        """
        ...

    # --- operator commands (each its own transaction) ----------------------------------

    def seed(self, skus: Mapping[str, int]) -> int:
        """Create the skus not there yet with the given stock; how many were created.

        Existing skus are kept as they are, so seeding is safe to repeat. ValueError
        (changing nothing) when ``check_seed`` refuses the input.
        """
        ...

    def restock(self, sku: str, quantity: int) -> StockRow:
        """Add ``quantity`` available units of ``sku`` (created if unknown); its new row.

        ValueError, changing nothing, when ``check_restock`` refuses it.
        """
        ...

    # --- reads for operators and verify ------------------------------------------------

    def stock(self, sku: str | None = None) -> list[StockRow]:
        """Stock of one sku (empty list if unknown) or of every sku, ordered by sku."""
        ...

    def movements_total(self) -> dict[str, int]:
        """Units that ever entered the system, per sku (seed + restock)."""
        ...

    def order_outcomes(self) -> dict[str, OrderOutcome]:
        """Status and items of every decided order."""
        ...

    def close(self) -> None: ...
