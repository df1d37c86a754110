"""Payments core: what an order's money needs next, and what each gateway answer means.

Two halves, both pure (no Kafka, no gateway inside):

- ``PaymentsService.handle(batch)`` reads ``order-events`` and records *intents* in one
  transaction of a ``PaymentsStore``: OrderReserved creates the order's row (an
  authorize due now); OrderShipped raises its goal to ``captured``; OrderCancelled and
  ReservationExpired to ``closed`` (with the cause). Every other event is skipped after
  reading its type alone. It returns only dead letters: the gateway work is done later
  by the worker (``apps/payments.py``), so the offsets commit behind durable intents.
- ``next_operation``, ``apply_outcome`` and ``after_failure`` are the worker's steps:
  which gateway operation a row needs, the row and events once the gateway decided, and
  the back-off when it did not.

The rules, per order (one row, keyed by order_id):

- authorize (goal ``authorized``, on OrderReserved) -> PaymentAuthorized or
  PaymentDeclined; capture (goal ``captured``, on OrderShipped) -> PaymentCaptured;
- close (OrderCancelled / ReservationExpired): authorized -> void -> PaymentVoided;
  captured -> refund -> PaymentRefunded; an authorize sent at least once (in flight, or
  waiting for its retry) runs to its end and an approval is then voided (late success,
  net money 0); one never sent is never sent (``abandoned``);
- every operation carries ``operation_key(order_id, op)``: retries and look-ups reuse
  it, so the gateway applies each at most once whatever happens here;
- a goal only moves forward, a state only follows a gateway answer: a redelivered
  event changes nothing.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from ordermesh import schema
from ordermesh.gateway.protocol import Operation, Outcome
from ordermesh.schema import (
    OrderCancelled,
    OrderEvent,
    OrderReserved,
    OrderShipped,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    ReservationExpired,
)
from ordermesh.services.base import OrderRowService, RowStats
from ordermesh.stores.outbox import OutboxRecord
from ordermesh.stores.payments import GOAL_RANK, Goal, PaymentRow, PaymentsStore

logger = logging.getLogger(__name__)

# the order-events payments acts on; the rest are skipped after a peek at their type
CONCERNS: Final = frozenset(
    {"OrderReserved", "OrderShipped", "OrderCancelled", "ReservationExpired"}
)
# back-off of a gateway that did not decide: first pause, longest pause (jitter below)
BACKOFF_S: Final = (0.2, 30.0)
# an unknown outcome the look-up says was never applied is retried soon (same key)
UNKNOWN_RETRY_S: Final = 0.2
MAX_DETAIL: Final = 500


def next_operation(state: str, goal: Goal, started: bool) -> Operation | None:
    """The gateway operation a row in ``state`` still needs to reach ``goal``."""
    if state == "pending":
        return None if goal == "closed" and not started else "authorize"
    if state == "authorized":
        return {"authorized": None, "captured": "capture", "closed": "void"}[goal]
    if state == "captured":
        return "refund" if goal == "closed" else None
    return None


def _with_op(row: PaymentRow, now: float) -> PaymentRow:
    """``row`` with its next operation recomputed (due now if it changed)."""
    op = next_operation(row.state, row.goal, row.started)
    if op == row.op:
        return row
    return row._replace(op=op, attempts=0, due_at=now, updated_at=now)


def _cause(event: OrderCancelled | ReservationExpired) -> str:
    return "CANCELLED" if isinstance(event, OrderCancelled) else "EXPIRED"


def apply_event(row: PaymentRow | None, event: OrderEvent, now: float) -> PaymentRow | None:
    """The order's row after ``event`` (the same object when it changes nothing; None
    when the order has no row and the event creates none). Raises ``ValueError`` for an
    OrderReserved whose total is not whole cents."""
    if isinstance(event, OrderReserved):
        if row is not None:
            return row  # redelivered: the first copy's row stands
        cents = schema.to_cents(event.total)
        if cents is None:
            raise ValueError(f"total {event.total} is not a whole number of cents")
        return PaymentRow(
            order_id=event.order_id,
            amount_cents=cents,
            currency=event.currency,
            customer_id=event.customer_id,
            card=event.card,
            state="pending",
            goal="authorized",
            cause="",
            authorization_id="",
            started=False,
            op="authorize",
            attempts=0,
            due_at=now,
            claimed_until=0.0,
            claim_token="",
            created_at=now,
            updated_at=now,
        )
    if row is None:
        return None  # never reserved here: nothing was authorized, nothing to undo
    goal: Goal
    if isinstance(event, OrderShipped):
        goal = "captured"
    elif isinstance(event, OrderCancelled | ReservationExpired):
        goal = "closed"
    else:
        return row
    if GOAL_RANK[goal] <= GOAL_RANK[row.goal]:
        return row
    changed = row._replace(goal=goal, updated_at=now)
    if goal == "closed":
        changed = changed._replace(cause=_cause(event))  # type: ignore[arg-type]
        if row.state == "pending" and not row.started:
            changed = changed._replace(state="abandoned")
    return _with_op(changed, now)


def _amount(cents: int) -> float:
    return cents / 100


def apply_outcome(
    row: PaymentRow, op: Operation, outcome: Outcome, now: float
) -> tuple[PaymentRow, list[msgspec.Struct]]:
    """The row after the gateway decided ``op`` (``row``: its current copy), and the
    events announcing it."""
    at = outcome.at or now
    oid = row.order_id
    events: list[msgspec.Struct] = []
    new = row
    if op == "authorize":
        if outcome.approved:
            new = row._replace(state="authorized", authorization_id=outcome.authorization_id)
            events.append(
                PaymentAuthorized(
                    oid, outcome.authorization_id, _amount(row.amount_cents), row.currency, at
                )
            )
        else:
            reason = outcome.reason or "declined"
            new = row._replace(state="declined")
            events.append(PaymentDeclined(oid, reason, f"gateway declined: {reason}", at))
    elif not outcome.approved:
        # a refused capture, void or refund: nothing the saga can decide; an operator's
        new = row._replace(state="failed")
    elif op == "capture":
        new = row._replace(state="captured")
        events.append(PaymentCaptured(oid, row.authorization_id, _amount(row.amount_cents), at))
    elif op == "void":
        new = row._replace(state="voided")
        cause = row.cause or "CANCELLED"
        events.append(
            PaymentVoided(oid, row.authorization_id, _amount(row.amount_cents), cause, at)  # type: ignore[arg-type]
        )
    elif op == "refund":
        new = row._replace(state="refunded")
        cause = row.cause or "CANCELLED"
        events.append(
            PaymentRefunded(oid, row.authorization_id, _amount(row.amount_cents), cause, at)  # type: ignore[arg-type]
        )
    new = new._replace(claimed_until=0.0, claim_token="", updated_at=now)
    op_next = next_operation(new.state, new.goal, new.started)
    return new._replace(op=op_next, attempts=0, due_at=now), events


def backoff_s(attempts: int, rng: Callable[[], float] = random.random) -> float:
    """Pause before try ``attempts + 1``: exponential, capped, with full jitter over its
    upper half (so instances retrying one gateway spread out)."""
    low, high = BACKOFF_S
    ceiling = min(high, low * 2.0 ** max(0, attempts - 1))
    return ceiling * (0.5 + 0.5 * rng())


def after_failure(row: PaymentRow, now: float, delay_s: float | None = None) -> PaymentRow:
    """The row after a try that decided nothing: same op, same key, later."""
    attempts = row.attempts + 1
    pause = backoff_s(attempts) if delay_s is None else delay_s
    return row._replace(
        attempts=attempts,
        due_at=now + pause,
        claimed_until=0.0,
        claim_token="",
        updated_at=now,
    )


def outbox_records(
    topic: str, order_id: str, events: Sequence[msgspec.Struct]
) -> list[OutboxRecord]:
    key = order_id.encode()
    return [OutboxRecord(topic, key, schema.encode(e)) for e in events]


@dataclass
class IntentStats(RowStats):
    """Counters of the batch handler since start."""

    reserved: int = 0
    shipped: int = 0
    closed: int = 0
    abandoned: int = 0


class PaymentsService(OrderRowService[PaymentRow, IntentStats]):
    """Pure payments intents over a ``PaymentsStore``; no Kafka, no gateway inside."""

    log = logger

    def __init__(
        self,
        store: PaymentsStore,
        *,
        events_topic: str,
        dlq_topic: str,
        service_name: str = "payments",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            store,
            events_topic=events_topic,
            dlq_topic=dlq_topic,
            service_name=service_name,
            clock=clock,
            concerns=CONCERNS,
            stats=IntentStats(),
        )

    def apply(self, row: PaymentRow | None, event: OrderEvent, now: float) -> PaymentRow | None:
        return apply_event(row, event, now)

    def count(self, stats: IntentStats, before: PaymentRow | None, after: PaymentRow) -> None:
        if before is None:
            stats.reserved += 1
        elif after.goal == "closed":
            stats.closed += 1
            stats.abandoned += after.state == "abandoned"
        else:
            stats.shipped += 1
