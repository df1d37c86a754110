"""Order tracker core: follow every order to a queryable status with its history.

``TrackerService.handle(batch)`` reads ``orders`` (OrderPlaced) and ``order-events`` (the
inventory's decisions, the payments' and fulfilment's facts) and keeps one row per order,
its whole life, in a ``TrackerStore``. It produces nothing but dead letters.

Rules and the choices behind them:

- A malformed ``orders`` record is counted and skipped, not dead-lettered: the inventory
  service owns the DLQ entry of ``orders`` records, and a second copy from here would
  break "every bad message is in the DLQ exactly once".
- An undecodable ``order-events`` record goes to the DLQ (stage ``decode``).
- A second ``OrderPlaced`` of a known order_id with another body
  (``schema.order_fingerprint`` differs) is counted as a conflict, logged and skipped:
  the tracked items stay those of the first copy. Not dead-lettered, for the reason
  above: the inventory reads the same record and dead-letters it (``DuplicateOrderId``).
- The ``api_client`` of an ``OrderPlaced`` (the API client that placed it) is recorded
  with the order, by its first copy: it decides which API client sees the order, so a
  later copy never changes it.
- Statuses and their moves are ``lifecycle``'s: an event moves the order when
  ``lifecycle.applies`` (its target ranks above the current status, which is not
  terminal), so a stale or reordered event never moves it back. Facts
  (``lifecycle.FACTS``) never move it; they fill the payment and shipment columns.
  History holds one row per (order, event type), so a redelivered event changes nothing.
  Each column of the life is set by the events of one step (which carry the same
  values: an authorization id is in PaymentAuthorized and OrderPaid alike), or by the
  move into a terminal status, which a valid life's last event makes in any order of
  arrival; so the order of arrival does not change the columns either. A move that is
  not a declared transition (an event read before the one it follows) still moves
  forward, is counted and logged, and ``verify`` reports it.
- ``orders`` and ``order-events`` are different topics, so an order's events can be read
  before the order itself (e.g. a tracker catching up on both). Such events are parked
  in ``pending`` and applied, in the life's order (``EVENT_RANK``), when the order
  arrives, in the same batch or a later one.
- Times are the events' own ``at`` (the order's ``created_at`` for OrderPlaced), not the
  time the tracker read them; ``placed_at`` alone is the tracker's clock.
- The whole batch is one ``BEGIN IMMEDIATE`` transaction with set-based reads and
  ``executemany`` writes; decoding happens before it to keep the write lock short.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from ordermesh import lifecycle, schema
from ordermesh.errors import DecodeError
from ordermesh.records import InRecord, OutRecord
from ordermesh.schema import (
    CancelRejected,
    OrderCancelled,
    OrderEvent,
    OrderPaid,
    OrderPaymentFailed,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    OrderShipped,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    ReservationExpired,
    ShipmentReady,
    StockReleased,
)
from ordermesh.services.base import StoreService, describe_dead_letter
from ordermesh.stores.tracker import (
    EVENT_RANK,
    HistoryRow,
    OrderStatus,
    PendingEvent,
    TrackedOrder,
    TrackerStore,
    encode_items,
)

logger = logging.getLogger(__name__)

MAX_DETAIL: Final = 500


@dataclass
class TrackerStats:
    """Counters since start, updated once per committed batch."""

    batches: int = 0
    records: int = 0
    placed: int = 0
    transitions: int = 0
    history_only: int = 0
    duplicates: int = 0
    stale: int = 0
    # moves forward that are no declared transition (an event read before its step)
    undeclared: int = 0
    parked: int = 0
    unparked: int = 0
    malformed_orders: int = 0
    # OrderPlaced copies reusing a known order_id for another body (ignored)
    conflicts: int = 0
    dlq: int = 0

    def add(self, other: TrackerStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


# an event with the raw bytes and source offset it came with (raw bytes for `pending`)
_Parked = tuple[OrderEvent, bytes, str | None]


class _Batch:
    """Mutable state of one batch inside its transaction."""

    def __init__(self, now: float) -> None:
        self.now = now
        # every order of the batch, as it stands after the records applied so far
        self.orders: dict[str, TrackedOrder] = {}
        self.placed: set[str] = set()  # orders to insert (placed in this batch)
        self.changed: set[str] = set()  # stored orders to update
        self.history: set[tuple[str, str]] = set()
        self.new_history: list[HistoryRow] = []
        # events of orders not known yet: order_id -> event type -> first copy
        self.parked: dict[str, dict[str, _Parked]] = {}
        self.stored_pending: dict[str, list[_Parked]] = {}
        self.unparked_ids: list[str] = []
        self.stats = TrackerStats(batches=1)
        self.first_conflict: str | None = None
        self.first_dlq: str | None = None
        self.first_undeclared: str | None = None

    def add_dlq(self, out: list[OutRecord], record: InRecord, dlq: OutRecord) -> None:
        out.append(dlq)
        self.stats.dlq += 1
        self.first_dlq = self.first_dlq or describe_dead_letter(record, dlq)


# --- what each event does to its order -----------------------------------------------
#
# A row is edited as a list indexed by these (one list and one tuple per event; a
# NamedTuple ``_replace`` of its 25 fields costs several times more, per event).
_F: Final = TrackedOrder._fields
STATUS, DECIDED, CANCELLED_AT, REASON, DETAIL, UPDATED, SEQ = (
    _F.index(name)
    for name in ("status", "decided_at", "cancelled_at", "reason", "detail", "updated_at", "seq")
)
EXPIRES, PAID_AT, SHIPPED_AT, ENDED, AUTHORIZATION, AUTHORIZED = (
    _F.index(name)
    for name in (
        "expires_at",
        "paid_at",
        "shipped_at",
        "ended_at",
        "authorization_id",
        "authorized",
    )
)
CAPTURED, VOIDED, REFUNDED, SHIPMENT = (
    _F.index(name) for name in ("captured", "voided", "refunded", "shipment_id")
)
_make_row: Final = TrackedOrder._make

# fills the row's columns from the event (applied or stale alike: they record that the
# step happened, and when)
Record = Callable[[list[Any], Any], None]
# sets reason and detail once the event moved the order (its cause)
Cause = Callable[[list[Any], Any], None]


def _items_text(verb: str, items: tuple[schema.ItemQty, ...]) -> str:
    return f"{verb} " + ", ".join([f"{i.sku} x{i.quantity}" for i in items])


def _set_once(row: list[Any], index: int, value: Any) -> None:
    if row[index] is None:
        row[index] = value


def _decided(row: list[Any], event: OrderReserved | OrderRejected) -> None:
    _set_once(row, DECIDED, event.at)
    if isinstance(event, OrderReserved) and event.expires_at > 0:
        _set_once(row, EXPIRES, event.expires_at)


def _authorized(row: list[Any], event: PaymentAuthorized | OrderPaid) -> None:
    _set_once(row, AUTHORIZATION, event.authorization_id)
    if not row[AUTHORIZED]:
        row[AUTHORIZED] = event.amount
    if isinstance(event, OrderPaid):
        row[PAID_AT] = event.at


def _shipment(row: list[Any], event: ShipmentReady | OrderShipped) -> None:
    _set_once(row, SHIPMENT, event.shipment_id)
    if isinstance(event, OrderShipped):
        row[SHIPPED_AT] = event.at


def _money(index: int) -> Record:
    def record(row: list[Any], event: Any) -> None:
        _set_once(row, AUTHORIZATION, event.authorization_id)
        row[index] = event.amount

    return record


def _with_reason(row: list[Any], event: Any) -> None:
    row[REASON] = event.reason
    row[DETAIL] = event.detail


def _cancelled(row: list[Any], event: OrderCancelled) -> None:
    row[CANCELLED_AT] = event.at
    if event.detail:
        row[DETAIL] = event.detail


def _expired(row: list[Any], event: ReservationExpired) -> None:
    row[DETAIL] = _expired_text(event)


def _expired_text(event: ReservationExpired) -> str:
    return f"not paid by its deadline ({event.expires_at:.3f})"


def _cause_text(event: Any) -> str:
    return f"{event.reason}: {event.detail}"


def _cause_suffix(cause: str) -> str:
    return f" ({cause})" if cause else ""


class _Rule(NamedTuple):
    """What an event type does to its order: looked up by type, once per event."""

    name: str  # the history entry's event
    target: OrderStatus | None  # lifecycle.moves(name); None: a fact, history only
    detail: Callable[[Any], str]  # the history entry's detail
    record: Record | None
    cause: Cause | None


def _rule(
    event_type: type, detail: Callable[[Any], str], record: Record | None, cause: Cause | None
) -> tuple[type, _Rule]:
    name = event_type.__name__
    return event_type, _Rule(name, lifecycle.moves(name), detail, record, cause)


_RULES: Final[dict[type, _Rule]] = dict(
    (
        # the inventory's decisions: they move the status
        _rule(OrderReserved, lambda e: _items_text("reserved", e.items), _decided, None),
        _rule(OrderRejected, _cause_text, _decided, _with_reason),
        _rule(
            OrderPaid,
            lambda e: f"authorization {e.authorization_id}: {e.amount:.2f}",
            _authorized,
            None,
        ),
        _rule(OrderPaymentFailed, _cause_text, None, _with_reason),
        _rule(ReservationExpired, _expired_text, None, _expired),
        _rule(OrderShipped, lambda e: f"shipment {e.shipment_id}", _shipment, None),
        _rule(
            OrderCancelled,
            lambda e: e.detail + (f" (from {e.stage})" if e.stage else ""),
            None,
            _cancelled,
        ),
        # facts: history and the life's columns, never the status
        _rule(
            StockReleased,
            lambda e: _items_text("released", e.items) + _cause_suffix(e.cause),
            None,
            None,
        ),
        _rule(CancelRejected, _cause_text, None, None),
        _rule(
            PaymentAuthorized,
            lambda e: f"authorization {e.authorization_id}: {e.amount:.2f} {e.currency}",
            _authorized,
            None,
        ),
        _rule(PaymentDeclined, _cause_text, None, None),
        _rule(
            PaymentCaptured,
            lambda e: f"authorization {e.authorization_id}: captured {e.amount:.2f}",
            _money(CAPTURED),
            None,
        ),
        _rule(
            PaymentVoided,
            lambda e: (
                f"authorization {e.authorization_id}: voided {e.amount:.2f}"
                + _cause_suffix(e.cause)
            ),
            _money(VOIDED),
            None,
        ),
        _rule(
            PaymentRefunded,
            lambda e: (
                f"authorization {e.authorization_id}: refunded {e.amount:.2f}"
                + _cause_suffix(e.cause)
            ),
            _money(REFUNDED),
            None,
        ),
        _rule(ShipmentReady, lambda e: f"shipment {e.shipment_id} packed", _shipment, None),
    )
)


def _parked_order(parked: _Parked) -> tuple[int, float]:
    event = parked[0]
    return EVENT_RANK.get(type(event).__name__, 9), event.at


class TrackerService(StoreService[TrackerStore, OrderPlaced | OrderEvent]):
    """Pure tracker logic over a ``TrackerStore``; no Kafka inside."""

    def __init__(
        self,
        store: TrackerStore,
        *,
        orders_topic: str,
        events_topic: str,
        dlq_topic: str,
        service_name: str = "tracker",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            store,
            decoders={orders_topic: schema.decode_order, events_topic: schema.decode_event},
            dlq_topic=dlq_topic,
            service_name=service_name,
            clock=clock,
        )
        self.orders_topic = orders_topic
        self.events_topic = events_topic
        self.stats = TrackerStats()

    def handle(self, batch: Sequence[InRecord]) -> list[OutRecord]:
        """Apply a batch in one transaction; the dead letters to produce.

        Never raises because of input; a ``StoreError`` means nothing was committed and
        the batch must be redelivered (do not commit its offsets).
        """
        if not batch:
            return []
        started = time.perf_counter()
        out: list[OutRecord] = []
        state = _Batch(self._clock())
        stats = state.stats
        stats.records = len(batch)
        # (record, task, fingerprint of an OrderPlaced; b"" for events)
        work: list[tuple[InRecord, OrderPlaced | OrderEvent, bytes]] = []
        order_ids: set[str] = set()
        placed_ids: set[str] = set()
        first_malformed: str | None = None
        orders_topic = self.orders_topic
        # decode outside the transaction: CPU only, keeps the cross-process lock short
        for record in batch:
            try:
                task = self.decode(record)
            except DecodeError as exc:
                if record.topic == orders_topic:
                    # the inventory service dead-letters it; one DLQ copy, not two
                    stats.malformed_orders += 1
                    first_malformed = first_malformed or f"{record.where()}: {exc}"
                else:
                    state.add_dlq(out, record, self.decode_dead_letter(record, exc))
                continue
            if isinstance(task, OutRecord):  # a record of a topic the tracker does not read
                state.add_dlq(out, record, task)
                continue
            order_ids.add(task.order_id)
            if isinstance(task, OrderPlaced):
                placed_ids.add(task.order_id)
                work.append((record, task, schema.order_fingerprint(task)))
            else:
                work.append((record, task, b""))

        def step(record: InRecord, task: OrderPlaced | OrderEvent, body_hash: bytes) -> None:
            if isinstance(task, OrderPlaced):
                self._place(state, task, body_hash, record)
            else:
                self._event(state, task, record.value or b"", record.where())

        # a batch of nothing but bad input must not wait for the database's write lock
        with self.store.transaction() if work else nullcontext():
            self._load(state, order_ids, placed_ids)
            self.apply_guarded(work, step, lambda record, dlq: state.add_dlq(out, record, dlq))
            self._write(state)

        self.stats.add(stats)
        logger.debug(
            "tracker batch: %d records in %.1f ms: placed %d, transitions %d, history-only %d,"
            " duplicates %d, stale %d, undeclared %d, parked %d, unparked %d,"
            " malformed orders %d, dlq %d",
            len(batch),
            (time.perf_counter() - started) * 1000,
            stats.placed,
            stats.transitions,
            stats.history_only,
            stats.duplicates,
            stats.stale,
            stats.undeclared,
            stats.parked,
            stats.unparked,
            stats.malformed_orders,
            stats.dlq,
        )
        if stats.malformed_orders:
            # expected under a malformed load and dead-lettered by inventory: debug only
            logger.debug(
                "tracker batch: %d malformed orders skipped; first: %s",
                stats.malformed_orders,
                first_malformed,
            )
        if stats.dlq:
            logger.warning(
                "tracker batch: %d records dead-lettered; first: %s", stats.dlq, state.first_dlq
            )
        if stats.undeclared:
            logger.warning(
                "tracker batch: %d status moves that are no declared transition (an event"
                " read before the step it follows); first: %s",
                stats.undeclared,
                state.first_undeclared,
            )
        if stats.conflicts:
            logger.warning(
                "tracker batch: %d orders reuse a known order_id with another body (kept"
                " the first body); first: %s",
                stats.conflicts,
                state.first_conflict,
            )
        return out

    # --- load and write -----------------------------------------------------------------

    def _load(self, state: _Batch, order_ids: set[str], placed_ids: set[str]) -> None:
        store = self.store
        known = store.load_orders(order_ids)
        state.orders.update(known)
        # only known orders have history; new ones start with none (pending is apart)
        state.history = store.load_history_keys(known.keys())
        for pending in store.load_pending(placed_ids - known.keys()):
            try:
                event = schema.decode_event(pending.payload)
            except DecodeError:
                # stored only after decoding; a row that no longer decodes is dropped
                logger.error(
                    "tracker: pending %s of order %s does not decode; dropped",
                    pending.event,
                    pending.order_id,
                )
                continue
            parked = (event, pending.payload, pending.source)
            state.stored_pending.setdefault(pending.order_id, []).append(parked)

    def _write(self, state: _Batch) -> None:
        store = self.store
        orders = state.orders
        placed, changed = state.placed, state.changed
        store.insert_orders(row for order_id, row in orders.items() if order_id in placed)
        store.update_orders(
            row
            for order_id, row in orders.items()
            if order_id in changed and order_id not in placed
        )
        store.insert_history(state.new_history)
        store.insert_pending(
            PendingEvent(order_id, name, raw, source)
            for order_id, events in state.parked.items()
            for name, (_event, raw, source) in events.items()
        )
        store.delete_pending(state.unparked_ids)

    # --- orders and events --------------------------------------------------------------

    def _place(self, state: _Batch, order: OrderPlaced, body_hash: bytes, record: InRecord) -> None:
        order_id = order.order_id
        known = state.orders.get(order_id)
        if known is not None:
            if known.body_hash is not None and known.body_hash != body_hash:
                # another order under a used id: never overwrite what is tracked
                state.stats.conflicts += 1
                where = f"{record.where()}: order {order_id}"
                state.first_conflict = state.first_conflict or where
            else:
                state.stats.duplicates += 1  # redelivery: the first copy stands
            return
        created_at = order.created_at
        # positional, in column order: this runs once per order
        state.orders[order_id] = TrackedOrder(
            order_id,
            order.customer_id,
            "PLACED",
            encode_items([(i.sku, i.quantity, i.unit_price) for i in order.items]),
            order.total,
            order.currency,
            created_at,
            state.now,
            None,  # decided_at
            None,  # cancelled_at
            None,  # reason
            None,  # detail
            created_at,  # updated_at
            1,  # seq
            body_hash,
            api_client=order.owner(),
        )
        state.placed.add(order_id)  # its history entry is the row itself (order_history)
        state.stats.placed += 1

        waiting = state.stored_pending.pop(order_id, [])
        if waiting:
            state.unparked_ids.append(order_id)
        waiting += state.parked.pop(order_id, {}).values()
        # in the life's order, whatever order they came in
        waiting.sort(key=_parked_order)
        for event, _raw, source in waiting:
            state.stats.unparked += 1
            self._apply(state, event, source)

    def _event(self, state: _Batch, event: OrderEvent, raw: bytes, source: str) -> None:
        if event.order_id not in state.orders:
            # the OrderPlaced has not been read yet: keep the first copy until it is
            events = state.parked.setdefault(event.order_id, {})
            name = type(event).__name__
            if name in events:
                state.stats.duplicates += 1
            else:
                events[name] = (event, raw, source)
                state.stats.parked += 1
            return
        self._apply(state, event, source)

    def _apply(self, state: _Batch, event: OrderEvent, source: str | None) -> None:
        """Apply an event to its order (in ``state.orders``), unless already applied."""
        order_id = event.order_id
        name, target, detail_of, record, cause = _RULES[type(event)]
        key = (order_id, name)
        if key in state.history:
            state.stats.duplicates += 1
            return
        state.history.add(key)
        at = event.at
        tracked = state.orders[order_id]
        current = tracked.status
        state.changed.add(order_id)
        row: list[Any] = list(tracked)
        row[SEQ] += 1
        if record is not None:
            record(row, event)
        moves = target is not None and lifecycle.applies(current, name)
        state.new_history.append(
            HistoryRow(
                order_id,
                name,
                target,
                at,
                detail_of(event)[:MAX_DETAIL],
                source,
                current if moves else None,
            )
        )
        if target is None:
            state.stats.history_only += 1
        elif not moves:
            # an event the status is past already (stale, redelivered elsewhere), or one
            # that contradicts it: the status stays
            state.stats.stale += 1
            if target != current and lifecycle.RANK[target] >= lifecycle.RANK[current]:
                logger.warning(
                    "tracker: order %s is %s but %s arrived (%s); status kept",
                    order_id,
                    current,
                    name,
                    source,
                )
        else:
            if lifecycle.transition(current, name) is None:
                state.stats.undeclared += 1
                state.first_undeclared = (
                    state.first_undeclared or f"order {order_id}: {current} --{name}--> ({source})"
                )
            row[STATUS] = target
            row[UPDATED] = max(row[UPDATED], at)
            if lifecycle.is_terminal(target):
                row[ENDED] = at
            if cause is not None:
                cause(row, event)
            state.stats.transitions += 1
        state.orders[order_id] = _make_row(row)
