"""Inventory core: reserve stock for placed orders and release it for cancelled ones.

``InventoryService.handle(batch)`` turns a batch of consumed records into the records to
produce. The runner produces them, waits for every ack, and only then commits offsets;
a crash anywhere redelivers the batch, so ``handle`` is idempotent per order: a known
order (or an already cancelled one) re-emits the exact bytes stored with its decision and
changes nothing.

Choices worth knowing:

- The whole batch is one ``BEGIN IMMEDIATE`` transaction; outputs are returned only after
  COMMIT. Decoding happens before the transaction to keep the write lock short.
- One decision time (``clock()``) per batch: the batch is decided atomically.
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
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Final

from ordermesh import schema
from ordermesh.errors import DecodeError, StoreError
from ordermesh.records import ERROR_HEADER_PREFIX, InRecord, OutRecord, dead_letter, header
from ordermesh.schema import (
    CancelOrder,
    CancelRejected,
    ItemQty,
    OrderCancelled,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    RejectReason,
    StockReleased,
)
from ordermesh.stores.inventory import (
    InventoryStore,
    Items,
    NewCancellation,
    NewOrder,
    OrderStatus,
    StockRow,
)

logger = logging.getLogger(__name__)

CANCEL_REJECTED: Final = "CancelRejected"
DUPLICATE_ORDER_ID: Final = "DuplicateOrderId"


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
    """Mutable state of one batch inside its transaction."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.out: list[OutRecord] = []
        self.orders: dict[str, _Order] = {}
        self.stock: dict[str, list[int]] = {}  # sku -> [available, reserved]
        self.changed: set[str] = set()
        self.new_orders: list[str] = []
        self.cancellations: list[NewCancellation] = []
        self.stats = InventoryStats(batches=1)
        self.first_dlq: str | None = None


class InventoryService:
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
        decode_order: Callable[[bytes | None], OrderPlaced] = schema.decode_order,
    ) -> None:
        self.store = store
        # swappable only so the benchmark can run its stdlib-json baseline
        self._decode_order = decode_order
        self.orders_topic = orders_topic
        self.commands_topic = commands_topic
        self.events_topic = events_topic
        self.dlq_topic = dlq_topic
        self.service_name = service_name
        self._clock = clock
        self.stats = InventoryStats()

    def handle(self, batch: Sequence[InRecord]) -> list[OutRecord]:
        """Decide a batch in one transaction; the records to produce, in batch order.

        Never raises because of input; a ``StoreError`` means nothing was committed and
        the batch must be redelivered (do not commit its offsets).
        """
        if not batch:
            return []
        started = time.perf_counter()
        # (record, task, fingerprint of the order; b"" for other tasks)
        work: list[tuple[InRecord, OrderPlaced | CancelOrder | OutRecord, bytes]] = []
        order_ids: set[str] = set()
        skus: set[str] = set()
        # decode outside the transaction: CPU only, keeps the cross-process lock short
        for record in batch:
            if record.topic == self.orders_topic:
                try:
                    order = self._decode_order(record.value)
                except DecodeError as exc:
                    work.append((record, self._decode_dlq(record, exc), b""))
                    continue
                order_ids.add(order.order_id)
                for item in order.items:
                    skus.add(item.sku)
                work.append((record, order, schema.order_fingerprint(order)))
            elif record.topic == self.commands_topic:
                try:
                    command = schema.decode_command(record.value)
                except DecodeError as exc:
                    work.append((record, self._decode_dlq(record, exc), b""))
                    continue
                order_ids.add(command.order_id)
                work.append((record, command, b""))
            else:
                message = f"inventory does not consume {record.topic!r}"
                dlq = self._dlq(record, "route", "UnexpectedTopic", message)
                work.append((record, dlq, b""))

        state = _Batch(self._clock())
        # a batch of nothing but dead letters must not wait for the shared database's lock
        with self.store.transaction() if order_ids else nullcontext():
            for order_id, known in self.store.load_orders(order_ids).items():
                state.orders[order_id] = _Order(
                    known.status,
                    known.items,
                    known.outcome,
                    known.cancel_outcome,
                    None,
                    known.body_hash,
                )
                if known.status == "RESERVED":
                    # a cancel in this batch may release stock of skus no order here uses
                    skus.update(sku for sku, _ in known.items)
            for row in self.store.load_stock(skus).values():
                state.stock[row.sku] = [row.available, row.reserved]

            for record, task, body_hash in work:
                try:
                    if isinstance(task, OrderPlaced):
                        self._place(state, record, task, body_hash)
                    elif isinstance(task, CancelOrder):
                        self._cancel(state, record, task)
                    else:
                        state.out.append(task)
                        self._count_dlq(state, record, task)
                except StoreError:
                    raise
                except Exception as exc:  # a bug on one record must not stop the consumer
                    logger.exception("inventory: unexpected error on %s", record.where())
                    state.out.append(
                        self._dlq(record, "process", type(exc).__name__, f"unexpected: {exc!r}")
                    )
                    self._count_dlq(state, record, state.out[-1])

            self.store.update_stock(StockRow(sku, *state.stock[sku]) for sku in state.changed)
            self.store.insert_orders(
                new for oid in state.new_orders if (new := state.orders[oid].new) is not None
            )
            self.store.insert_cancellations(state.cancellations)

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

    # --- orders ------------------------------------------------------------------------

    def _place(self, state: _Batch, record: InRecord, order: OrderPlaced, body_hash: bytes) -> None:
        key = order.order_id.encode()
        known = state.orders.get(order.order_id)
        if known is not None:
            if known.body_hash is not None and known.body_hash != body_hash:
                dlq = self._dlq(
                    record,
                    "place",
                    DUPLICATE_ORDER_ID,
                    f"order id {order.order_id!r} was already decided ({known.status}) for"
                    " another order body; this one is not placed (use a new order id)",
                )
                state.out.append(dlq)
                self._count_dlq(state, record, dlq)
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
        unknown = [sku for sku in needed if sku not in stock]
        if unknown:
            reason = "UNKNOWN_SKU"
            shown = ", ".join(repr(sku) for sku in unknown[:5])
            more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            detail = f"unknown sku {shown}{more}"
        else:
            for sku, quantity in items:
                available = stock[sku][0]
                if available < quantity:
                    reason = "OUT_OF_STOCK"
                    detail = f"sku {sku!r}: needed {quantity}, available {available}"
                    break

        status: OrderStatus
        if reason is None:
            for sku, quantity in items:
                row = stock[sku]
                row[0] -= quantity
                row[1] += quantity
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
            dlq = self._dlq(
                record,
                "cancel",
                CANCEL_REJECTED,
                f"order {order_id!r} is unknown (not placed yet?); replay once it exists",
            )
            state.out.append(dlq)
            self._count_dlq(state, record, dlq)
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

    def _decode_dlq(self, record: InRecord, exc: DecodeError) -> OutRecord:
        return self._dlq(record, "decode", f"DecodeError.{exc.kind}", str(exc))

    def _dlq(self, record: InRecord, stage: str, error_class: str, message: str) -> OutRecord:
        return dead_letter(
            record,
            dlq_topic=self.dlq_topic,
            service=self.service_name,
            stage=stage,
            error_class=error_class,
            message=message,
        )

    @staticmethod
    def _count_dlq(state: _Batch, record: InRecord, dlq: OutRecord) -> None:
        state.stats.dlq += 1
        if state.first_dlq is None:
            raw = header(dlq.headers, ERROR_HEADER_PREFIX + "message") or b""
            message = raw.decode("utf-8", "replace")
            state.first_dlq = f"{record.where()}: {message}"
