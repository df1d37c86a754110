"""The inventory store: what the inventory core, its CLI and ``verify`` need of a database.

``InventoryStore`` is the contract; ``stores/sqlite_inventory.py`` implements it on a
SQLite file, ``stores/factory.py`` picks the implementation from the settings. The rows
here are backend-neutral; no SQL in this module.

What an implementation keeps (every backend the same):

- stock per sku: ``available`` can be reserved; ``reserved`` is held by RESERVED orders,
  ``committed`` by PAID ones; ``shipped`` left the warehouse with SHIPPED ones.
- stock movements: every unit that entered the system (``seed``, ``restock``).
  Conservation: per sku, ``entered + restocked == available + reserved + committed +
  shipped`` (``stock_levels``, ``stock_totals``).
- one row per decided order (its status as it moves along ``lifecycle.py``) with the
  exact bytes of the outcome event, so a redelivered order re-emits identical bytes, its
  ``body_hash`` (``schema.order_fingerprint``), so a reused order_id with another body is
  told apart from a redelivery (None in rows decided before the hash was kept), and the
  reservation's ``expires_at`` (indexed over RESERVED orders, for the deadline sweep).
- one row per cancelled order with the exact bytes of its two events (``StockReleased``,
  ``OrderCancelled``); the order's status says CANCELLED.
- one row per other step of an order (PAID, PAYMENT_FAILED, EXPIRED, SHIPPED): what
  triggered it and the exact bytes it emitted, so a redelivered trigger re-emits them.
- reorders (``reorders``): one row per restock id, open until its ``Restock`` is
  applied; at most one open per sku.

Status moves of known orders are compare-and-set (``move_orders``): an order another
instance moved meanwhile fails the transaction (``StoreConflictError``), and the batch is
decided again on what that instance recorded.

Several inventory instances may share one database. The core reads a batch's known
orders and stock without locks, decides, and then writes inside ``transaction()``, which
must make the write-check atomic across processes (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: the stock rows locked by ``load_stock``): it inserts the orders first (an
order another instance recorded meanwhile is a ``StoreConflictError``), then loads the
stock again inside the transaction and checks its decisions against it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Literal, NamedTuple, Protocol, get_args

import msgspec

OrderStatus = Literal[
    "RESERVED", "PAID", "SHIPPED", "REJECTED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED"
]
ORDER_STATUSES: Final[tuple[str, ...]] = get_args(OrderStatus)
# what set off a step (the type of the record handled)
StepTrigger = Literal["PaymentAuthorized", "PaymentDeclined", "ShipmentReady", "ExpireReservation"]
MovementKind = Literal["seed", "restock"]
Items = tuple[tuple[str, int], ...]

# Most units one sku may hold (available + reserved), and so the largest seed or restock.
# Far below SQLite's 2**63 integer limit, past which a sum silently turns into a float,
# and below 2**53, so every stock figure is also exact as a JSON number / double.
MAX_STOCK: Final = 10**12

_items_decoder: Final = msgspec.json.Decoder(tuple[tuple[str, int], ...])


class StockRow(NamedTuple):
    """The units of a sku by where they are (``committed``/``shipped`` default to 0 so
    that rows of the reservation-only stores still read as they did)."""

    sku: str
    available: int
    reserved: int
    committed: int = 0
    shipped: int = 0


class StockLevels(NamedTuple):
    """Every figure of a sku (or, with sku ``""``, of all of them) that conservation
    relates: ``entered`` (seeded) + ``restocked`` == the four places units are."""

    sku: str
    entered: int
    restocked: int
    available: int
    reserved: int
    committed: int
    shipped: int

    @property
    def conserved(self) -> bool:
        held = self.available + self.reserved + self.committed + self.shipped
        return self.entered + self.restocked == held


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
    # the reservation's deadline; None: none (not reserved, or reserved before deadlines)
    expires_at: float | None = None


class NewOrder(NamedTuple):
    order_id: str
    status: OrderStatus
    reason: str | None
    items: Items
    outcome: bytes
    decided_at: float
    source: str | None
    body_hash: bytes | None = None
    expires_at: float | None = None


class NewCancellation(NamedTuple):
    order_id: str
    released: bytes
    cancelled: bytes
    at: float
    source: str | None


class OrderStep(NamedTuple):
    """A status move of an order other than its decision and its cancel: the status it
    moved to, what triggered it (``source``: the record, ``topic[p]@offset``) and the
    bytes it emitted, in order."""

    order_id: str
    status: OrderStatus
    trigger: StepTrigger
    events: tuple[bytes, ...]
    at: float
    source: str | None


class StatusMove(NamedTuple):
    """Compare-and-set of a known order's status: ``expected`` as the core read it."""

    order_id: str
    expected: OrderStatus
    status: OrderStatus


class Reorder(NamedTuple):
    """Units ordered from the supplier for a sku, due at ``due_at``; open until the
    ``Restock`` of its ``restock_id`` is applied."""

    restock_id: str
    sku: str
    quantity: int
    opened_at: float
    due_at: float


# The reads of the deadline sweep, the same SQL on both backends but for the placeholder:
# ``{p}`` is ``?`` in SQLite, ``%s`` in PostgreSQL (each store formats them once).
EXPIRED_RESERVATIONS_SQL: Final = (
    "SELECT order_id, expires_at FROM orders"
    " WHERE status = 'RESERVED' AND expires_at <= {p}"
    " ORDER BY expires_at LIMIT {p}"
)
DUE_REORDERS_SQL: Final = (
    "SELECT restock_id, sku, quantity, opened_at, due_at FROM reorders"
    " WHERE applied_at IS NULL AND due_at <= {p} ORDER BY due_at LIMIT {p}"
)


def reorder_of(values: Sequence[Any]) -> Reorder:
    """A row of ``DUE_REORDERS_SQL`` (PostgreSQL may hand its quantity over as a decimal)."""
    restock_id, sku, quantity, opened_at, due_at = values
    return Reorder(restock_id, sku, int(quantity), opened_at, due_at)


class AppliedRestock(NamedTuple):
    """A ``Restock`` command applied: its units added once, its reorder (if any) closed."""

    restock_id: str
    sku: str
    quantity: int
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
        """Write final ``available``/``reserved``/``committed``/``shipped`` values of
        existing skus."""
        ...

    def insert_orders(self, orders: Iterable[NewOrder]) -> None:
        """Record new decisions; ``StoreConflictError`` if any of these orders is already
        recorded (another instance decided it meanwhile: the batch must be run again)."""
        ...

    def update_orders(self, orders: Iterable[NewOrder]) -> None:
        """Replace status, reason, outcome and expires_at of orders this transaction
        inserted."""
        ...

    def insert_cancellations(self, cancellations: Iterable[NewCancellation]) -> None:
        """Record the events of cancellations (the status moves by ``move_orders``).

        ``StoreConflictError`` if any of them is already recorded.
        """
        ...

    def load_steps(self, order_ids: Collection[str]) -> dict[str, tuple[OrderStep, ...]]:
        """The recorded steps of these orders (orders without any are absent)."""
        ...

    def insert_steps(self, steps: Iterable[OrderStep]) -> None:
        """Record steps; ``StoreConflictError`` if any (order, status) is recorded already."""
        ...

    def move_orders(self, moves: Iterable[StatusMove]) -> None:
        """Set each order's status where it still is ``expected``; ``StoreConflictError``
        if any is not (another instance moved it meanwhile). One move per order."""
        ...

    def applied_restocks(self, restock_ids: Collection[str]) -> set[str]:
        """The restock ids among these whose units were added already."""
        ...

    def apply_restocks(self, restocks: Iterable[AppliedRestock]) -> None:
        """Record restocks as applied (closing their reorders) and their units as
        movements; the stock rows are written by ``update_stock``. ``StoreConflictError``
        if any was applied meanwhile."""
        ...

    def open_reorders(self, skus: Collection[str]) -> set[str]:
        """The skus among these with an open reorder."""
        ...

    def insert_reorders(self, reorders: Iterable[Reorder]) -> int:
        """Open reorders; one of a sku with an open reorder already is left out (another
        instance opened it meanwhile). How many were opened."""
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

    def stock_levels(self, sku: str | None = None) -> list[StockLevels]:
        """Every figure of one sku (empty list if unknown) or of every sku, by sku."""
        ...

    def stock_totals(self) -> StockLevels:
        """The figures summed over every sku (sku ``""``), for ``verify``."""
        ...

    # --- reads for the deadline sweep (no transaction, no locks) -----------------------

    def expired_reservations(self, now: float, limit: int) -> list[tuple[str, float]]:
        """(order_id, expires_at) of RESERVED orders whose deadline is at or before
        ``now``, oldest deadline first, at most ``limit``."""
        ...

    def due_reorders(self, now: float, limit: int) -> list[Reorder]:
        """Open reorders due at or before ``now``, earliest first, at most ``limit``."""
        ...

    def order_outcomes(self) -> dict[str, OrderOutcome]:
        """Status and items of every decided order."""
        ...

    def close(self) -> None: ...


def sum_levels(rows: Iterable[StockLevels]) -> StockLevels:
    """The figures of ``rows`` summed (sku ``""``)."""
    totals = [0] * 6
    for row in rows:
        for index, value in enumerate(row[1:]):
            totals[index] += value
    return StockLevels("", *totals)


def collapse_moves(moves: Iterable[StatusMove]) -> list[StatusMove]:
    """One move per order: from the first move's ``expected`` to the last one's status
    (an order paid and then cancelled in one batch is one compare-and-set)."""
    merged: dict[str, StatusMove] = {}
    for move in moves:
        first = merged.get(move.order_id)
        merged[move.order_id] = move if first is None else first._replace(status=move.status)
    return sorted(merged.values())


def decode_step_events(first: bytes, second: bytes | None) -> tuple[bytes, ...]:
    """A step's events as stored (one or two columns)."""
    return (bytes(first),) if second is None else (bytes(first), bytes(second))


def step_columns(events: tuple[bytes, ...]) -> tuple[bytes, bytes | None]:
    """A step's events as the two columns that store them (every step emits 1 or 2)."""
    if not 1 <= len(events) <= 2:
        raise ValueError(f"a step emits one or two events, not {len(events)}")
    return events[0], events[1] if len(events) == 2 else None
