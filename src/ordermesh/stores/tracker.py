"""The tracker store: one row per order with its status, its history, and early events.

Two contracts over one database: ``TrackerStore`` is what the tracker core writes (and
reads back inside its batch transaction); ``OrderQueries`` is what the HTTP API, the CLI
and ``verify`` read, and never writes. ``stores/sqlite_tracker.py`` implements both on a
SQLite file, ``stores/factory.py`` picks the implementation. No SQL in this module.

What an implementation keeps (every backend the same):

- orders: the current view of an order (``TrackedOrder``): its status (one of
  ``lifecycle.STATUSES``) and the columns of its whole life, so a read or a page of
  orders needs no history. ``items`` is JSON text ``[[sku, quantity, unit_price], ...]``
  as placed. ``created_at`` is the order's own time, ``placed_at`` when the tracker
  recorded it; ``decided_at`` / ``expires_at`` / ``paid_at`` / ``shipped_at`` are the
  ``at`` (and the deadline) of the events of those steps, whether or not they were
  read in order; ``ended_at`` / ``cancelled_at`` the ``at`` of the event that moved it to
  its terminal status; ``updated_at`` the latest status transition. The payment columns
  (``authorization_id``, ``authorized``, ``captured``, ``voided``, ``refunded``) and
  ``shipment_id`` come from the payments' and fulfilment's facts (and the inventory's
  OrderPaid / OrderShipped, which repeat them); each is set by one event type, so
  redelivery and reordering leave them as they are.
  ``seq`` is the version of the order's view: 1 on insert, +1 for every history entry
  applied later, so a reader can tell that anything (status or history) changed.
  ``body_hash`` is ``schema.order_fingerprint`` of the order recorded, so a later copy
  with the same order_id but another body is recognised (None in rows recorded before
  it was kept). ``api_client`` is the ``OrderPlaced``'s: the opaque id of the API client
  that placed it (None: no API client's, e.g. the load generator's, or recorded before
  it was kept); fixed at insert. A reader that passes ``api_client`` sees only that
  client's orders: another's is None, exactly like an unknown order.
- history: one row per (order, event type) of every event of ``order-events``.
  Redelivered events hit that key and change nothing; ``status`` is the status the event
  stands for (None for the facts of ``lifecycle.FACTS``, which do not move the status),
  ``prior`` the status it moved the order from (None when it did not move it: a fact, or
  a stale event), so the rows with a ``prior`` are the order's transitions. The
  ``OrderPlaced`` entry has no row: it is the order row itself (``created_at``), added
  when the history is read (``order_history``); rows written before that are read too.
- pending: events that arrived before their ``OrderPlaced`` (``orders`` and
  ``order-events`` are separate topics, so the tracker may read an order's events
  first), kept as raw bytes until the order arrives.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

import msgspec

from ordermesh import lifecycle

OrderStatus = lifecycle.Status
ORDER_STATUSES: Final[tuple[OrderStatus, ...]] = lifecycle.STATUSES

MAX_PAGE: Final = 500

# Where a fact sorts among the status events (even numbers, below): after the step it
# follows and before the next one.
_FACT_STEP: Final[dict[str, int]] = {
    "PaymentAuthorized": 3,  # after OrderReserved, before OrderPaid
    "PaymentDeclined": 3,  # after OrderReserved, before OrderPaymentFailed
    "ShipmentReady": 5,  # after OrderPaid, before OrderShipped
    "StockReleased": 5,  # with the end it releases for, before OrderCancelled
    "CancelRejected": 7,
    "PaymentCaptured": 7,
    "PaymentVoided": 7,
    "PaymentRefunded": 7,
}
# Where an event sorts among an order's events of the same instant (clocks of different
# hosts may also put them out of order), and the order in which parked events are
# applied: a status event by the rank of its target (every declared transition climbs
# a rank, so this is a valid life's own order), facts between the steps they follow.
EVENT_RANK: Final[dict[str, int]] = {
    "OrderPlaced": 0,
    **{t.event: 2 * lifecycle.RANK[t.target] for t in lifecycle.TRANSITIONS},
    **_FACT_STEP,
}

ItemTuple = tuple[str, int, float]
_items_decoder: Final = msgspec.json.Decoder(list[tuple[str, int, float]])


# --- what readers get -------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    """One event of the order; ``prior`` is the status it moved the order from (None: it
    did not move it)."""

    event: str
    status: OrderStatus | None
    at: float
    detail: str
    prior: OrderStatus | None = None


@dataclass(frozen=True)
class TransitionEntry:
    """A status move and its cause: the event that made it, with the event's detail."""

    source: OrderStatus
    target: OrderStatus
    event: str
    at: float
    detail: str


@dataclass(frozen=True)
class PaymentView:
    """The order's money at the gateway, as the payments service reported it."""

    authorization_id: str | None
    authorized: float
    captured: float
    voided: float
    refunded: float
    net: float  # captured - refunded: what the order keeps


@dataclass(frozen=True)
class OrderItemView:
    sku: str
    quantity: int
    unit_price: float


@dataclass(frozen=True)
class OrderView:
    """An order as the tracker knows it; ``transitions`` and ``history`` are empty in
    list results."""

    order_id: str
    customer_id: str
    status: OrderStatus
    terminal: bool
    items: list[OrderItemView]
    total: float
    currency: str
    created_at: float
    updated_at: float
    decided_at: float | None
    expires_at: float | None
    paid_at: float | None
    shipped_at: float | None
    ended_at: float | None
    reason: str | None
    detail: str | None
    payment: PaymentView
    shipment_id: str | None
    transitions: list[TransitionEntry]
    history: list[HistoryEntry]


@dataclass(frozen=True)
class OrderPage:
    orders: list[OrderView]
    next_cursor: str | None


def encode_cursor(order_id: str) -> str:
    """Opaque cursor pointing after ``order_id`` (URL-safe base64, no padding)."""
    return base64.urlsafe_b64encode(order_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The order_id a cursor points after; ValueError if it is not one of ours."""
    if not cursor:
        raise ValueError("empty cursor")
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        order_id = raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError(f"invalid cursor {cursor[:80]!r}") from None
    if not order_id or encode_cursor(order_id) != cursor:
        raise ValueError(f"invalid cursor {cursor[:80]!r}")
    return order_id


def page_bounds(status: str | None, limit: int, cursor: str | None) -> tuple[int, str | None]:
    """``list_orders``' checks: (limit clamped to 1..MAX_PAGE, order_id to start after).

    ValueError for an unknown ``status`` or an invalid ``cursor``.
    """
    if status is not None and status not in ORDER_STATUSES:
        raise ValueError(f"unknown status {status!r}")
    after = None if cursor is None else decode_cursor(cursor)
    return max(1, min(MAX_PAGE, int(limit))), after


def list_orders_query(
    columns: str,
    *,
    status: str | None,
    customer_id: str | None,
    limit: int,
    cursor: str | None,
    mark: str,
    api_client: str | None = None,
) -> tuple[str, list[Any], int]:
    """``list_orders``' statement, its parameters and the page size, for a driver whose
    placeholder is ``mark`` (``?`` or ``%s``). One row more than the page is asked for:
    it tells whether there is a next page."""
    limit, after = page_bounds(status, limit, cursor)
    where: list[str] = []
    params: list[Any] = []
    filters = (("api_client", api_client), ("status", status), ("customer_id", customer_id))
    for column, value in filters:
        if value is not None:
            where.append(f"{column} = {mark}")
            params.append(value)
    if after is not None:
        where.append(f"order_id > {mark}")
        params.append(after)
    text = f"SELECT {columns} FROM orders"
    if where:
        text += " WHERE " + " AND ".join(where)
    text += f" ORDER BY order_id LIMIT {mark}"
    params.append(limit + 1)
    return text, params, limit


def encode_items(items: Iterable[ItemTuple]) -> str:
    """Items as the JSON text stored with an order: ``[[sku, qty, price], ...]``."""
    return msgspec.json.encode(list(items)).decode()


def decode_items(text: str) -> list[ItemTuple]:
    return _items_decoder.decode(text)


def history_key(entry: HistoryEntry) -> tuple[float, int, str]:
    """Sort key of an order's history: by time, then by ``EVENT_RANK``."""
    return (entry.at, EVENT_RANK.get(entry.event, 9), entry.event)


def order_history(created_at: float, stored: Iterable[HistoryEntry]) -> list[HistoryEntry]:
    """An order's whole history: its stored rows and its ``OrderPlaced`` entry, sorted."""
    history = list(stored)
    if not any(entry.event == "OrderPlaced" for entry in history):
        history.append(HistoryEntry("OrderPlaced", "PLACED", created_at, ""))
    history.sort(key=history_key)
    return history


def transitions_of(history: Iterable[HistoryEntry]) -> list[TransitionEntry]:
    """The status moves among ``history`` (the entries with a ``prior``), in its order."""
    return [
        TransitionEntry(entry.prior, entry.status, entry.event, entry.at, entry.detail)
        for entry in history
        if entry.prior is not None and entry.status is not None
    ]


# --- rows the core reads and writes ------------------------------------------------------


class TrackedOrder(NamedTuple):
    """One order row, as loaded, inserted and updated (fields in column order)."""

    order_id: str
    customer_id: str
    status: OrderStatus
    items: str  # JSON text, see encode_items
    total: float
    currency: str
    created_at: float
    placed_at: float
    decided_at: float | None
    cancelled_at: float | None
    reason: str | None
    detail: str | None
    updated_at: float
    seq: int
    body_hash: bytes | None  # None for rows recorded before it was kept
    # the rest of the order's life (defaults: not there yet)
    expires_at: float | None = None
    paid_at: float | None = None
    shipped_at: float | None = None
    ended_at: float | None = None
    authorization_id: str | None = None
    authorized: float = 0.0
    captured: float = 0.0
    voided: float = 0.0
    refunded: float = 0.0
    shipment_id: str | None = None
    api_client: str | None = None  # who placed it (fixed at insert); None: no API client

    def view(self, history: list[HistoryEntry]) -> OrderView:
        """The order as readers see it."""
        return OrderView(
            order_id=self.order_id,
            customer_id=self.customer_id,
            status=self.status,
            terminal=lifecycle.is_terminal(self.status),
            items=[OrderItemView(*item) for item in decode_items(self.items)],
            total=self.total,
            currency=self.currency,
            created_at=self.created_at,
            updated_at=self.updated_at,
            decided_at=self.decided_at,
            expires_at=self.expires_at,
            paid_at=self.paid_at,
            shipped_at=self.shipped_at,
            ended_at=self.ended_at,
            reason=self.reason,
            detail=self.detail,
            payment=PaymentView(
                self.authorization_id,
                self.authorized,
                self.captured,
                self.voided,
                self.refunded,
                # in cents: 0.1 + 0.2 - 0.3 is not 0 in floats
                round(self.captured * 100 - self.refunded * 100) / 100,
            ),
            shipment_id=self.shipment_id,
            transitions=transitions_of(history),
            history=history,
        )


# The columns ``update_orders`` writes, in this order (then order_id): all but those
# fixed at insert.
UPDATED_FIELDS: Final = (
    "status",
    "decided_at",
    "cancelled_at",
    "reason",
    "detail",
    "updated_at",
    "seq",
    "expires_at",
    "paid_at",
    "shipped_at",
    "ended_at",
    "authorization_id",
    "authorized",
    "captured",
    "voided",
    "refunded",
    "shipment_id",
)


class HistoryRow(NamedTuple):
    order_id: str
    event: str
    status: OrderStatus | None
    at: float
    detail: str
    source: str | None
    prior: OrderStatus | None = None  # the status it moved the order from; None: none


class PendingEvent(NamedTuple):
    order_id: str
    event: str
    payload: bytes
    source: str | None


# --- contracts --------------------------------------------------------------------------


class TrackerStore(Protocol):
    """What the tracker core needs: set-based reads and writes inside one transaction.

    Used by one thread at a time. Database failures raise ``StoreError``; writes outside
    ``transaction()`` raise ``StoreError``; reads inside it see its writes.
    """

    def transaction(self) -> AbstractContextManager[None]:
        """One atomic write transaction (exclusive across instances); rollback on error."""
        ...

    def load_orders(self, order_ids: Collection[str]) -> dict[str, TrackedOrder]:
        """The stored rows of these orders; unknown ones are absent."""
        ...

    def load_history_keys(self, order_ids: Collection[str]) -> set[tuple[str, str]]:
        """(order_id, event) of the history rows of these orders."""
        ...

    def load_pending(self, order_ids: Collection[str]) -> list[PendingEvent]:
        """Parked events of these orders."""
        ...

    def insert_orders(self, rows: Iterable[TrackedOrder]) -> None:
        """New orders (their ids are not stored yet)."""
        ...

    def update_orders(self, rows: Iterable[TrackedOrder]) -> None:
        """Stored orders whose life (status, times, reason, detail, payment, shipment or
        ``seq``) changed: the ``UPDATED_FIELDS``; the columns fixed at insert (customer,
        items, amounts, ``placed_at``, ``body_hash``, ``api_client``) are left as they
        are."""
        ...

    def insert_history(self, rows: Iterable[HistoryRow]) -> None:
        """History rows; one whose (order_id, event) exists already is skipped."""
        ...

    def insert_pending(self, rows: Iterable[PendingEvent]) -> None:
        """Park events; one whose (order_id, event) is parked already is skipped."""
        ...

    def delete_pending(self, order_ids: Iterable[str]) -> None:
        """Drop every parked event of these orders."""
        ...

    def close(self) -> None: ...


class OrderQueries(Protocol):
    """Read-only questions about orders (the API, the CLI, ``verify``); thread-safe.

    Database failures (including a database that does not exist yet) raise
    ``StoreError``; a later call tries again.
    """

    def ping(self) -> None:
        """Raise StoreError unless the database answers and holds the tracker's tables."""
        ...

    def get_order(self, order_id: str, *, api_client: str | None = None) -> OrderView | None:
        """One order with its history (sorted by ``history_key``), or None if unknown.

        With ``api_client``, None too unless that client placed it: another client's
        order is not there for it.
        """
        ...

    def list_orders(
        self,
        *,
        status: OrderStatus | None = None,
        customer_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        api_client: str | None = None,
    ) -> OrderPage:
        """A page of orders ordered by order_id (keyset pagination); ``history`` empty.
        With ``api_client``, only the orders that client placed.

        ``page_bounds`` checks the arguments (ValueError) and clamps ``limit``;
        ``next_cursor`` (``encode_cursor`` of the page's last order) is None on the last
        page.
        """
        ...

    def status_counts(self) -> dict[str, int]:
        """Orders per status; every status of ``ORDER_STATUSES`` is present, zero if none."""
        ...

    def statuses(self) -> dict[str, OrderStatus]:
        """order_id -> status of every order (for verify)."""
        ...

    def pending_count(self) -> int:
        """Events still waiting for their OrderPlaced."""
        ...

    def close(self) -> None: ...
