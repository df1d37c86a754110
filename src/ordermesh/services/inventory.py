"""Inventory core: reserve stock for placed orders and release it for cancelled ones.

``InventoryService.handle(batch)`` turns a batch of consumed records into the records to
produce. The runner produces them, waits for every ack, and only then commits offsets;
a crash anywhere redelivers the batch, so ``handle`` is idempotent per order: a known
order (or an already cancelled one) re-emits the exact bytes stored with its decision and
changes nothing.

Choices worth knowing:

- The whole batch is one store transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: row
  locks on its stock); outputs are returned only after COMMIT.
- Locks are short: instances sharing a database take turns on the stock rows of the hot
  skus, which nearly every batch holds, so only what must be atomic runs under them. The
  batch is decoded and decided *before* the transaction, on the known orders and the
  stock as read without locks. The transaction inserts the decided orders (no stock
  locked yet), then locks the stock rows and checks that the decisions still hold on
  them (``_still_holds``: they do unless a row that moved in between decided a
  rejection or no longer covers what the batch reserves of it). Then it only applies
  the batch's stock changes to the locked rows and commits. Otherwise (another instance
  moved scarce stock in between) the batch is decided again on the locked rows and the
  orders whose decision changed are rewritten.
- A transaction that loses to another instance sharing the database (``StoreConflictError``:
  a deadlock, or an order or cancel another instance recorded first) was rolled back; the
  batch is decided again from scratch (fresh ``_Batch``, everything re-read), a few times
  with a jittered pause, before the error is let through.
- One decision time (``clock()``) per attempt: the batch is decided atomically.
- "Known" means same order_id *and* same body (``schema.order_fingerprint``, stored
  with the decision). An order_id reused for another body is not a redelivery: it goes to
  the DLQ (stage ``place``, class ``DuplicateOrderId``) and changes nothing, rather than
  silently getting the first order's outcome. Orders decided before the fingerprint was
  stored have none and are answered as redeliveries, as they always were.
- A redelivered ``OrderPlaced`` of a cancelled order re-emits its original outcome
  (``OrderReserved``), not the cancel events: it answers the message that was redelivered.
  Consumers of ``order-events`` must not move a status backwards (architecture rule).
- Cancelling a REJECTED order emits ``CancelRejected`` (a business outcome). Cancelling
  an unknown order goes to the DLQ (stage ``cancel``, class ``CancelRejected``).
  ``orders`` and ``order-commands`` are not ordered with respect to each other, so a
  cancel can overtake its order; it is not parked here but dead-lettered so an operator
  (or the DLQ replay tool) can replay it once the order exists.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from ordermesh import schema
from ordermesh.errors import DecodeError, StoreConflictError, StoreError
from ordermesh.records import InRecord, OutRecord
from ordermesh.schema import (
    CancelOrder,
    CancelRejected,
    ItemQty,
    OrderCancelled,
    OrderCommand,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    RejectReason,
    StockReleased,
)
from ordermesh.services.base import StoreService, describe_dead_letter
from ordermesh.stores.inventory import (
    InventoryStore,
    Items,
    KnownOrder,
    NewCancellation,
    NewOrder,
    OrderStatus,
    StockRow,
)

logger = logging.getLogger(__name__)

CANCEL_REJECTED: Final = "CancelRejected"
DUPLICATE_ORDER_ID: Final = "DuplicateOrderId"
# A batch that lost to another instance (StoreConflictError) runs again from scratch up to
# this many times in all, after a jittered pause growing by this much per attempt
CONFLICT_ATTEMPTS: Final = 8
CONFLICT_BACKOFF_S: Final = 0.02

# (record, task, fingerprint of the order; b"" for other tasks)
_Work = tuple[InRecord, OrderPlaced | CancelOrder | OutRecord, bytes]


@dataclass
class InventoryStats:
    """Counters since start, updated once per committed batch."""

    batches: int = 0
    records: int = 0
    reserved: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    dlq: int = 0
    cancelled: int = 0
    cancel_rejected: int = 0
    conflicts: int = 0  # attempts rolled back and run again

    def add(self, other: InventoryStats) -> None:
        self.batches += other.batches
        self.records += other.records
        self.reserved += other.reserved
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        self.duplicates += other.duplicates
        self.dlq += other.dlq
        self.cancelled += other.cancelled
        self.cancel_rejected += other.cancel_rejected
        self.conflicts += other.conflicts


class _Order:
    """In-batch view of one order: loaded from the store or decided in this batch."""

    __slots__ = ("body_hash", "cancel", "items", "new", "outcome", "status")

    def __init__(
        self,
        status: OrderStatus,
        items: Items,
        outcome: bytes,
        cancel: tuple[bytes, bytes] | None,
        new: NewOrder | None,
        body_hash: bytes | None,
    ) -> None:
        self.status = status
        self.items = items
        self.outcome = outcome
        self.cancel = cancel
        self.new = new  # the row to insert, when decided in this batch
        self.body_hash = body_hash


class _Batch:
    """Mutable state of one batch decided on given known orders and stock."""

    def __init__(self, now: float, stock: Mapping[str, StockRow]) -> None:
        self.now = now
        self.out: list[OutRecord] = []
        self.orders: dict[str, _Order] = {}
        # sku -> [available, reserved]
        self.stock: dict[str, list[int]] = {
            sku: [row.available, row.reserved] for sku, row in stock.items()
        }
        self.changed: set[str] = set()
        # what the decisions rest on (see _still_holds): units per sku that had to be
        # available (reserved, or checked before an order fell short on another sku), and
        # the skus whose exact figure (or absence) decided a rejection
        self.needs: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.new_orders: list[str] = []
        self.cancellations: list[NewCancellation] = []
        self.stats = InventoryStats(batches=1)
        self.first_dlq: str | None = None

    def decided(self) -> dict[str, NewOrder]:
        """The rows of the orders decided in this batch, in batch order."""
        return {oid: new for oid in self.new_orders if (new := self.orders[oid].new) is not None}


class InventoryService(StoreService[InventoryStore, OrderPlaced | OrderCommand]):
    """Pure inventory logic over an ``InventoryStore``; no Kafka inside."""

    def __init__(
        self,
        store: InventoryStore,
        *,
        orders_topic: str,
        commands_topic: str,
        events_topic: str,
        dlq_topic: str,
        service_name: str = "inventory",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            store,
            decoders={orders_topic: schema.decode_order, commands_topic: schema.decode_command},
            dlq_topic=dlq_topic,
            service_name=service_name,
            clock=clock,
        )
        self.orders_topic = orders_topic
        self.commands_topic = commands_topic
        self.events_topic = events_topic
        self.stats = InventoryStats()

    def handle(self, batch: Sequence[InRecord]) -> list[OutRecord]:
        """Decide a batch in one transaction; the records to produce, in batch order.

        Never raises because of input; a ``StoreError`` means nothing was committed and
        the batch must be redelivered (do not commit its offsets).
        """
        if not batch:
            return []
        started = time.perf_counter()
        work: list[_Work] = []
        order_ids: set[str] = set()
        skus: set[str] = set()
        # decode outside the transaction: CPU only, keeps the cross-process lock short
        for record in batch:
            try:
                task = self.decode(record)
            except DecodeError as exc:
                work.append((record, self.decode_dead_letter(record, exc), b""))
                continue
            if isinstance(task, OrderPlaced):
                order_ids.add(task.order_id)
                for item in task.items:
                    skus.add(item.sku)
                work.append((record, task, schema.order_fingerprint(task)))
            elif isinstance(task, CancelOrder):
                order_ids.add(task.order_id)
                work.append((record, task, b""))
            else:  # the dead letter of a record of an unexpected topic
                work.append((record, task, b""))

        state = self._decide_retrying(work, order_ids, skus)
        stats = state.stats
        stats.records = len(batch)
        self.stats.add(stats)
        elapsed = time.perf_counter() - started
        logger.debug(
            "inventory batch: %d records in %.1f ms: reserved %d, rejected %s, duplicates %d,"
            " cancelled %d, dlq %d",
            len(batch),
            elapsed * 1000,
            stats.reserved,
            stats.rejected,
            stats.duplicates,
            stats.cancelled,
            stats.dlq,
        )
        if stats.dlq:
            logger.warning(
                "inventory batch: %d records dead-lettered; first: %s", stats.dlq, state.first_dlq
            )
        return state.out

    def _decide_retrying(self, work: list[_Work], order_ids: set[str], skus: set[str]) -> _Batch:
        """``_decide`` the batch, running it again from scratch when it lost to another
        instance (``StoreConflictError``: the transaction was rolled back)."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                # fresh in-memory state each time: the rolled-back attempt's is stale
                return self._decide(work, order_ids, set(skus))
            except StoreConflictError as exc:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                self.stats.conflicts += 1
                logger.info("inventory batch: attempt %d lost (%s); running it again", attempt, exc)
                # jittered backoff: two instances that collided should not collide again
                time.sleep(random.uniform(0, CONFLICT_BACKOFF_S * attempt))
        raise AssertionError("unreachable")

    def _decide(self, work: list[_Work], order_ids: set[str], skus: set[str]) -> _Batch:
        """Decide the batch and record it in one transaction; its state once committed."""
        now = self._clock()
        if not order_ids:
            # nothing but dead letters: nothing to read, nothing to write
            return self._run(work, {}, {}, now)
        # read and decide without locks: the per-order work must not hold up other instances
        known = self.store.load_orders(order_ids)
        for order in known.values():
            if order.status == "RESERVED":
                # a cancel in this batch may release stock of skus no order here uses
                skus.update(sku for sku, _ in order.items)
        seen = self.store.load_stock(skus)
        planned = self._run(work, known, seen, now)
        if not (planned.new_orders or planned.cancellations or planned.changed):
            # redeliveries only: every answer comes from committed rows, nothing to write
            return planned
        with self.store.transaction():
            # the orders before the stock locks: an order another instance recorded
            # meanwhile fails the attempt here, before it made anybody wait
            rows = planned.decided()
            self.store.insert_orders(rows.values())
            # the stock rows stay locked from here to the commit
            locked = self.store.load_stock(skus)
            if _still_holds(planned, seen, locked):
                state = planned
                changes = [
                    StockRow(
                        sku,
                        locked[sku].available + state.stock[sku][0] - seen[sku].available,
                        locked[sku].reserved + state.stock[sku][1] - seen[sku].reserved,
                    )
                    for sku in state.changed
                ]
            else:
                # the stock moved under scarce orders: decide again on the locked rows
                state = self._run(work, known, locked, now)
                again = state.decided()
                if again.keys() != rows.keys():
                    # both runs see the same known orders, so they decide the same orders
                    raise RuntimeError("inventory: the batch decided again names other orders")
                self.store.update_orders(new for oid, new in again.items() if new != rows[oid])
                changes = [StockRow(sku, *state.stock[sku]) for sku in state.changed]
            self.store.update_stock(changes)
            self.store.insert_cancellations(state.cancellations)
        return state

    def _run(
        self,
        work: list[_Work],
        known: Mapping[str, KnownOrder],
        stock: Mapping[str, StockRow],
        now: float,
    ) -> _Batch:
        """Decide every record of the batch on ``known`` orders and ``stock``; no I/O."""
        state = _Batch(now, stock)
        for order_id, order in known.items():
            state.orders[order_id] = _Order(
                order.status,
                order.items,
                order.outcome,
                order.cancel_outcome,
                None,
                order.body_hash,
            )

        def step(
            record: InRecord, task: OrderPlaced | CancelOrder | OutRecord, body_hash: bytes
        ) -> None:
            if isinstance(task, OrderPlaced):
                self._place(state, record, task, body_hash)
            elif isinstance(task, CancelOrder):
                self._cancel(state, record, task)
            else:
                self._add_dlq(state, record, task)

        self.apply_guarded(work, step, lambda record, dlq: self._add_dlq(state, record, dlq))
        return state

    # --- orders ------------------------------------------------------------------------

    def _place(self, state: _Batch, record: InRecord, order: OrderPlaced, body_hash: bytes) -> None:
        key = order.order_id.encode()
        known = state.orders.get(order.order_id)
        if known is not None:
            if known.body_hash is not None and known.body_hash != body_hash:
                message = (
                    f"order id {order.order_id!r} was already decided ({known.status}) for"
                    " another order body; this one is not placed (use a new order id)"
                )
                dlq = self.dead_letter(record, "place", DUPLICATE_ORDER_ID, message)
                self._add_dlq(state, record, dlq)
                return
            state.out.append(OutRecord(self.events_topic, key, known.outcome))
            state.stats.duplicates += 1
            return

        needed: dict[str, int] = {}
        for item in order.items:
            needed[item.sku] = needed.get(item.sku, 0) + item.quantity
        items: Items = tuple(needed.items())

        stock = state.stock
        reason: RejectReason | None = None
        detail = ""
        needs = state.needs
        unknown = [sku for sku in needed if sku not in stock]
        if unknown:
            reason = "UNKNOWN_SKU"
            shown = ", ".join(repr(sku) for sku in unknown[:5])
            more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            detail = f"unknown sku {shown}{more}"
            state.pinned.update(unknown)
        else:
            for index, (sku, quantity) in enumerate(items):
                available = stock[sku][0]
                if available < quantity:
                    reason = "OUT_OF_STOCK"
                    detail = f"sku {sku!r}: needed {quantity}, available {available}"
                    state.pinned.add(sku)
                    for checked, units in items[:index]:
                        needs[checked] = needs.get(checked, 0) + units
                    break

        status: OrderStatus
        if reason is None:
            for sku, quantity in items:
                row = stock[sku]
                row[0] -= quantity
                row[1] += quantity
                needs[sku] = needs.get(sku, 0) + quantity
            state.changed.update(needed)
            status = "RESERVED"
            outcome = schema.encode(
                OrderReserved(
                    order_id=order.order_id,
                    items=tuple(ItemQty(sku, quantity) for sku, quantity in items),
                    total=order.total,
                    currency=order.currency,
                    order_created_at=order.created_at,
                    at=state.now,
                )
            )
            state.stats.reserved += 1
        else:
            status = "REJECTED"
            outcome = schema.encode(
                OrderRejected(
                    order_id=order.order_id,
                    reason=reason,
                    detail=detail,
                    order_created_at=order.created_at,
                    at=state.now,
                )
            )
            state.stats.rejected[reason] = state.stats.rejected.get(reason, 0) + 1

        new = NewOrder(
            order.order_id, status, reason, items, outcome, state.now, record.where(), body_hash
        )
        state.orders[order.order_id] = _Order(status, items, outcome, None, new, body_hash)
        state.new_orders.append(order.order_id)
        state.out.append(OutRecord(self.events_topic, key, outcome))

    # --- commands ----------------------------------------------------------------------

    def _cancel(self, state: _Batch, record: InRecord, command: CancelOrder) -> None:
        order_id = command.order_id
        known = state.orders.get(order_id)
        if known is None:
            message = f"order {order_id!r} is unknown (not placed yet?); replay once it exists"
            self._add_dlq(
                state, record, self.dead_letter(record, "cancel", CANCEL_REJECTED, message)
            )
            return
        key = order_id.encode()
        if known.status == "CANCELLED":
            if known.cancel is None:
                raise StoreError(f"inventory db: order {order_id} is CANCELLED without events")
            released, cancelled = known.cancel
            state.out.append(OutRecord(self.events_topic, key, released))
            state.out.append(OutRecord(self.events_topic, key, cancelled))
            state.stats.duplicates += 1
            return
        if known.status != "RESERVED":
            # a business outcome, not a processing failure: an event, not a DLQ entry
            rejected = CancelRejected(
                order_id=order_id,
                reason="ORDER_REJECTED",
                detail=f"order {order_id!r} is {known.status}; nothing to cancel",
                at=state.now,
            )
            state.out.append(OutRecord(self.events_topic, key, schema.encode(rejected)))
            state.stats.cancel_rejected += 1
            return

        for sku, quantity in known.items:
            row = state.stock.get(sku)
            if row is None:
                raise StoreError(f"inventory db: order {order_id} holds unknown sku {sku!r}")
            row[0] += quantity
            row[1] -= quantity
            state.changed.add(sku)
        released = schema.encode(
            StockReleased(
                order_id=order_id,
                items=tuple(ItemQty(sku, quantity) for sku, quantity in known.items),
                at=state.now,
            )
        )
        cancelled = schema.encode(
            OrderCancelled(order_id=order_id, at=state.now, detail=command.reason)
        )
        known.status = "CANCELLED"
        known.cancel = (released, cancelled)
        if known.new is not None:
            # decided in this very batch: insert it as CANCELLED straight away
            known.new = known.new._replace(status="CANCELLED")
        state.cancellations.append(
            NewCancellation(order_id, released, cancelled, state.now, record.where())
        )
        state.out.append(OutRecord(self.events_topic, key, released))
        state.out.append(OutRecord(self.events_topic, key, cancelled))
        state.stats.cancelled += 1

    # --- dead letters ------------------------------------------------------------------

    @staticmethod
    def _add_dlq(state: _Batch, record: InRecord, dlq: OutRecord) -> None:
        state.out.append(dlq)
        state.stats.dlq += 1
        if state.first_dlq is None:
            state.first_dlq = describe_dead_letter(record, dlq)


def _still_holds(
    planned: _Batch, seen: Mapping[str, StockRow], locked: Mapping[str, StockRow]
) -> bool:
    """Whether deciding the batch again on the ``locked`` stock rows would take exactly
    the decisions ``planned`` took on the ``seen`` ones (and so emit the same bytes).

    Only rows that moved in between matter. A moved sku keeps every decision when no
    rejection rests on its figure (an out-of-stock detail names it) or on its absence,
    and its locked ``available`` covers every unit the batch needed of it: then, order by
    order, each check on it passes again (cancels only add units), and the orders'
    events carry no stock figure of it.
    """
    for sku in seen.keys() | locked.keys():
        row = locked.get(sku)
        if row == seen.get(sku):
            continue
        if row is None or sku in planned.pinned or row.available < planned.needs.get(sku, 0):
            return False
    return True
