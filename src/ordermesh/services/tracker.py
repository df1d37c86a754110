"""Order tracker core: follow every order to a queryable status with its history.

``TrackerService.handle(batch)`` reads ``orders`` (OrderPlaced) and ``order-events`` (the
inventory's decisions and cancellations) and keeps one row per order in a
``TrackerStore``. It produces nothing but dead letters.

Rules and the choices behind them:

- A malformed ``orders`` record is counted and skipped, not dead-lettered: the inventory
  service owns the DLQ entry of ``orders`` records, and a second copy from here would
  break "every bad message is in the DLQ exactly once".
- An undecodable ``order-events`` record goes to the DLQ (stage ``decode``).
- A second ``OrderPlaced`` of a known order_id with another body
  (``schema.order_fingerprint`` differs) is counted as a conflict, logged and skipped:
  the tracked items stay those of the first copy. Not dead-lettered, for the reason
  above: the inventory reads the same record and dead-letters it (``DuplicateOrderId``).
- Status only moves forward: PLACED < RESERVED | REJECTED < CANCELLED. History holds one
  row per (order, event type), so a redelivered or late event changes nothing.
- ``orders`` and ``order-events`` are different topics, so an order's events can be read
  before the order itself (e.g. a tracker catching up on both). Such events are parked
  in ``pending`` and applied, decision before cancellation, when the order arrives, in
  the same batch or a later one.
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
from functools import partial
from typing import Any, Final, NamedTuple, cast

from ordermesh import schema
from ordermesh.errors import DecodeError
from ordermesh.records import InRecord, OutRecord
from ordermesh.schema import (
    CancelRejected,
    OrderCancelled,
    OrderEvent,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
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

STATUS_RANK: Final[dict[OrderStatus, int]] = {
    "PLACED": 0,
    "RESERVED": 1,
    "REJECTED": 1,
    "CANCELLED": 2,
}
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

    def add_dlq(self, out: list[OutRecord], record: InRecord, dlq: OutRecord) -> None:
        out.append(dlq)
        self.stats.dlq += 1
        self.first_dlq = self.first_dlq or describe_dead_letter(record, dlq)


def _items_text(verb: str, event: OrderReserved | StockReleased) -> str:
    return f"{verb} " + ", ".join([f"{i.sku} x{i.quantity}" for i in event.items])


class _Rule(NamedTuple):
    """What an event type does to its order: looked up by type, once per event."""

    name: str  # the history entry's event
    target: OrderStatus | None  # the status it moves to; None: history only
    decides: bool  # its ``at`` is the order's ``decided_at``
    detail: Callable[[Any], str]  # the history entry's detail


_RULES: Final[dict[type, _Rule]] = {
    OrderReserved: _Rule("OrderReserved", "RESERVED", True, partial(_items_text, "reserved")),
    OrderRejected: _Rule("OrderRejected", "REJECTED", True, lambda e: f"{e.reason}: {e.detail}"),
    StockReleased: _Rule("StockReleased", None, False, partial(_items_text, "released")),
    OrderCancelled: _Rule("OrderCancelled", "CANCELLED", False, lambda e: e.detail),
    CancelRejected: _Rule("CancelRejected", None, False, lambda e: f"{e.reason}: {e.detail}"),
}


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
            " duplicates %d, stale %d, parked %d, unparked %d, malformed orders %d, dlq %d",
            len(batch),
            (time.perf_counter() - started) * 1000,
            stats.placed,
            stats.transitions,
            stats.history_only,
            stats.duplicates,
            stats.stale,
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
        )
        state.placed.add(order_id)  # its history entry is the row itself (order_history)
        state.stats.placed += 1

        waiting = state.stored_pending.pop(order_id, [])
        if waiting:
            state.unparked_ids.append(order_id)
        waiting += state.parked.pop(order_id, {}).values()
        # decision before release before cancellation, whatever order they came in
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
        name, target, decides, detail_of = _RULES[type(event)]
        key = (order_id, name)
        if key in state.history:
            state.stats.duplicates += 1
            return
        state.history.add(key)
        at = event.at
        state.new_history.append(
            HistoryRow(order_id, name, target, at, detail_of(event)[:MAX_DETAIL], source)
        )
        tracked = state.orders[order_id]
        state.changed.add(order_id)
        decided_at = tracked.decided_at
        if decides and decided_at is None:
            decided_at = at
        current = tracked.status
        if target is None or STATUS_RANK[target] <= STATUS_RANK[current]:
            # history only, or an event the status is past already: status stays
            state.orders[order_id] = tracked._replace(decided_at=decided_at, seq=tracked.seq + 1)
            if target is None:
                state.stats.history_only += 1
                return
            state.stats.stale += 1
            if target != current and STATUS_RANK[target] == STATUS_RANK[current]:
                logger.warning(
                    "tracker: order %s is %s but %s arrived (%s); status kept",
                    order_id,
                    current,
                    name,
                    source,
                )
            return
        reason, detail, cancelled_at = tracked.reason, tracked.detail, tracked.cancelled_at
        if target == "REJECTED":
            rejected = cast(OrderRejected, event)
            reason = rejected.reason
            detail = rejected.detail
        elif target == "CANCELLED":
            cancelled = cast(OrderCancelled, event)
            cancelled_at = at
            if cancelled.detail:
                detail = cancelled.detail
        # positional, in column order (``_replace`` costs several times more, per event)
        state.orders[order_id] = TrackedOrder(
            order_id,
            tracked.customer_id,
            target,
            tracked.items,
            tracked.total,
            tracked.currency,
            tracked.created_at,
            tracked.placed_at,
            decided_at,
            cancelled_at,
            reason,
            detail,
            max(tracked.updated_at, at),
            tracked.seq + 1,
            tracked.body_hash,
        )
        state.stats.transitions += 1
