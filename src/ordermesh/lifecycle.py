"""An order's life: its statuses, the events that move it, who owns each step, deadlines.

The one declaration that the tracker (which event moves which status), the API (the
statuses a client may wait for), analytics (the funnel), ``verify`` (a transition not
declared here is a bug it reports) and the docs (the table in ARCHITECTURE.md, checked by
a test) derive from, as ``topology.py`` is for processes.

::

    PLACED --OrderReserved--> RESERVED --OrderPaid--> PAID --OrderShipped--> SHIPPED
      |                         |  |  |                 |
      +--OrderRejected--> REJECTED |  |                 +--OrderCancelled--> CANCELLED
                                |  |  +--ReservationExpired--> EXPIRED
                                |  +--OrderPaymentFailed--> PAYMENT_FAILED
                                +--OrderCancelled--> CANCELLED

The inventory emits every event that moves a status: it holds the reservation, so it
alone decides each race on it (a payment against the deadline, a cancel against the
shipment). Payments and fulfilment emit facts (an authorization, a capture, a packed
parcel) that the inventory turns into decisions, and that the tracker records.

Late success: a payment authorized after its order ended (expired, cancelled) does not
revive it. The order stays in its terminal status and payments voids the authorization
(or refunds a capture), so the order's net money is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, NamedTuple, get_args

Status = Literal[
    "PLACED",
    "RESERVED",
    "PAID",
    "SHIPPED",
    "REJECTED",
    "PAYMENT_FAILED",
    "EXPIRED",
    "CANCELLED",
]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
TERMINAL: Final[frozenset[Status]] = frozenset(
    {"SHIPPED", "REJECTED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED"}
)
# Statuses whose order keeps its money at the end (captured, not refunded).
KEEPS_MONEY: Final[frozenset[Status]] = frozenset({"SHIPPED"})
# Statuses in which the inventory holds stock for the order, and where.
HOLDS: Final[Mapping[str, Literal["reserved", "committed"]]] = {
    "RESERVED": "reserved",
    "PAID": "committed",
}
# The happy path, in order: analytics' funnel.
FUNNEL: Final[tuple[Status, ...]] = ("PLACED", "RESERVED", "PAID", "SHIPPED")

# How far along a status is: an event never moves an order to a rank at or below its
# current one, so a redelivered or late event changes nothing.
RANK: Final[dict[Status, int]] = {
    "PLACED": 0,
    "RESERVED": 1,
    "REJECTED": 1,
    "PAID": 2,
    "PAYMENT_FAILED": 2,
    "EXPIRED": 2,
    "SHIPPED": 3,
    "CANCELLED": 3,
}


class Transition(NamedTuple):
    """``event`` moves an order from ``source`` to ``target``; ``owner`` emits it, on
    ``trigger`` (what it consumed or noticed)."""

    source: Status
    event: str
    target: Status
    owner: str
    trigger: str


TRANSITIONS: Final[tuple[Transition, ...]] = (
    Transition("PLACED", "OrderReserved", "RESERVED", "inventory", "OrderPlaced, stock enough"),
    Transition("PLACED", "OrderRejected", "REJECTED", "inventory", "OrderPlaced, stock short"),
    Transition("RESERVED", "OrderPaid", "PAID", "inventory", "PaymentAuthorized in time"),
    Transition("RESERVED", "OrderPaymentFailed", "PAYMENT_FAILED", "inventory", "PaymentDeclined"),
    Transition(
        "RESERVED", "ReservationExpired", "EXPIRED", "inventory", "the reservation's deadline"
    ),
    Transition("RESERVED", "OrderCancelled", "CANCELLED", "inventory", "CancelOrder"),
    Transition("PAID", "OrderShipped", "SHIPPED", "inventory", "ShipmentReady"),
    Transition("PAID", "OrderCancelled", "CANCELLED", "inventory", "CancelOrder"),
)


class Fact(NamedTuple):
    """An event that records what happened without moving the status."""

    event: str
    owner: str
    meaning: str


FACTS: Final[tuple[Fact, ...]] = (
    Fact("StockReleased", "inventory", "held stock went back on the shelf (with its cause)"),
    Fact("CancelRejected", "inventory", "a cancel that cannot apply, with the reason"),
    Fact("PaymentAuthorized", "payments", "the gateway holds the order's amount"),
    Fact("PaymentDeclined", "payments", "the gateway refused the authorization"),
    Fact("PaymentCaptured", "payments", "the held amount was taken, on shipment"),
    Fact("PaymentVoided", "payments", "the hold was dropped: the order ended unshipped"),
    Fact("PaymentRefunded", "payments", "a captured amount was given back"),
    Fact("ShipmentReady", "fulfilment", "a paid order was picked and packed"),
)


# Why a cancel cannot apply in a status it is not declared from (``CancelRejected``'s
# reason): the inventory refuses with it, the API answers 409 with it.
CANCEL_REFUSALS: Final[dict[Status, str]] = {
    "SHIPPED": "ALREADY_SHIPPED",
    "REJECTED": "ORDER_REJECTED",
    "PAYMENT_FAILED": "ALREADY_ENDED",
    "EXPIRED": "ALREADY_ENDED",
}
CANCELLABLE: Final[frozenset[Status]] = frozenset(
    t.source for t in TRANSITIONS if t.event == "OrderCancelled"
)


class Deadline(NamedTuple):
    """An order may stay in ``status`` at most ``setting`` seconds; ``owner`` enforces it
    by emitting ``event``. ``None`` event: the owner's work finishes it (no timer)."""

    status: Status
    setting: str
    owner: str
    event: str | None


DEADLINES: Final[tuple[Deadline, ...]] = (
    Deadline("RESERVED", "reservation_ttl_s", "inventory", "ReservationExpired"),
    Deadline("PAID", "fulfilment_delay_s", "fulfilment", None),
)

_BY_STEP: Final[dict[tuple[Status, str], Transition]] = {
    (t.source, t.event): t for t in TRANSITIONS
}
TARGET: Final[dict[str, Status]] = {t.event: t.target for t in TRANSITIONS}
FACT_EVENTS: Final[frozenset[str]] = frozenset(f.event for f in FACTS)
EVENTS: Final[frozenset[str]] = frozenset(TARGET) | FACT_EVENTS


def transition(source: Status, event: str) -> Transition | None:
    """The declared transition of ``event`` from ``source`` (None: not allowed)."""
    return _BY_STEP.get((source, event))


def moves(event: str) -> Status | None:
    """The status ``event`` moves an order to (None: it records a fact)."""
    return TARGET.get(event)


def is_terminal(status: Status) -> bool:
    return status in TERMINAL


def applies(current: Status, event: str) -> bool:
    """Whether ``event`` moves an order now in ``current`` forward.

    A declared transition always does; an undeclared one that still moves forward (an
    event read before the one it follows) does too, so the order catches up; anything
    at or below the current rank is stale and changes nothing. ``verify`` reports the
    undeclared ones it finds on the topic.
    """
    target = TARGET.get(event)
    if target is None or is_terminal(current):
        return False
    return RANK[target] > RANK[current]


def timeline(events: list[str]) -> tuple[Status, list[str]]:
    """The status a sequence of event types ends in, from PLACED, and the steps that
    were not declared transitions (``"STATUS --Event-->"``); facts are skipped, and so
    is a copy of an event the order already had (at-least-once delivery re-emits a
    step's events, possibly after the steps that followed it)."""
    status: Status = "PLACED"
    undeclared: list[str] = []
    seen: set[str] = set()
    for event in events:
        target = TARGET.get(event)
        if target is None:
            continue
        if event in seen:
            continue  # a redelivered copy: it moved the order when it first came
        seen.add(event)
        if transition(status, event) is None:
            undeclared.append(f"{status} --{event}-->")
            if not applies(status, event):
                continue
        status = target
    return status, undeclared


def markdown_table() -> str:
    """The transitions and facts as the Markdown table ARCHITECTURE.md shows (a test
    keeps the two equal)."""
    rows = [
        "| from | event | to | emitted by | on |",
        "|---|---|---|---|---|",
    ]
    rows += [
        f"| {t.source} | `{t.event}` | {t.target} | {t.owner} | {t.trigger} |" for t in TRANSITIONS
    ]
    rows += [f"| — | `{f.event}` | — | {f.owner} | {f.meaning} |" for f in FACTS]
    return "\n".join(rows) + "\n"
