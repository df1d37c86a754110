"""Each order's life as the topic tells it, checked against ``lifecycle`` and the money.

``verify`` reads ``order-events`` once and hands every decoded event to ``Lives.add``;
``audit`` then checks, per order:

- every status move on the topic is a declared transition (``lifecycle.TRANSITIONS``);
  a redelivered identical copy is not a move;
- an order that ended by a decline, an expiry or a cancel released its stock exactly once
  (one distinct ``StockReleased``), and no other order released any;
- nothing shipped without a capture (``PaymentCaptured`` on the topic), nothing captured
  that did not ship;
- with the gateway's ledger (the ground truth for money): no order authorized or
  captured twice; a shipped order kept exactly its total (captured - refunded); an order
  that ended otherwise kept nothing and holds nothing (every approved authorization
  voided, every capture refunded);
- no order sits in a non-terminal status past its deadline (``lifecycle.DEADLINES``).

Pending, not broken: a check whose answer still depends on work in flight (an event a
consumer group has not committed, a payment retrying its gateway call) counts as pending
while the order's last event is younger than ``grace_s`` or not settled; a drained mesh
has none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from ordermesh import lifecycle, schema
from ordermesh.gateway.wire import OrderSummary
from ordermesh.lifecycle import Status

# How long after an order's last event its pending work (a payment's retries with
# back-off, a deadline's sweep) may still be in flight.
DEFAULT_GRACE_S: Final = 30.0

PAYMENT_FACTS: Final = (
    "PaymentAuthorized",
    "PaymentDeclined",
    "PaymentCaptured",
    "PaymentVoided",
    "PaymentRefunded",
)
RELEASING: Final[frozenset[Status]] = frozenset({"PAYMENT_FAILED", "EXPIRED", "CANCELLED"})


@dataclass
class Life:
    """One order's events, reduced to what the checks need."""

    events: list[str] = field(default_factory=list)
    total_cents: int | None = None
    expires_at: float = 0.0
    paid_at: float | None = None
    last_at: float = 0.0
    # partition and offset of its last event on order-events
    last: tuple[int, int] = (0, 0)
    # distinct StockReleased copies (a redelivered copy is the same bytes)
    releases: set[bytes] = field(default_factory=set)
    facts: Counter[str] = field(default_factory=Counter)

    def status(self) -> tuple[Status, list[str]]:
        return lifecycle.timeline(self.events)


class Lives:
    """Every order's ``Life``, built from ``order-events`` in topic order."""

    def __init__(self) -> None:
        self.by_order: dict[str, Life] = {}

    def add(self, partition: int, offset: int, raw: bytes, event: schema.OrderEvent) -> None:
        life = self.by_order.get(event.order_id)
        if life is None:
            life = self.by_order[event.order_id] = Life()
        name = type(event).__name__
        life.events.append(name)
        life.last = (partition, offset)
        life.last_at = max(life.last_at, event.at)
        if isinstance(event, schema.OrderReserved):
            life.total_cents = schema.to_cents(event.total)
            life.expires_at = event.expires_at
        elif isinstance(event, schema.OrderPaid):
            life.paid_at = event.at
        elif isinstance(event, schema.StockReleased):
            life.releases.add(raw)
        if name in lifecycle.FACT_EVENTS:
            life.facts[name] += 1


def held_cents(money: OrderSummary) -> int:
    """Authorized, neither captured nor voided: still on hold on the card."""
    return max(0, money.authorized_cents - money.captured_cents - money.voided_cents)


@dataclass
class AuditReport:
    orders: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    # (kind, detail) of what is broken, and what is still pending
    violations: list[tuple[str, str]] = field(default_factory=list)
    pending: Counter[str] = field(default_factory=Counter)
    money_checked: bool = False
    captured_cents: int = 0
    refunded_cents: int = 0
    shipped_value_cents: int = 0

    def judge(self, kind: str, detail: str, *, pending: bool) -> None:
        if pending:
            self.pending[kind] += 1
        else:
            self.violations.append((kind, detail))

    def as_dict(self) -> dict[str, object]:
        return {
            "orders": self.orders,
            "statuses": {s: self.statuses.get(s, 0) for s in lifecycle.STATUSES},
            "money_checked": self.money_checked,
            "captured_cents": self.captured_cents,
            "refunded_cents": self.refunded_cents,
            "shipped_value_cents": self.shipped_value_cents,
            "pending": dict(self.pending),
            "violations": len(self.violations),
        }


def audit(
    lives: Lives,
    money: Mapping[str, OrderSummary] | None,
    *,
    now: float,
    settled: Callable[[str, Life], bool],
    fulfilment_delay_s: float,
    grace_s: float = DEFAULT_GRACE_S,
) -> AuditReport:
    """Check every order of ``lives`` (and of ``money``, the ledger, when given).

    ``settled(order_id, life)``: whether every consumer group committed the order's last
    event. A check that fails on an unsettled or recent order counts as pending.
    """
    report = AuditReport(money_checked=money is not None)
    for order_id, life in lives.by_order.items():
        status, undeclared = life.status()
        if status == "PLACED" and not life.events:
            continue
        report.orders += 1
        report.statuses[status] += 1
        pending = not settled(order_id, life) or now - life.last_at < grace_s
        for step in undeclared:
            report.judge("undeclared-transition", f"order {order_id}: {step}", pending=False)
        _check_releases(report, order_id, life, status, pending)
        _check_shipment(report, order_id, life, status, pending)
        _check_deadline(
            report,
            order_id,
            life,
            status,
            pending=not settled(order_id, life),
            now=now,
            fulfilment_delay_s=fulfilment_delay_s,
            grace_s=grace_s,
        )
        if money is not None:
            _check_money(
                report,
                order_id,
                life,
                status,
                money.get(order_id) or OrderSummary(order_id),
                pending,
            )
    if money is not None:
        for order_id in money.keys() - lives.by_order.keys():
            report.judge(
                "ledger-without-order",
                f"the gateway's ledger has order {order_id}, order-events does not",
                pending=False,
            )
    return report


def _check_releases(
    report: AuditReport, order_id: str, life: Life, status: Status, pending: bool
) -> None:
    releases = len(life.releases)
    if status in RELEASING:
        if releases == 0:
            report.judge("release-missing", f"order {order_id} is {status}", pending=pending)
        elif releases > 1:
            report.judge(
                "release-repeated",
                f"order {order_id} ({status}) released its stock {releases} times",
                pending=False,
            )
    elif releases:
        report.judge(
            "release-unexpected",
            f"order {order_id} is {status} but released stock",
            pending=pending,
        )


def _check_shipment(
    report: AuditReport, order_id: str, life: Life, status: Status, pending: bool
) -> None:
    captured = life.facts["PaymentCaptured"] > 0
    if status == "SHIPPED" and not captured:
        report.judge("shipped-uncaptured", f"order {order_id} shipped", pending=pending)
    elif captured and status != "SHIPPED" and life.facts["PaymentRefunded"] == 0:
        report.judge(
            "captured-unshipped",
            f"order {order_id} is {status}, its payment captured and not refunded",
            pending=pending,
        )


def _check_deadline(
    report: AuditReport,
    order_id: str,
    life: Life,
    status: Status,
    *,
    pending: bool,
    now: float,
    fulfilment_delay_s: float,
    grace_s: float,
) -> None:
    # a reservation's deadline travels with it (expires_at); a paid order's is its
    # pick-and-pack time
    if status == "RESERVED" and life.expires_at > 0:
        late = now - (life.expires_at + grace_s)
    elif status == "PAID" and life.paid_at is not None:
        late = now - (life.paid_at + fulfilment_delay_s + grace_s)
    else:
        return
    if late > 0:
        report.judge(
            "past-deadline",
            f"order {order_id} is still {status} {late:.0f} s past its deadline and grace",
            pending=pending,
        )


def _check_money(
    report: AuditReport,
    order_id: str,
    life: Life,
    status: Status,
    money: OrderSummary,
    pending: bool,
) -> None:
    report.captured_cents += money.captured_cents
    report.refunded_cents += money.refunded_cents
    if money.authorizations > 1:
        report.judge(
            "double-charge",
            f"order {order_id}: {money.authorizations} approved authorizations in the ledger",
            pending=False,
        )
    if money.captures > 1:
        report.judge(
            "double-capture",
            f"order {order_id}: {money.captures} captures in the ledger",
            pending=False,
        )
    if status == "SHIPPED":
        total = life.total_cents or 0
        report.shipped_value_cents += total
        if money.kept_cents != total:
            report.judge(
                "money-shipped",
                f"order {order_id} shipped for {total} cents, the ledger kept {money.kept_cents}",
                pending=pending,
            )
    elif lifecycle.is_terminal(status) and (money.kept_cents or held_cents(money)):
        report.judge(
            "money-kept",
            f"order {order_id} is {status}: the ledger kept {money.kept_cents} and holds"
            f" {held_cents(money)} cents",
            pending=pending,
        )
