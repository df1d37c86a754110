"""Inventory core: the arbiter of an order's life (``lifecycle.py``).

It reserves stock for placed orders and decides every later status move on the facts of
payments and fulfilment and on the commands: ``PaymentAuthorized`` in time pays the
order (reserved -> committed), past the reservation's deadline expires it;
``PaymentDeclined`` fails it; ``ShipmentReady`` ships a paid order (committed ->
shipped); ``CancelOrder`` cancels it at every stage that still holds stock;
``ExpireReservation`` (the deadline sweep's) expires it once its deadline passed;
``Restock`` adds a supplier's units once per restock id. After each batch a sku whose
available units fell below the reorder point gets a reorder (``apps/inventory.py``'s
sweep asks for its ``Restock`` once it is due).

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
- Cancelling an order that holds nothing emits ``CancelRejected`` with the reason (a
  business outcome). Cancelling an unknown order goes to the DLQ (stage ``cancel``,
  class ``CancelRejected``).
  ``orders`` and ``order-commands`` are not ordered with respect to each other, so a
  cancel can overtake its order; it is not parked here but dead-lettered so an operator
  (or the DLQ replay tool) can replay it once the order exists.

The later steps are simpler than ``OrderPlaced``'s: they decide on the order's status
(read without locks like the rest) and never on stock figures, so ``_still_holds`` is
untouched by them (a release or a restock only adds available units, like a cancel).
What keeps N instances right is that every status move of a known order is a
compare-and-set in the store (``move_orders``): an order another instance moved
meanwhile (its events and commands are on different topics, so possibly another
instance's partitions) fails the attempt, which is run again on what it recorded.

Redeliveries: each step is stored with the trigger that caused it and the exact bytes
it emitted. A trigger that finds its order already past the step re-emits those bytes
when the stored step is its own (same event type; for ``ExpireReservation``, which the
sweeps of N instances may each send, the same record, ``topic[p]@offset``), and
otherwise emits nothing: a late ``PaymentAuthorized`` of an expired or cancelled order
does not revive it (payments voids it on seeing the terminal event).

``order-events`` carries every event, most of which the inventory does not act on: they
are skipped on a byte search for the three type tags, before any decode. An undecodable
one is counted and skipped, not dead-lettered: the tracker dead-letters bad
``order-events`` already, and one copy of it in the DLQ is enough.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Final

import msgspec

from ordermesh import lifecycle, schema
from ordermesh.errors import DecodeError, StoreConflictError, StoreError
from ordermesh.records import InRecord, OutRecord
from ordermesh.schema import (
    CancelOrder,
    CancelRejected,
    CancelRejectReason,
    ExpireReservation,
    ItemQty,
    OrderCancelled,
    OrderCommand,
    OrderPaid,
    OrderPaymentFailed,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    OrderShipped,
    PaymentAuthorized,
    PaymentDeclined,
    RejectReason,
    ReleaseCause,
    ReservationExpired,
    Restock,
    ShipmentReady,
    StockReleased,
)
from ordermesh.services.base import StoreService, describe_dead_letter
from ordermesh.stores.inventory import (
    MAX_STOCK,
    AppliedRestock,
    InventoryStore,
    Items,
    KnownOrder,
    NewCancellation,
    NewOrder,
    OrderStatus,
    OrderStep,
    Reorder,
    StatusMove,
    StepTrigger,
    StockRow,
)

logger = logging.getLogger(__name__)

CANCEL_REJECTED: Final = "CancelRejected"
DUPLICATE_ORDER_ID: Final = "DuplicateOrderId"
RESTOCK_REFUSED: Final = "RestockRefused"
# A batch that lost to another instance (StoreConflictError) runs again from scratch up to
# this many times in all, after a jittered pause growing by this much per attempt
CONFLICT_ATTEMPTS: Final = 8
CONFLICT_BACKOFF_S: Final = 0.02

# the order-events the inventory decides on
_Fact = PaymentAuthorized | PaymentDeclined | ShipmentReady
_Task = OrderPlaced | OrderCommand | _Fact | OutRecord
# (record, task, fingerprint of the order; b"" for other tasks)
_Work = tuple[InRecord, _Task, bytes]
# their type tags: an event without one of them in its bytes is not decoded at all
_FACT_TAGS: Final = tuple(
    f'"{t.__name__}"'.encode() for t in (PaymentAuthorized, PaymentDeclined, ShipmentReady)
)
# where a sku's units are, in the core's stock rows
AVAILABLE, RESERVED, COMMITTED, SHIPPED = range(4)
_HELD_IN: Final[dict[str, int]] = {
    status: {"reserved": RESERVED, "committed": COMMITTED}[where]
    for status, where in lifecycle.HOLDS.items()
}
_CANCEL_REJECTIONS: Final[dict[str, CancelRejectReason]] = {
    "REJECTED": "ORDER_REJECTED",
    "SHIPPED": "ALREADY_SHIPPED",
    "EXPIRED": "ALREADY_ENDED",
    "PAYMENT_FAILED": "ALREADY_ENDED",
}


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
    paid: int = 0
    payment_failed: int = 0
    expired: int = 0
    shipped: int = 0
    restocked: int = 0  # Restock commands applied
    reorders: int = 0  # reorders opened
    skipped: int = 0  # order-events the inventory does not act on
    undecodable: int = 0  # order-events that could not be decoded (skipped)
    unknown: int = 0  # facts and expiries of orders this inventory never decided
    ignored: int = 0  # facts and expiries that found their order elsewhere: nothing to do

    def add(self, other: InventoryStats) -> None:
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        for f in fields(self):
            if f.name != "rejected":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class _Order:
    """In-batch view of one order: loaded from the store or decided in this batch."""

    __slots__ = (
        "body_hash",
        "cancel",
        "expires_at",
        "items",
        "new",
        "outcome",
        "status",
        "steps",
        "stored",
    )

    def __init__(
        self,
        status: OrderStatus,
        items: Items,
        outcome: bytes,
        cancel: tuple[bytes, bytes] | None,
        new: NewOrder | None,
        body_hash: bytes | None,
        expires_at: float | None = None,
        steps: tuple[OrderStep, ...] = (),
    ) -> None:
        self.status = status
        # the status as stored before this batch (None: decided in this batch), the
        # "expected" of its compare-and-set
        self.stored: OrderStatus | None = None if new is not None else status
        self.items = items
        self.outcome = outcome
        self.cancel = cancel
        self.new = new  # the row to insert, when decided in this batch
        self.body_hash = body_hash
        self.expires_at = expires_at
        self.steps = steps

    def move(self, status: OrderStatus) -> None:
        self.status = status
        if self.new is not None:
            # decided in this very batch: inserted with its latest status straight away
            self.new = self.new._replace(status=status)


class _Batch:
    """Mutable state of one batch decided on given known orders and stock."""

    def __init__(self, now: float, stock: Mapping[str, StockRow]) -> None:
        self.now = now
        self.out: list[OutRecord] = []
        self.orders: dict[str, _Order] = {}
        # sku -> [available, reserved, committed, shipped]
        self.stock: dict[str, list[int]] = {
            sku: [row.available, row.reserved, row.committed, row.shipped]
            for sku, row in stock.items()
        }
        self.changed: set[str] = set()
        # what the decisions rest on (see _still_holds): units per sku that had to be
        # available (reserved, or checked before an order fell short on another sku), and
        # the skus whose exact figure (or absence) decided a rejection
        self.needs: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.new_orders: list[str] = []
        self.cancellations: list[NewCancellation] = []
        self.steps: list[OrderStep] = []
        self.restocks: list[AppliedRestock] = []
        self.applied: set[str] = set()  # restock ids applied, before or in this batch
        self.stats = InventoryStats(batches=1)
        self.first_dlq: str | None = None

    def decided(self) -> dict[str, NewOrder]:
        """The rows of the orders decided in this batch, in batch order."""
        return {oid: new for oid in self.new_orders if (new := self.orders[oid].new) is not None}

    def moves(self) -> list[StatusMove]:
        """The compare-and-set of every known order whose status this batch moved."""
        return [
            StatusMove(order_id, order.stored, order.status)
            for order_id, order in self.orders.items()
            if order.stored is not None and order.status != order.stored
        ]

    def writes(self) -> bool:
        return bool(
            self.new_orders or self.cancellations or self.changed or self.steps or self.restocks
        )

    def shift(self, order_id: str, items: Items, source: int, target: int) -> None:
        """Move an order's units from one place to another (``AVAILABLE``...)."""
        for sku, quantity in items:
            row = self.stock.get(sku)
            if row is None:
                raise StoreError(f"inventory db: order {order_id} holds unknown sku {sku!r}")
            row[source] -= quantity
            row[target] += quantity
            self.changed.add(sku)


@dataclass
class _Keys:
    """What a batch names: the rows to read for it."""

    orders: set[str] = field(default_factory=set)  # every order it names
    steps: set[str] = field(default_factory=set)  # orders whose steps it needs
    skus: set[str] = field(default_factory=set)
    restocks: set[str] = field(default_factory=set)


class InventoryService(StoreService[InventoryStore, OrderPlaced | OrderCommand]):
    """Pure inventory logic over an ``InventoryStore``; no Kafka inside.

    ``reservation_ttl_s``: how long a reservation holds for its payment (None: for ever,
    as before deadlines existed). ``reorder_point`` (0: never), ``reorder_quantity`` and
    ``supplier_delay_s``: the supply model's reorders.
    """

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
        reservation_ttl_s: float | None = None,
        reorder_point: int = 0,
        reorder_quantity: int = 1,
        supplier_delay_s: float = 0.0,
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
        self.reservation_ttl_s = reservation_ttl_s
        self.reorder_point = reorder_point
        self.reorder_quantity = reorder_quantity
        self.supplier_delay_s = supplier_delay_s
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
        keys = _Keys()
        skipped = undecodable = 0
        events_topic = self.events_topic
        # decode outside the transaction: CPU only, keeps the cross-process lock short
        for record in batch:
            if record.topic == events_topic:
                raw = record.value
                if raw is None or not any(tag in raw for tag in _FACT_TAGS):
                    skipped += 1  # the bulk of order-events: not ours to act on
                    continue
                try:
                    event = schema.decode_event(raw)
                except DecodeError:
                    undecodable += 1  # the tracker dead-letters it (module docstring)
                    continue
                if isinstance(event, PaymentAuthorized | PaymentDeclined | ShipmentReady):
                    keys.steps.add(event.order_id)
                    work.append((record, event, b""))
                else:
                    skipped += 1
                continue
            try:
                task = self.decode(record)
            except DecodeError as exc:
                work.append((record, self.decode_dead_letter(record, exc), b""))
                continue
            if isinstance(task, OrderPlaced):
                keys.orders.add(task.order_id)
                for item in task.items:
                    keys.skus.add(item.sku)
                work.append((record, task, schema.order_fingerprint(task)))
                continue
            if isinstance(task, CancelOrder):
                keys.orders.add(task.order_id)
            elif isinstance(task, ExpireReservation):
                keys.steps.add(task.order_id)
            elif isinstance(task, Restock):
                keys.restocks.add(task.restock_id)
                keys.skus.add(task.sku)
            # else: the dead letter of a record of an unexpected topic
            work.append((record, task, b""))
        keys.orders |= keys.steps

        state = self._decide_retrying(work, keys)
        stats = state.stats
        stats.records = len(batch)
        stats.skipped += skipped
        stats.undecodable += undecodable
        self.stats.add(stats)
        elapsed = time.perf_counter() - started
        logger.debug(
            "inventory batch: %d records in %.1f ms: reserved %d, rejected %s, duplicates %d,"
            " paid %d, shipped %d, expired %d, payment failed %d, cancelled %d, restocked %d,"
            " reorders %d, skipped %d, dlq %d",
            len(batch),
            elapsed * 1000,
            stats.reserved,
            stats.rejected,
            stats.duplicates,
            stats.paid,
            stats.shipped,
            stats.expired,
            stats.payment_failed,
            stats.cancelled,
            stats.restocked,
            stats.reorders,
            stats.skipped,
            stats.dlq,
        )
        if stats.dlq:
            logger.warning(
                "inventory batch: %d records dead-lettered; first: %s", stats.dlq, state.first_dlq
            )
        if undecodable:
            logger.warning(
                "inventory batch: %d undecodable order-events skipped (the tracker"
                " dead-letters them)",
                undecodable,
            )
        return state.out

    def _decide_retrying(self, work: list[_Work], keys: _Keys) -> _Batch:
        """``_decide`` the batch, running it again from scratch when it lost to another
        instance (``StoreConflictError``: the transaction was rolled back)."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                # fresh in-memory state each time: the rolled-back attempt's is stale
                return self._decide(work, keys, set(keys.skus))
            except StoreConflictError as exc:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                self.stats.conflicts += 1
                logger.info("inventory batch: attempt %d lost (%s); running it again", attempt, exc)
                # jittered backoff: two instances that collided should not collide again
                time.sleep(random.uniform(0, CONFLICT_BACKOFF_S * attempt))
        raise AssertionError("unreachable")

    def _decide(self, work: list[_Work], keys: _Keys, skus: set[str]) -> _Batch:
        """Decide the batch and record it in one transaction; its state once committed."""
        now = self._clock()
        if not (keys.orders or keys.restocks):
            # nothing but dead letters: nothing to read, nothing to write
            return self._run(work, {}, {}, {}, set(), now)
        store = self.store
        # read and decide without locks: the per-order work must not hold up other instances
        known = store.load_orders(keys.orders) if keys.orders else {}
        for order in known.values():
            if order.status in _HELD_IN:
                # a cancel or step in this batch may move stock of skus no order here uses
                skus.update(sku for sku, _ in order.items)
        ids = keys.steps & known.keys()
        steps = store.load_steps(ids) if ids else {}
        applied = store.applied_restocks(keys.restocks) if keys.restocks else set()
        seen = store.load_stock(skus)
        planned = self._run(work, known, steps, seen, applied, now)
        if not planned.writes():
            # redeliveries only: every answer comes from committed rows, nothing to write
            return planned
        # which skus may need a reorder, asked before the locks (None: reorders are off)
        low = self._low(planned.stock, planned.changed)
        already_open = store.open_reorders(low) if low else set()
        with store.transaction():
            # the orders before the stock locks: an order another instance recorded or
            # moved meanwhile fails the attempt here, before it made anybody wait
            rows = planned.decided()
            store.insert_orders(rows.values())
            moves = planned.moves()
            store.move_orders(moves)
            # the stock rows stay locked from here to the commit
            locked = store.load_stock(skus)
            if _still_holds(planned, seen, locked):
                state = planned
                changes = [
                    StockRow(
                        sku,
                        *(
                            now_ + planned_ - seen_
                            for now_, planned_, seen_ in zip(
                                locked[sku][1:], state.stock[sku], seen[sku][1:], strict=True
                            )
                        ),
                    )
                    for sku in state.changed
                ]
            else:
                # the stock moved under scarce orders: decide again on the locked rows
                state = self._run(work, known, steps, locked, applied, now)
                again = state.decided()
                if again.keys() != rows.keys() or state.moves() != moves:
                    # both runs see the same known orders, so they decide the same orders
                    raise RuntimeError("inventory: the batch decided again names other orders")
                store.update_orders(new for oid, new in again.items() if new != rows[oid])
                changes = [StockRow(sku, *state.stock[sku]) for sku in state.changed]
            store.update_stock(changes)
            store.insert_steps(state.steps)
            store.insert_cancellations(state.cancellations)
            store.apply_restocks(state.restocks)
            if low:
                reorders = [
                    Reorder(
                        uuid.uuid4().hex,
                        row.sku,
                        self.reorder_quantity,
                        now,
                        now + self.supplier_delay_s,
                    )
                    for row in sorted(changes)
                    if row.sku in low
                    and row.sku not in already_open
                    and row.available < self.reorder_point
                ]
                state.stats.reorders = store.insert_reorders(reorders)
        if state.stats.reorders:
            logger.info(
                "inventory: %d sku(s) fell below %d available; reordered %d units each",
                state.stats.reorders,
                self.reorder_point,
                self.reorder_quantity,
            )
        return state

    def _low(self, stock: Mapping[str, list[int]], changed: set[str]) -> set[str]:
        """The changed skus whose available units fell below the reorder point."""
        point = self.reorder_point
        if point <= 0:
            return set()
        return {sku for sku in changed if stock[sku][AVAILABLE] < point}

    def _run(
        self,
        work: list[_Work],
        known: Mapping[str, KnownOrder],
        steps: Mapping[str, tuple[OrderStep, ...]],
        stock: Mapping[str, StockRow],
        applied: set[str],
        now: float,
    ) -> _Batch:
        """Decide every record of the batch on ``known`` orders and ``stock``; no I/O."""
        state = _Batch(now, stock)
        state.applied = set(applied)
        for order_id, order in known.items():
            state.orders[order_id] = _Order(
                order.status,
                order.items,
                order.outcome,
                order.cancel_outcome,
                None,
                order.body_hash,
                order.expires_at,
                steps.get(order_id, ()),
            )

        def step(record: InRecord, task: _Task, body_hash: bytes) -> None:
            if isinstance(task, OrderPlaced):
                self._place(state, record, task, body_hash)
            elif isinstance(task, CancelOrder):
                self._cancel(state, record, task)
            elif isinstance(task, PaymentAuthorized):
                self._authorized(state, record, task)
            elif isinstance(task, PaymentDeclined):
                self._declined(state, record, task)
            elif isinstance(task, ShipmentReady):
                self._shipment_ready(state, record, task)
            elif isinstance(task, ExpireReservation):
                self._expire(state, record, task)
            elif isinstance(task, Restock):
                self._restock(state, record, task)
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
            state.out.append(OutRecord(self.events_topic, key, known.outcome, source=record))
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
        expires_at: float | None = None
        if reason is None:
            for sku, quantity in items:
                row = stock[sku]
                row[0] -= quantity
                row[1] += quantity
                needs[sku] = needs.get(sku, 0) + quantity
            state.changed.update(needed)
            status = "RESERVED"
            if self.reservation_ttl_s is not None:
                expires_at = state.now + self.reservation_ttl_s
            outcome = schema.encode(
                OrderReserved(
                    order_id=order.order_id,
                    items=tuple(ItemQty(sku, quantity) for sku, quantity in items),
                    total=order.total,
                    currency=order.currency,
                    order_created_at=order.created_at,
                    at=state.now,
                    expires_at=expires_at or 0.0,
                    customer_id=order.customer_id,
                    card=order.card,
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
            order.order_id,
            status,
            reason,
            items,
            outcome,
            state.now,
            record.where(),
            body_hash,
            expires_at,
        )
        state.orders[order.order_id] = _Order(
            status, items, outcome, None, new, body_hash, expires_at
        )
        state.new_orders.append(order.order_id)
        state.out.append(OutRecord(self.events_topic, key, outcome, source=record))

    # --- the later steps ---------------------------------------------------------------

    def _known(self, state: _Batch, order_id: str) -> _Order | None:
        order = state.orders.get(order_id)
        if order is None:
            # facts follow the inventory's own events, so only a lost or foreign database
            # gets here; nothing to decide on
            state.stats.unknown += 1
        return order

    def _in_status(
        self,
        state: _Batch,
        record: InRecord,
        order_id: str,
        status: OrderStatus,
        trigger: StepTrigger,
    ) -> _Order | None:
        """The order when it is ``status``, the one ``trigger`` applies to; otherwise
        None, once what ``trigger`` caused before (if anything) is re-emitted."""
        order = self._known(state, order_id)
        if order is None:
            return None
        if order.status != status:
            self._replay(state, record, order, trigger)
            return None
        return order

    def _advance(
        self,
        state: _Batch,
        record: InRecord,
        order: _Order,
        event: OrderPaid | OrderShipped,
        moved: tuple[int, int],
        trigger: StepTrigger,
    ) -> None:
        """Move the order's units ``moved`` (from, to) and record ``event``'s step."""
        status: OrderStatus = "PAID" if isinstance(event, OrderPaid) else "SHIPPED"
        state.shift(event.order_id, order.items, *moved)
        self._step(state, record, order, event.order_id, status, trigger, (event,))

    def _authorized(self, state: _Batch, record: InRecord, fact: PaymentAuthorized) -> None:
        order = self._in_status(state, record, fact.order_id, "RESERVED", "PaymentAuthorized")
        if order is None:
            return
        if order.expires_at is not None and fact.at > order.expires_at:
            # authorized too late: the reservation ended before; payments voids it
            self._release(
                state,
                record,
                order,
                fact.order_id,
                "EXPIRED",
                "PaymentAuthorized",
                ReservationExpired(fact.order_id, expires_at=order.expires_at, at=state.now),
            )
            return
        paid = OrderPaid(fact.order_id, fact.authorization_id, fact.amount, at=state.now)
        self._advance(state, record, order, paid, (RESERVED, COMMITTED), "PaymentAuthorized")
        state.stats.paid += 1

    def _declined(self, state: _Batch, record: InRecord, fact: PaymentDeclined) -> None:
        order = self._in_status(state, record, fact.order_id, "RESERVED", "PaymentDeclined")
        if order is None:
            return
        failed = OrderPaymentFailed(fact.order_id, fact.reason, fact.detail, at=state.now)
        self._release(
            state, record, order, fact.order_id, "PAYMENT_FAILED", "PaymentDeclined", failed
        )

    def _shipment_ready(self, state: _Batch, record: InRecord, fact: ShipmentReady) -> None:
        order = self._in_status(state, record, fact.order_id, "PAID", "ShipmentReady")
        if order is None:
            return
        shipped = OrderShipped(fact.order_id, fact.shipment_id, at=state.now)
        self._advance(state, record, order, shipped, (COMMITTED, SHIPPED), "ShipmentReady")
        state.stats.shipped += 1

    def _expire(self, state: _Batch, record: InRecord, command: ExpireReservation) -> None:
        order = self._known(state, command.order_id)
        if order is None:
            return
        deadline = order.expires_at
        if order.status != "RESERVED" or deadline is None or state.now < deadline:
            # sweeps of N instances may each ask: only the record that expired it answers
            self._replay(state, record, order, "ExpireReservation", record.where())
            return
        expired = ReservationExpired(command.order_id, expires_at=deadline, at=state.now)
        self._release(
            state, record, order, command.order_id, "EXPIRED", "ExpireReservation", expired
        )

    def _release(
        self,
        state: _Batch,
        record: InRecord,
        order: _Order,
        order_id: str,
        status: OrderStatus,
        trigger: StepTrigger,
        ended: ReservationExpired | OrderPaymentFailed,
    ) -> None:
        """End a RESERVED order: its units back on the shelf, the step recorded."""
        cause: ReleaseCause = "EXPIRED" if status == "EXPIRED" else "PAYMENT_FAILED"
        released = self._released(state, order, order_id, "RESERVED", cause)
        self._step(state, record, order, order_id, status, trigger, (released, ended))
        if status == "EXPIRED":
            state.stats.expired += 1
        else:
            state.stats.payment_failed += 1

    def _released(
        self, state: _Batch, order: _Order, order_id: str, held: str, cause: ReleaseCause
    ) -> StockReleased:
        state.shift(order_id, order.items, _HELD_IN[held], AVAILABLE)
        items = tuple(ItemQty(sku, quantity) for sku, quantity in order.items)
        return StockReleased(order_id=order_id, items=items, at=state.now, cause=cause)

    def _step(
        self,
        state: _Batch,
        record: InRecord,
        order: _Order,
        order_id: str,
        status: OrderStatus,
        trigger: StepTrigger,
        events: tuple[msgspec.Struct, ...],
    ) -> None:
        encoded = tuple(schema.encode(event) for event in events)
        step = OrderStep(order_id, status, trigger, encoded, state.now, record.where())
        order.move(status)
        order.steps = (*order.steps, step)
        state.steps.append(step)
        key = order_id.encode()
        state.out.extend(
            OutRecord(self.events_topic, key, value, source=record) for value in encoded
        )

    def _replay(
        self,
        state: _Batch,
        record: InRecord,
        order: _Order,
        trigger: StepTrigger,
        source: str | None = None,
    ) -> None:
        """Re-emit the stored step(s) this trigger caused; nothing if it caused none.
        ``record`` is the input asking again: the outputs' source."""
        replayed = False
        for step in order.steps:
            if step.trigger == trigger and (source is None or step.source == source):
                key = step.order_id.encode()
                state.out.extend(
                    OutRecord(self.events_topic, key, value, source=record) for value in step.events
                )
                replayed = True
        if replayed:
            state.stats.duplicates += 1
        else:
            state.stats.ignored += 1

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
            state.out.append(OutRecord(self.events_topic, key, released, source=record))
            state.out.append(OutRecord(self.events_topic, key, cancelled, source=record))
            state.stats.duplicates += 1
            return
        stage = known.status
        if stage not in _HELD_IN:
            # a business outcome, not a processing failure: an event, not a DLQ entry
            rejected = CancelRejected(
                order_id=order_id,
                reason=_CANCEL_REJECTIONS.get(stage, "ALREADY_ENDED"),
                detail=f"order {order_id!r} is {stage}; nothing to cancel",
                at=state.now,
            )
            state.out.append(
                OutRecord(self.events_topic, key, schema.encode(rejected), source=record)
            )
            state.stats.cancel_rejected += 1
            return

        released = schema.encode(self._released(state, known, order_id, stage, "CANCELLED"))
        cancelled = schema.encode(
            OrderCancelled(order_id=order_id, at=state.now, detail=command.reason, stage=stage)
        )
        known.move("CANCELLED")
        known.cancel = (released, cancelled)
        state.cancellations.append(
            NewCancellation(order_id, released, cancelled, state.now, record.where())
        )
        state.out.append(OutRecord(self.events_topic, key, released, source=record))
        state.out.append(OutRecord(self.events_topic, key, cancelled, source=record))
        state.stats.cancelled += 1

    def _restock(self, state: _Batch, record: InRecord, command: Restock) -> None:
        if command.restock_id in state.applied:
            state.stats.duplicates += 1  # its units were added once already
            return
        sku = command.sku
        # the decision rests on the row's figures (or absence): decided again if it moved
        state.pinned.add(sku)
        row = state.stock.get(sku)
        problem = None
        if row is None:
            problem = f"restock {command.restock_id!r}: unknown sku {sku!r}"
        elif row[AVAILABLE] + row[RESERVED] + row[COMMITTED] + command.quantity > MAX_STOCK:
            problem = (
                f"restock {command.restock_id!r} of {sku!r} by {command.quantity} would"
                f" exceed the maximum stock {MAX_STOCK}"
            )
        if problem is not None or row is None:
            dlq = self.dead_letter(record, "restock", RESTOCK_REFUSED, problem or "")
            self._add_dlq(state, record, dlq)
            return
        row[AVAILABLE] += command.quantity
        state.changed.add(sku)
        state.applied.add(command.restock_id)
        state.restocks.append(
            AppliedRestock(command.restock_id, sku, command.quantity, state.now, record.where())
        )
        state.stats.restocked += 1

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
