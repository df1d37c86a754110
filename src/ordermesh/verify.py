"""``ordermesh verify``: check the system's invariants from the topics and the stores.

Invariants:

- every record of ``orders`` has an outcome in ``order-events`` (valid orders) or a DLQ
  entry pointing at its partition and offset (invalid ones);
- every record of ``order-commands`` has an effect: for a ``CancelOrder``, an
  ``OrderCancelled`` or ``CancelRejected`` event of its order; otherwise (an unknown
  order, an undecodable command) a DLQ entry pointing at it. The effect agrees with the
  order's outcome: only a reserved order is cancelled, only a rejected one refuses;
- no order has two different outcomes (a repeated identical copy, which at-least-once
  delivery allows after a crash, is counted, not an error); every ``order-events``
  record decodes;
- the inventory DB agrees with the topics: every decided order has a row with the same
  outcome, and the DB holds no order the topics lack;
- per SKU, over every SKU the DB (stock, orders, seeds and restocks) or the events name:
  a stock row exists, seeded + restocked == available + reserved, the reserved quantity
  equals what the RESERVED orders hold in the DB and what the ``OrderReserved`` events
  (not cancelled) hold; no negative stock;
- the tracker (unless the caller says the deployment has none): its DB exists, every
  valid order has a row whose status is the one the inventory DB decided (RESERVED,
  REJECTED, CANCELLED; PLACED only while the inventory has not decided it); the tracker
  holds no order the topics lack.

Both stores are opened read-only: a missing store is a violation, never a new empty one.

Pending, not lost: a record at or past its consumer group's committed offset has not
been processed for good yet, so a check that depends on it counts as ``pending`` rather
than as a violation. ``ok`` means no violation; ``pending > 0`` means the answer is not
final yet (the CLI's ``--wait-drained`` waits for the groups first). This holds while the
services run because of the reading order: committed offsets first, then the stores,
then the topics. Whatever a group committed was in the stores and on the topics before
either is read; the stores hold nothing the topics read afterwards lack. The checks
within the inventory DB (conservation, reserved == held) read it with separate
statements, so they are exact only once its writers are idle.

Deleted, not lost: once retention (or ``delete_records``) removed the start of a topic's
partition (its low watermark is above 0), what a check needs from that topic may be
gone. verify then says so, once per partition ("records before offset N of
orders[p] were deleted by retention: ..."), and counts the checks that need that topic's
history as ``unverifiable`` instead of violations: a missing outcome event once
``order-events`` was trimmed, an order the stores hold but ``orders`` no longer has, a
missing DLQ entry once ``orders-dlq`` was trimmed. The low watermarks are read after the
topics, so a deletion while verify reads can only widen what is unverifiable.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar

from ordermesh import lifecycle, schema
from ordermesh.audit import AuditReport, Life, Lives, audit
from ordermesh.config import Settings
from ordermesh.errors import DecodeError, GatewayError, StoreError
from ordermesh.gateway.client import read_ledger_summary
from ordermesh.gateway.ledger import read_summaries
from ordermesh.gateway.wire import OrderSummary
from ordermesh.kafka.client import kafka_errors
from ordermesh.kafka.lag import committed_offsets, group_lag
from ordermesh.kafka.reader import end_offsets, read_topic
from ordermesh.records import ERROR_HEADER_PREFIX, header
from ordermesh.stores.factory import (
    backend,
    open_fulfilment_store,
    open_inventory_store,
    open_order_queries,
    open_payments_store,
)
from ordermesh.stores.inventory import StockRow
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS
from ordermesh.topology import group_topics

MAX_LISTED: Final = 20
INVENTORY: Final = "inventory"
TRACKER: Final = "tracker"
# the services that act on an order's events after the inventory decided it
LIFE_GROUPS: Final = ("payments", "fulfilment")

_T = TypeVar("_T")

# partition -> first offset a consumer group has not committed on one topic
Committed = dict[int, int]
# topic name without prefix -> partition -> its low watermark, where above 0
Deleted = dict[str, dict[int, int]]
# (group, topic name without prefix) -> its committed offsets
Progress = dict[tuple[str, str], Committed]
DbOrders = Mapping[str, tuple[str, tuple[tuple[str, int], ...]]]


def _unsettled(done: Committed | None, partition: int, offset: int) -> bool:
    """Whether the group has not committed this record yet (``None``: it committed all)."""
    return done is not None and offset >= done.get(partition, 0)


@dataclass
class VerifyReport:
    orders_records: int = 0
    valid_orders: int = 0
    invalid_records: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    duplicate_outcomes: int = 0
    duplicate_dlq: int = 0
    dlq_entries: int = 0
    commands_records: int = 0
    cancel_commands: int = 0
    cancelled: int = 0
    tracker_checked: bool = False
    tracker_orders: int = 0
    tracker_missing: int = 0
    tracker_mismatches: int = 0
    # checks that wait on records their consumer group has not committed yet
    pending: int = 0
    pending_counts: Counter[str] = field(default_factory=Counter)
    # checks that need records retention deleted, and what was deleted (one line each)
    unverifiable: int = 0
    unverifiable_counts: Counter[str] = field(default_factory=Counter)
    deleted_by_retention: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    violation_counts: Counter[str] = field(default_factory=Counter)
    # the audit of every order's life (statuses, money), once run
    lifecycle: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violation_counts

    def violate(self, kind: str, detail: str) -> None:
        self.violation_counts[kind] += 1
        if len(self.violations) < MAX_LISTED:
            self.violations.append(f"{kind}: {detail}")

    def judge(self, kind: str, detail: str, *, pending: bool, unverifiable: bool = False) -> None:
        """A violation, or a pending check (it depends on unprocessed records), or an
        unverifiable one (it depends on records retention deleted)."""
        if pending:
            self.pending += 1
            self.pending_counts[kind] += 1
        elif unverifiable:
            self.unverifiable += 1
            self.unverifiable_counts[kind] += 1
        else:
            self.violate(kind, detail)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "pending": self.pending,
            "orders_records": self.orders_records,
            "valid_orders": self.valid_orders,
            "invalid_records": self.invalid_records,
            "outcomes": dict(self.outcomes),
            "duplicate_outcomes": self.duplicate_outcomes,
            "dlq_entries": self.dlq_entries,
            "duplicate_dlq": self.duplicate_dlq,
            "commands_records": self.commands_records,
            "cancel_commands": self.cancel_commands,
            "cancelled": self.cancelled,
            "tracker_checked": self.tracker_checked,
            "tracker_orders": self.tracker_orders,
            "tracker_missing": self.tracker_missing,
            "tracker_mismatches": self.tracker_mismatches,
            "pending_counts": dict(self.pending_counts),
            "unverifiable": self.unverifiable,
            "unverifiable_counts": dict(self.unverifiable_counts),
            "deleted_by_retention": self.deleted_by_retention,
            "violation_counts": dict(self.violation_counts),
            "violations": self.violations,
            "lifecycle": self.lifecycle,
        }

    def add_audit(self, found: AuditReport) -> None:
        """The audit's findings as this report's violations and pending checks."""
        self.lifecycle = found.as_dict()
        for kind, detail in found.violations:
            self.violate(kind, detail)
        for kind, count in found.pending.items():
            self.pending += count
            self.pending_counts[kind] += count


@dataclass
class Observed:
    """What the topics hold, reduced to what the checks need."""

    # order_id -> first (partition, offset) of a valid OrderPlaced
    valid_orders: dict[str, tuple[int, int]] = field(default_factory=dict)
    invalid: set[tuple[int, int]] = field(default_factory=set)
    records: int = 0
    # order_id -> Counter of distinct outcome bytes
    outcomes: dict[str, Counter[bytes]] = field(default_factory=lambda: defaultdict(Counter))
    reserved_items: dict[str, tuple[schema.ItemQty, ...]] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    cancel_rejected: set[str] = field(default_factory=set)
    cancel_reject_reasons: dict[str, set[str]] = field(default_factory=dict)
    released_skus: set[str] = field(default_factory=set)
    # (partition, offset) of order-events records that do not decode
    undecodable_events: list[tuple[int, int]] = field(default_factory=list)
    commands: int = 0
    # (order_id, partition, offset) of every CancelOrder on order-commands
    cancels: list[tuple[str, int, int]] = field(default_factory=list)
    invalid_commands: set[tuple[int, int]] = field(default_factory=set)
    # (order_id, partition, offset) of every ExpireReservation
    expiries: list[tuple[str, int, int]] = field(default_factory=list)
    # what the inventory had committed of order-events (None: everything)
    inventory_events_done: Committed | None = None
    # (partition, offset) of records that have DLQ entries -> count, per source topic
    dlq_sources: Counter[tuple[int, int]] = field(default_factory=Counter)
    dlq_command_sources: Counter[tuple[int, int]] = field(default_factory=Counter)
    dlq_entries: int = 0
    # what the groups had committed before the topics were read; None: everything
    inventory_orders_done: Committed | None = None
    inventory_commands_done: Committed | None = None
    tracker_orders_done: Committed | None = None
    # order ids with an event the tracker has not committed
    tracker_unsettled: set[str] = field(default_factory=set)
    # skus of orders records the inventory has not committed
    unsettled_skus: set[str] = field(default_factory=set)
    # where retention deleted the start of a partition (read after the topics)
    deleted: Deleted = field(default_factory=dict)
    # every order's events in topic order, for the audit of its life
    lives: Lives = field(default_factory=Lives)

    def trimmed(self, *topics: str) -> bool:
        """Whether retention deleted records of any of ``topics`` (names without prefix)."""
        return any(self.deleted.get(topic) for topic in topics)


def deleted_lines(deleted: Deleted) -> list[str]:
    """One line per partition whose start was deleted, saying what can't be checked."""
    what = {
        ORDERS: "orders among them can't be checked",
        COMMANDS: "commands among them can't be checked",
        EVENTS: "outcomes among them can't be checked",
        DLQ: "DLQ entries among them can't be checked",
    }
    return [
        f"records before offset {low} of {topic}[{partition}] were deleted by retention:"
        f" {what[topic]}"
        for topic in sorted(deleted)
        for partition, low in sorted(deleted[topic].items())
    ]


def read_deleted(settings: Settings) -> Deleted:
    """Low watermarks above 0 of the four topics (what retention deleted)."""
    deleted: Deleted = {}
    for name in (ORDERS, COMMANDS, EVENTS, DLQ):
        lows = {p: low for p, (low, _high) in end_offsets(settings, settings.topic(name)).items()}
        trimmed = {p: low for p, low in lows.items() if low > 0}
        if trimmed:
            deleted[name] = trimmed
    return deleted


def read_progress(settings: Settings, groups: Iterable[str]) -> Progress:
    """Committed offsets of ``groups`` on the topics they consume (0 where none)."""
    progress: Progress = {}
    topics_of = group_topics()
    for group in groups:
        names = {settings.topic(name): name for name in topics_of[group]}
        for name in names.values():
            progress[(group, name)] = {}
        committed = committed_offsets(settings, group, list(names), strict=True)
        for (topic, partition), offset in committed.items():
            # nothing committed yet (a negative sentinel): every record is pending
            progress[(group, names[topic])][partition] = max(0, offset)
    return progress


def observe(settings: Settings, progress: Progress | None = None) -> Observed:
    """Read ``orders``, ``order-commands``, ``order-events`` and the DLQ once each.

    ``progress`` (read before) tells which records are not processed yet; without it,
    every record counts as processed.
    """
    progress = progress or {}
    obs = Observed(
        inventory_orders_done=progress.get((INVENTORY, ORDERS)),
        inventory_commands_done=progress.get((INVENTORY, COMMANDS)),
        tracker_orders_done=progress.get((TRACKER, ORDERS)),
        inventory_events_done=progress.get((INVENTORY, EVENTS)),
    )
    inventory_done = obs.inventory_orders_done
    tracker_events_done = progress.get((TRACKER, EVENTS))

    orders_topic = settings.topic(ORDERS)
    for rec in read_topic(settings, orders_topic):
        obs.records += 1
        try:
            order = schema.decode_order(rec.value)
        except DecodeError:
            obs.invalid.add((rec.partition, rec.offset))
            continue
        obs.valid_orders.setdefault(order.order_id, (rec.partition, rec.offset))
        if _unsettled(inventory_done, rec.partition, rec.offset):
            obs.unsettled_skus.update(item.sku for item in order.items)

    commands_topic = settings.topic(COMMANDS)
    for rec in read_topic(settings, commands_topic):
        obs.commands += 1
        try:
            command = schema.decode_command(rec.value)
        except DecodeError:
            obs.invalid_commands.add((rec.partition, rec.offset))
            continue
        if isinstance(command, schema.CancelOrder):
            obs.cancels.append((command.order_id, rec.partition, rec.offset))
        elif isinstance(command, schema.ExpireReservation):
            obs.expiries.append((command.order_id, rec.partition, rec.offset))
        # an ExpireReservation may find its order paid meanwhile, a Restock changes stock
        # only: neither must have an event of its own

    for rec in read_topic(settings, settings.topic(EVENTS)):
        try:
            event = schema.decode_event(rec.value)
        except DecodeError:
            obs.undecodable_events.append((rec.partition, rec.offset))
            continue
        if _unsettled(tracker_events_done, rec.partition, rec.offset):
            obs.tracker_unsettled.add(event.order_id)
        assert rec.value is not None
        obs.lives.add(rec.partition, rec.offset, rec.value, event)
        if isinstance(event, schema.OrderReserved | schema.OrderRejected):
            assert rec.value is not None
            obs.outcomes[event.order_id][rec.value] += 1
            if isinstance(event, schema.OrderReserved):
                obs.reserved_items[event.order_id] = event.items
        elif isinstance(event, schema.OrderCancelled):
            obs.cancelled.add(event.order_id)
        elif isinstance(event, schema.CancelRejected):
            obs.cancel_rejected.add(event.order_id)
            obs.cancel_reject_reasons.setdefault(event.order_id, set()).add(event.reason)
        elif isinstance(event, schema.StockReleased):
            obs.released_skus.update(item.sku for item in event.items)

    from_orders, from_commands = orders_topic.encode(), commands_topic.encode()
    for rec in read_topic(settings, settings.topic(DLQ)):
        obs.dlq_entries += 1
        src = header(rec.headers, ERROR_HEADER_PREFIX + "topic")
        if src == from_orders:
            sources = obs.dlq_sources
        elif src == from_commands:
            sources = obs.dlq_command_sources
        else:
            continue
        try:
            part = int(header(rec.headers, ERROR_HEADER_PREFIX + "partition") or b"")
            off = int(header(rec.headers, ERROR_HEADER_PREFIX + "offset") or b"")
        except ValueError:
            continue
        sources[(part, off)] += 1
    # after the topics: what was deleted meanwhile is counted as deleted, not as missing
    obs.deleted = read_deleted(settings)
    return obs


def _outcome_label(outcome: schema.OrderEvent) -> str:
    if isinstance(outcome, schema.OrderRejected):
        return f"OrderRejected.{outcome.reason}"
    return type(outcome).__name__


def check_topics(report: VerifyReport, obs: Observed) -> None:
    """Pure checks of the topics against each other, added to ``report``."""
    report.orders_records = obs.records
    report.valid_orders = len(obs.valid_orders)
    report.invalid_records = len(obs.invalid)
    report.dlq_entries = obs.dlq_entries
    report.commands_records = obs.commands
    report.cancel_commands = len(obs.cancels)
    report.cancelled = len(obs.cancelled)
    report.deleted_by_retention = deleted_lines(obs.deleted)
    events_trimmed = obs.trimmed(EVENTS)
    dlq_trimmed = obs.trimmed(DLQ)
    inventory_done = obs.inventory_orders_done
    for order_id, (part, off) in obs.valid_orders.items():
        copies = obs.outcomes.get(order_id)
        if not copies:
            report.judge(
                "lost",
                f"order {order_id} (orders[{part}]@{off}) has no outcome event",
                pending=_unsettled(inventory_done, part, off),
                unverifiable=events_trimmed,
            )
            continue
        if len(copies) > 1:
            report.violate("conflicting_outcomes", f"order {order_id} has {len(copies)} outcomes")
        report.duplicate_outcomes += sum(copies.values()) - 1
        report.outcomes[_outcome_label(schema.decode_event(next(iter(copies))))] += 1
    for where in sorted(obs.invalid):
        count = obs.dlq_sources.get(where, 0)
        if count == 0:
            report.judge(
                "invalid_not_in_dlq",
                f"orders[{where[0]}]@{where[1]} has no DLQ entry",
                pending=_unsettled(inventory_done, *where),
                unverifiable=dlq_trimmed,
            )
        report.duplicate_dlq += max(0, count - 1)

    commands_done = obs.inventory_commands_done
    for where in sorted(obs.invalid_commands):
        if not obs.dlq_command_sources.get(where):
            report.judge(
                "invalid_command_not_in_dlq",
                f"order-commands[{where[0]}]@{where[1]} does not decode and has no DLQ entry",
                pending=_unsettled(commands_done, *where),
                unverifiable=dlq_trimmed,
            )
    for order_id, part, off in obs.cancels:
        if (
            order_id not in obs.cancelled
            and order_id not in obs.cancel_rejected
            and not obs.dlq_command_sources.get((part, off))
        ):
            report.judge(
                "cancel_without_effect",
                f"cancel of order {order_id} (order-commands[{part}]@{off}) has neither an"
                " OrderCancelled/CancelRejected event nor a DLQ entry",
                pending=_unsettled(commands_done, part, off),
                unverifiable=events_trimmed or dlq_trimmed,
            )
    # an effect the order's outcome rules out: only RESERVED orders are cancelled, and
    # only REJECTED ones refuse a cancel. The outcome may still be missing while its
    # order is being redelivered (a crash between the DB commit and the produce).
    for order_id in obs.cancelled | obs.cancel_rejected:
        placed = obs.valid_orders.get(order_id)
        pending = placed is not None and _unsettled(inventory_done, *placed)
        if order_id in obs.cancelled and order_id not in obs.reserved_items:
            report.judge(
                "cancel_conflicts_outcome",
                f"order {order_id} was cancelled but never reserved",
                pending=pending,
                unverifiable=events_trimmed,
            )
        for reason in obs.cancel_reject_reasons.get(order_id, ()):
            if not _refusal_fits(reason, order_id, obs):
                report.judge(
                    "cancel_conflicts_outcome",
                    f"order {order_id} refused a cancel ({reason}) that its life rules out",
                    pending=pending,
                    unverifiable=events_trimmed,
                )
    for part, off in obs.undecodable_events:
        report.violate("undecodable_event", f"order-events[{part}]@{off} does not decode")


def _refusal_fits(reason: str, order_id: str, obs: Observed) -> bool:
    """Whether a ``CancelRejected`` of ``reason`` agrees with the order's life: only a
    rejected order has nothing to cancel, only a shipped one has left, only an expired or
    declined one ended on its own."""
    if reason == "ORDER_REJECTED":
        return any(
            isinstance(schema.decode_event(copy), schema.OrderRejected)
            for copy in obs.outcomes.get(order_id, ())
        )
    life = obs.lives.by_order.get(order_id)
    events = set(life.events) if life is not None else set()
    if reason == "ALREADY_SHIPPED":
        return "OrderShipped" in events
    return bool(events & {"ReservationExpired", "OrderPaymentFailed"})


def check_inventory_db(
    report: VerifyReport,
    obs: Observed,
    stock: list[StockRow],
    movements: Mapping[str, int],
    db_orders: DbOrders,
) -> None:
    """Pure checks of the inventory DB contents against the topics, added to ``report``."""
    inventory_done = obs.inventory_orders_done
    for order_id, (part, off) in obs.valid_orders.items():
        copies = obs.outcomes.get(order_id)
        if not copies:
            continue  # judged as lost (or pending) by check_topics
        decided = db_orders.get(order_id)
        if decided is None:
            report.judge(
                "outcome_not_in_db",
                f"order {order_id} has an outcome event but no inventory DB row",
                pending=_unsettled(inventory_done, part, off),
            )
            continue
        # reserved_items holds exactly the orders with an OrderReserved outcome: no
        # second decode per order (two different outcomes are reported as a conflict)
        event_reserved = order_id in obs.reserved_items
        if (decided[0] != "REJECTED") != event_reserved:  # CANCELLED was RESERVED first
            report.violate(
                "db_outcome_mismatch",
                f"order {order_id}: DB says {decided[0]}, the event is "
                + ("OrderReserved" if event_reserved else "OrderRejected"),
            )

    # what the DB's orders hold, per sku and place: RESERVED orders reserved units, PAID
    # ones committed units, SHIPPED ones shipped units
    held_db: dict[str, Counter[str]] = {"reserved": Counter(), "committed": Counter()}
    shipped_db: Counter[str] = Counter()
    db_skus: set[str] = set(movements)
    for order_id, (status, items) in db_orders.items():
        # a REJECTED order keeps its items as placed, unknown skus included
        if status != "REJECTED":
            place = lifecycle.HOLDS.get(status)
            for sku, qty in items:
                db_skus.add(sku)
                if place is not None:
                    held_db[place][sku] += qty
                elif status == "SHIPPED":
                    shipped_db[sku] += qty
        if order_id not in obs.valid_orders and order_id not in obs.outcomes:
            report.judge(
                "unknown_db_order",
                f"DB has order {order_id} not seen on the topics",
                pending=False,
                unverifiable=obs.trimmed(ORDERS),
            )
    # the same as the events tell it: each order holds what it reserved where its life
    # on the topic stands
    held_events: dict[str, Counter[str]] = {"reserved": Counter(), "committed": Counter()}
    event_skus: set[str] = set(obs.released_skus)
    # skus whose events may lag the DB: touched by records the inventory has not committed
    unsettled = set(obs.unsettled_skus)
    events_done = obs.inventory_events_done
    for order_id, reserved in obs.reserved_items.items():
        life = obs.lives.by_order.get(order_id)
        if life is not None:
            now_at: str = life.status()[0]
        else:
            now_at = "CANCELLED" if order_id in obs.cancelled else "RESERVED"
        place = lifecycle.HOLDS.get(now_at)
        for item in reserved:
            event_skus.add(item.sku)
            if place is not None:
                held_events[place][item.sku] += item.quantity
        if life is not None and _unsettled(events_done, *life.last):
            unsettled.update(item.sku for item in reserved)

    commands_done = obs.inventory_commands_done
    for order_id, part, off in [*obs.cancels, *obs.expiries]:
        if _unsettled(commands_done, part, off):
            decided = db_orders.get(order_id)
            unsettled.update(sku for sku, _ in (decided[1] if decided else ()))
            unsettled.update(item.sku for item in obs.reserved_items.get(order_id, ()))

    rows = {row.sku: row for row in stock}
    for sku in sorted(rows.keys() | db_skus | event_skus):
        row = rows.get(sku)
        if row is None:
            # stock rows are never deleted and every reservation needs one
            report.judge(
                "sku_missing_from_db",
                f"{sku} is named by the DB or the events but has no stock row",
                pending=sku not in db_skus and sku in unsettled,
            )
            continue
        if min(row.available, row.reserved, row.committed, row.shipped) < 0:
            report.violate(
                "negative_stock",
                f"{sku}: {row.available}/{row.reserved}/{row.committed}/{row.shipped}",
            )
        entered = movements.get(sku, 0)
        held = row.available + row.reserved + row.committed + row.shipped
        if entered != held:
            report.violate(
                "stock_not_conserved",
                f"{sku}: entered + restocked {entered} != available {row.available} + reserved"
                f" {row.reserved} + committed {row.committed} + shipped {row.shipped}",
            )
        if shipped_db.get(sku, 0) != row.shipped:
            report.violate(
                "shipped_mismatch_db",
                f"{sku}: shipped {row.shipped} != shipped by SHIPPED orders"
                f" {shipped_db.get(sku, 0)}",
            )
        for where, figure in (("reserved", row.reserved), ("committed", row.committed)):
            holder = "RESERVED" if where == "reserved" else "PAID"
            if held_db[where].get(sku, 0) != figure:
                report.violate(
                    f"{where}_mismatch_db",
                    f"{sku}: {where} {figure} != held by {holder} orders"
                    f" {held_db[where].get(sku, 0)}",
                )
            if held_events[where].get(sku, 0) != figure:
                report.judge(
                    f"{where}_mismatch_events",
                    f"{sku}: {where} {figure} != held by {holder} orders on the topic"
                    f" {held_events[where].get(sku, 0)}",
                    pending=sku in unsettled,
                    unverifiable=obs.trimmed(EVENTS),
                )


def check(
    obs: Observed,
    stock: list[StockRow],
    movements: Mapping[str, int],
    db_orders: DbOrders,
) -> VerifyReport:
    """Pure invariant checks over observed topics and the inventory DB contents."""
    report = VerifyReport()
    check_topics(report, obs)
    check_inventory_db(report, obs, stock, movements, db_orders)
    return report


def _expected_tracker_status(order_id: str, obs: Observed, db_orders: DbOrders) -> str:
    """The status the tracker must show: the inventory DB's decision, else the topics'."""
    decided = db_orders.get(order_id)
    if decided is not None:
        return decided[0]  # RESERVED, REJECTED and CANCELLED are named alike in both
    if order_id in obs.cancelled:
        return "CANCELLED"
    copies = obs.outcomes.get(order_id)
    if copies:
        outcome = schema.decode_event(next(iter(copies)))
        return "RESERVED" if isinstance(outcome, schema.OrderReserved) else "REJECTED"
    return "PLACED"


def check_tracker(
    report: VerifyReport,
    obs: Observed,
    db_orders: DbOrders,
    tracker: Mapping[str, str],
) -> None:
    """Pure tracker checks (order_id -> tracker status), added to ``report``."""
    report.tracker_checked = True
    report.tracker_orders = len(tracker)
    # the tracker may lag its inputs, and the inventory DB may be ahead of the events
    # for records the inventory has not committed (decided, events not yet produced)
    unsettled = set(obs.tracker_unsettled)
    commands_done = obs.inventory_commands_done
    unsettled.update(order_id for order_id, p, o in obs.cancels if _unsettled(commands_done, p, o))
    for order_id, (part, off) in obs.valid_orders.items():
        status = tracker.get(order_id)
        if status is None:
            pending = _unsettled(obs.tracker_orders_done, part, off)
            if not pending:
                report.tracker_missing += 1
            report.judge(
                "tracker_missing", f"order {order_id} is not in the tracker", pending=pending
            )
            continue
        expected = _expected_tracker_status(order_id, obs, db_orders)
        if status != expected:
            pending = order_id in unsettled or _unsettled(obs.inventory_orders_done, part, off)
            if not pending:
                report.tracker_mismatches += 1
            report.judge(
                "tracker_status_mismatch",
                f"order {order_id}: tracker says {status}, inventory says {expected}",
                pending=pending,
            )
    for order_id in tracker.keys() - obs.valid_orders.keys():
        report.judge(
            "tracker_unknown_order",
            f"tracker has order {order_id} not on the topics",
            pending=False,
            unverifiable=obs.trimmed(ORDERS),
        )


def _read_inventory(settings: Settings) -> tuple[list[StockRow], dict[str, int], DbOrders]:
    store = open_inventory_store(settings, readonly=True)
    try:
        stock = store.stock()
        movements = store.movements_total()
        db_orders = {k: (v.status, v.items) for k, v in store.order_outcomes().items()}
    finally:
        store.close()
    return stock, movements, db_orders


def _read_tracker(settings: Settings) -> dict[str, str]:
    store = open_order_queries(settings)
    try:
        return dict(store.statuses())
    finally:
        store.close()


def held_work(settings: Settings) -> int:
    """Work payments and fulfilment hold in their stores and have not finished: gateway
    calls due or retrying, shipments being packed, events not yet published. While any
    is held, a life whose money or shipment is short is pending, not broken.

    A store that does not exist (a deployment without the service) holds nothing; none
    is created.
    """
    held = 0
    sqlite = backend(settings) == "sqlite"
    if not sqlite or settings.payments_db_path().exists():
        try:
            payments = open_payments_store(settings)
        except StoreError:
            payments = None
        if payments is not None:
            try:
                held += payments.due_count() + payments.unpublished_count()
            finally:
                payments.close()
    if not sqlite or settings.fulfilment_db_path().exists():
        try:
            fulfilment = open_fulfilment_store(settings)
        except StoreError:
            fulfilment = None
        if fulfilment is not None:
            try:
                held += fulfilment.scheduled_count() + fulfilment.unpublished_count()
            finally:
                fulfilment.close()
    return held


def _read_ledger(settings: Settings) -> tuple[dict[str, OrderSummary] | None, str]:
    """Every order's money in the gateway's ledger, or None and why it can't be read.

    Asked over HTTP; a local gateway that does not answer (``up`` stopped it before its
    closing verify) is read from its ledger file instead.
    """
    try:
        return read_ledger_summary(settings), ""
    except GatewayError as exc:
        path = settings.gateway_db_path()
        if settings.gateway_url is None and path.exists():
            try:
                return read_summaries(path), ""
            except StoreError as err:
                return None, f"{exc}; its ledger file: {err}"
        return None, str(exc)


def _read_or_error(read: Callable[[Settings], _T], settings: Settings) -> tuple[_T | None, str]:
    """What ``read`` returns, or None and why the store could not be read."""
    try:
        return read(settings), ""
    except StoreError as exc:
        return None, str(exc)


def consuming_groups(*, check_tracker: bool = True) -> list[str]:
    """The consumer groups whose work verify checks."""
    return [INVENTORY, TRACKER, *LIFE_GROUPS] if check_tracker else [INVENTORY, *LIFE_GROUPS]


def events_settled(progress: Progress) -> Callable[[str, Life], bool]:
    """Whether every group that acts on ``order-events`` committed an order's last event.

    A group that committed nothing on it is taken as not deployed (a mesh without
    payments, say): it holds nothing up.
    """
    done = [
        committed
        for (group, topic), committed in progress.items()
        if topic == EVENTS and any(committed.values())
    ]

    def settled(_order_id: str, life: Life) -> bool:
        partition, offset = life.last
        return all(offset < committed.get(partition, 0) for committed in done)

    return settled


def audit_lives(
    settings: Settings,
    obs: Observed,
    progress: Progress,
    money: Mapping[str, OrderSummary] | None,
    *,
    now: float | None = None,
    held: int = 0,
) -> AuditReport:
    """The audit of every order's life on the topics (and of its money, when given).

    ``held``: work payments and fulfilment still hold (``held_work``); while there is
    any, no life is settled.
    """
    settled = events_settled(progress)
    return audit(
        obs.lives,
        money,
        now=time.time() if now is None else now,
        settled=(lambda order_id, life: False) if held else settled,
        fulfilment_delay_s=settings.fulfilment_delay_s,
    )


# verify()'s parameter shadows the function of the same name
_check_tracker = check_tracker


def verify(settings: Settings, *, check_tracker: bool = True) -> VerifyReport:
    """Check every invariant; ``check_tracker=False`` when the deployment has no tracker."""
    with kafka_errors(settings):
        # order matters, see the module docstring: offsets, then stores, then topics
        progress = read_progress(settings, consuming_groups(check_tracker=check_tracker))
        # through the factory, so on either backend: a store that cannot be read
        # (no SQLite file, no PostgreSQL schema) is reported, not created
        inventory, inventory_error = _read_or_error(_read_inventory, settings)
        tracker, tracker_error = (
            _read_or_error(_read_tracker, settings) if check_tracker else (None, "")
        )
        # the ledger is a store too: read before the topics, whose events it follows;
        # the work held is read first, so what it finished shows in the ledger
        held = held_work(settings)
        # only a mesh whose payments ran has money to check: a gateway answering on the
        # same port for another mesh is none of this one's business
        paid = any(progress.get(("payments", EVENTS), {}).values())
        money, money_error = _read_ledger(settings) if paid else (None, "")
        obs = observe(settings, progress)

    report = VerifyReport()
    check_topics(report, obs)
    if inventory is None:
        report.violate("inventory_store_missing", f"no inventory store: {inventory_error}")
        db_orders: DbOrders = {}
    else:
        stock, movements, db_orders = inventory
        check_inventory_db(report, obs, stock, movements, db_orders)
    if check_tracker:
        if tracker is None:
            report.violate("tracker_store_missing", f"no tracker store: {tracker_error}")
        else:
            _check_tracker(report, obs, db_orders, tracker)
    if money is None and paid:
        # payments ran, so its money is in a ledger verify must see
        report.violate("ledger_unreachable", f"the gateway's ledger: {money_error}")
    report.add_audit(audit_lives(settings, obs, progress, money, held=held))
    return report


def _deployed(settings: Settings, group: str) -> bool:
    """Whether ``group`` ever committed an offset (a mesh without it has none)."""
    topics = [settings.topic(t) for t in group_topics()[group]]
    return any(offset >= 0 for offset in committed_offsets(settings, group, topics).values())


def wait_drained(settings: Settings, groups: Iterable[str], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``groups`` to have no lag; whether they got there.

    Payments and fulfilment count only where they run (they committed something): a
    deployment of the inventory alone has no such groups to wait for.
    """
    deadline = time.monotonic() + timeout_s
    topics_of = group_topics()
    with kafka_errors(settings):
        wanted = [g for g in groups if g not in LIFE_GROUPS or _deployed(settings, g)]
        while True:
            lag = sum(
                sum(group_lag(settings, g, [settings.topic(t) for t in topics_of[g]]).values())
                for g in wanted
            )
            if lag == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
