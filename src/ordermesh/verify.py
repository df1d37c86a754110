"""``ordermesh verify``: check the system's invariants from the topics and the inventory DB.

Invariants (issue 3):
- every record of ``orders`` has an outcome in ``order-events`` (valid orders) or a DLQ
  entry pointing at its partition and offset (invalid ones);
- no order has two different outcomes (a repeated identical copy, which at-least-once
  delivery allows after a crash, is counted, not an error);
- per SKU: seeded + restocked == available + reserved, the reserved quantity equals what
  the RESERVED orders hold in the DB and what the ``OrderReserved`` events (not cancelled)
  hold; no negative stock.
- when the tracker DB exists (issue 4): every valid order has a tracker row, and its
  status is the one the inventory DB decided (RESERVED, REJECTED, CANCELLED; PLACED only
  while the inventory has not decided it); the tracker holds no order the topics lack.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from ordermesh import schema
from ordermesh.config import Settings
from ordermesh.errors import DecodeError
from ordermesh.kafka.reader import read_topic
from ordermesh.records import ERROR_HEADER_PREFIX, header
from ordermesh.stores.inventory import InventoryStore, StockRow
from ordermesh.stores.tracker import TrackerStore
from ordermesh.topics import DLQ, EVENTS, ORDERS

MAX_LISTED = 20


@dataclass
class VerifyReport:
    orders_records: int = 0
    valid_orders: int = 0
    invalid_records: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    duplicate_outcomes: int = 0
    duplicate_dlq: int = 0
    dlq_entries: int = 0
    cancelled: int = 0
    tracker_checked: bool = False
    tracker_orders: int = 0
    tracker_missing: int = 0
    tracker_mismatches: int = 0
    violations: list[str] = field(default_factory=list)
    violation_counts: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.violation_counts

    def violate(self, kind: str, detail: str) -> None:
        self.violation_counts[kind] += 1
        if len(self.violations) < MAX_LISTED:
            self.violations.append(f"{kind}: {detail}")

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "orders_records": self.orders_records,
            "valid_orders": self.valid_orders,
            "invalid_records": self.invalid_records,
            "outcomes": dict(self.outcomes),
            "duplicate_outcomes": self.duplicate_outcomes,
            "dlq_entries": self.dlq_entries,
            "duplicate_dlq": self.duplicate_dlq,
            "cancelled": self.cancelled,
            "tracker_checked": self.tracker_checked,
            "tracker_orders": self.tracker_orders,
            "tracker_missing": self.tracker_missing,
            "tracker_mismatches": self.tracker_mismatches,
            "violation_counts": dict(self.violation_counts),
            "violations": self.violations,
        }


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
    # (partition, offset) of orders-records that have DLQ entries -> count
    dlq_sources: Counter[tuple[int, int]] = field(default_factory=Counter)
    dlq_entries: int = 0


def observe(settings: Settings) -> Observed:
    obs = Observed()
    orders_topic = settings.topic(ORDERS)
    for rec in read_topic(settings, orders_topic):
        obs.records += 1
        try:
            order = schema.decode_order(rec.value)
        except DecodeError:
            obs.invalid.add((rec.partition, rec.offset))
            continue
        obs.valid_orders.setdefault(order.order_id, (rec.partition, rec.offset))
    for rec in read_topic(settings, settings.topic(EVENTS)):
        try:
            event = schema.decode_event(rec.value)
        except DecodeError:
            continue
        if isinstance(event, schema.OrderReserved | schema.OrderRejected):
            assert rec.value is not None
            obs.outcomes[event.order_id][rec.value] += 1
            if isinstance(event, schema.OrderReserved):
                obs.reserved_items[event.order_id] = event.items
        elif isinstance(event, schema.OrderCancelled):
            obs.cancelled.add(event.order_id)
    for rec in read_topic(settings, settings.topic(DLQ)):
        obs.dlq_entries += 1
        src = header(rec.headers, ERROR_HEADER_PREFIX + "topic")
        if src is None or src.decode(errors="replace") != orders_topic:
            continue
        try:
            part = int(header(rec.headers, ERROR_HEADER_PREFIX + "partition") or b"")
            off = int(header(rec.headers, ERROR_HEADER_PREFIX + "offset") or b"")
        except ValueError:
            continue
        obs.dlq_sources[(part, off)] += 1
    return obs


def check(
    obs: Observed,
    stock: list[StockRow],
    movements: dict[str, int],
    db_orders: Mapping[str, tuple[str, tuple[tuple[str, int], ...]]],
) -> VerifyReport:
    """Pure invariant checks over observed topics and the inventory DB contents."""
    report = VerifyReport(
        orders_records=obs.records,
        valid_orders=len(obs.valid_orders),
        invalid_records=len(obs.invalid),
        dlq_entries=obs.dlq_entries,
        cancelled=len(obs.cancelled),
    )
    for order_id in obs.valid_orders:
        copies = obs.outcomes.get(order_id)
        if not copies:
            report.violate("lost", f"order {order_id} has no outcome event")
            continue
        if len(copies) > 1:
            report.violate("conflicting_outcomes", f"order {order_id} has {len(copies)} outcomes")
        report.duplicate_outcomes += sum(copies.values()) - 1
        first = next(iter(copies))
        kind = schema.decode_event(first)
        label = (
            f"OrderRejected.{kind.reason}"
            if isinstance(kind, schema.OrderRejected)
            else type(kind).__name__
        )
        report.outcomes[label] += 1
    for where in sorted(obs.invalid):
        count = obs.dlq_sources.get(where, 0)
        if count == 0:
            report.violate("invalid_not_in_dlq", f"orders[{where[0]}]@{where[1]} has no DLQ entry")
        report.duplicate_dlq += max(0, count - 1)

    # stock conservation
    held_db: Counter[str] = Counter()
    for order_id, (status, items) in db_orders.items():
        if status == "RESERVED":
            for sku, qty in items:
                held_db[sku] += qty
        if order_id not in obs.valid_orders and order_id not in obs.outcomes:
            report.violate("unknown_db_order", f"DB has order {order_id} not seen on the topics")
    held_events: Counter[str] = Counter()
    for order_id, reserved in obs.reserved_items.items():
        if order_id in obs.cancelled:
            continue
        for item in reserved:
            held_events[item.sku] += item.quantity
    for row in stock:
        if row.available < 0 or row.reserved < 0:
            report.violate("negative_stock", f"{row.sku}: {row.available}/{row.reserved}")
        entered = movements.get(row.sku, 0)
        if entered != row.available + row.reserved:
            report.violate(
                "stock_not_conserved",
                f"{row.sku}: entered {entered} != available {row.available} "
                f"+ reserved {row.reserved}",
            )
        if held_db.get(row.sku, 0) != row.reserved:
            report.violate(
                "reserved_mismatch_db",
                f"{row.sku}: reserved {row.reserved} != held by RESERVED orders "
                f"{held_db.get(row.sku, 0)}",
            )
        if held_events.get(row.sku, 0) != row.reserved:
            report.violate(
                "reserved_mismatch_events",
                f"{row.sku}: reserved {row.reserved} != held by OrderReserved events "
                f"{held_events.get(row.sku, 0)}",
            )
    return report


def _expected_tracker_status(
    order_id: str,
    obs: Observed,
    db_orders: Mapping[str, tuple[str, tuple[tuple[str, int], ...]]],
) -> str:
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
    db_orders: Mapping[str, tuple[str, tuple[tuple[str, int], ...]]],
    tracker: Mapping[str, str],
) -> None:
    """Pure tracker checks (order_id -> tracker status), added to ``report``."""
    report.tracker_checked = True
    report.tracker_orders = len(tracker)
    for order_id in obs.valid_orders:
        status = tracker.get(order_id)
        if status is None:
            report.tracker_missing += 1
            report.violate("tracker_missing", f"order {order_id} is not in the tracker")
            continue
        expected = _expected_tracker_status(order_id, obs, db_orders)
        if status != expected:
            report.tracker_mismatches += 1
            report.violate(
                "tracker_status_mismatch",
                f"order {order_id}: tracker says {status}, inventory says {expected}",
            )
    for order_id in tracker.keys() - obs.valid_orders.keys():
        report.violate("tracker_unknown_order", f"tracker has order {order_id} not on the topics")


def verify(settings: Settings) -> VerifyReport:
    obs = observe(settings)
    store = InventoryStore(settings.inventory_db_path())
    try:
        stock = store.stock()
        movements = store.movements_total()
        db_orders = {k: (v.status, v.items) for k, v in store.order_outcomes().items()}
    finally:
        store.close()
    report = check(obs, stock, movements, db_orders)
    tracker_db = settings.tracker_db_path()
    if tracker_db.exists():
        tracker = TrackerStore(tracker_db, readonly=True)
        try:
            statuses = tracker.statuses()
        finally:
            tracker.close()
        check_tracker(report, obs, db_orders, statuses)
    return report
