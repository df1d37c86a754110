"""Analytics core: rolling windows, all-time totals, chart series and the order's life.

``Analytics.handle(batch)`` reads ``orders``, ``order-events`` and ``orders-dlq`` and
produces nothing; ``snapshot()`` is the view the dashboard, ``/metrics`` and
``ordermesh top`` read: a ``Snapshot`` of msgspec Structs, served as JSON by
``msgspec.json.encode`` (field order is the JSON key order). Pure: no Kafka, no I/O, the
clock is injected.

Choices worth knowing:

- **Event time.** Every record lands in the one-second bucket of *its own* time: the
  record timestamp for ``orders`` and ``orders-dlq`` (producer create time: malformed
  orders have no ``created_at``), the event's ``at`` for ``order-events``. A replay after
  a restart therefore refills the windows exactly as they were, and data older than the
  ring (``RING_SECONDS``) only counts in the totals. Times ahead of the clock (skew) count
  in the current second.
- **Windows** of W seconds are the W *complete* seconds before the current one: the
  second in progress is never shown half-filled, so a rate does not dip every time a
  second starts. Rates are counts / W.
- **Exactly once per record, once per order.** ``handle`` skips records below the next
  offset it expects per partition (the runner resumes each partition there; the first
  time from the beginning), and events are deduplicated per (order_id, event type): a
  second ``OrderReserved`` copy of an order, which at-least-once delivery allows after a
  crash, is counted in ``duplicate_outcomes`` and nowhere else. ``placed`` counts
  distinct valid order ids; ``malformed`` counts records (as ``ordermesh verify`` does),
  ``dlq`` counts DLQ records (an entry per dead-lettering, replays included).
- **Latency** is ``at - order_created_at`` of an outcome: from the customer placing the
  order to the inventory deciding it. Per second it is kept in a log-scale histogram
  with relative accuracy ``LATENCY_ALPHA`` (DDSketch-style bins), so a percentile over
  any window is a merge of small sparse dicts; the reported value is within 1 % of the
  exact nearest-rank percentile, and ``max`` is exact.
- **Revenue** is the sum of ``OrderReserved.total`` per currency, in integer cents (no
  conversion between currencies; the load generator uses USD only). It is gross: a
  later cancellation does not subtract it (cancellations are counted on their own).
- **The order's life** (``Snapshot.lifecycle``, also ``/lifecycle``) derives from
  ``lifecycle.py``: the funnel is ``FUNNEL`` (orders that *reached* each step: a paid
  order cancelled later still counts as paid), each step's conversion is its count over
  the previous step's (orders still on their way count in the denominator, so a window's
  conversion is a flow ratio, not a cohort's), and the failure ends are the ``TERMINAL``
  statuses off the funnel, each by cause (REJECTED by reason, PAYMENT_FAILED by decline
  reason, CANCELLED by the stage it was cancelled from). Time to pay and time to ship run
  from the order's ``created_at`` (carried by ``OrderReserved``) to ``OrderPaid.at`` and
  ``OrderShipped.at``; the decline rate is declines over authorization outcomes, the
  expiry rate expiries over reservations. Money comes from the payment ``FACTS``, summed
  in integer cents per currency; a capture, void or refund has the currency of its
  order's reservation or authorization (``XXX`` if analytics never saw either).
  ``by_status`` counts the orders now in each status, moved by ``lifecycle.applies``.
- **The DLQ alert** fires when the 60 s window's dead letters exceed a share
  (``dlq_alert_ratio``) of its ``orders`` records, not on any dead letter: a load with
  malformed orders by design (``ordermesh up`` sends 1 %) is not an incident.
- **The JSON** is ``services.analytics_view``'s Structs, the histograms
  ``services.latency``'s (both re-exported here).
- **Memory.** One dict entry per order id (an int: the events seen, the current status,
  the currency) keeps the deduplication: about 150 bytes per order, 150 MB for a million
  orders; plus its creation time while it is on its way (dropped when it ends).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, get_args

from ordermesh import lifecycle, schema
from ordermesh.errors import DecodeError
from ordermesh.lifecycle import FUNNEL, STATUSES, TARGET, TERMINAL, TRANSITIONS
from ordermesh.records import InRecord, OutRecord
from ordermesh.schema import (
    CancelRejected,
    OrderCancelled,
    OrderPaid,
    OrderPaymentFailed,
    OrderRejected,
    OrderReserved,
    OrderShipped,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    ReservationExpired,
)
from ordermesh.services.analytics_view import (
    DlqAlert,
    End,
    Latency,
    Lifecycle,
    LifecycleView,
    LifeWindow,
    Money,
    RecentDlq,
    Series,
    SkuQuantity,
    Snapshot,
    TopSkus,
    Totals,
    Window,
)
from ordermesh.services.dlq import parse_entry, reason
from ordermesh.services.latency import (
    LATENCY_ALPHA,
    ZERO_BIN,
    Histogram,
    bin_value,
    latency_bin,
    merge_counts,
    percentile,
)

logger = logging.getLogger(__name__)

# the JSON types (services.analytics_view) are offered here too, beside what builds them
__all__ = [
    "ALERT_WINDOW",
    "CANCEL_STAGES",
    "DEFAULT_DLQ_ALERT_RATIO",
    "FAILURE_ENDS",
    "LATENCY_ALPHA",
    "MAX_DECLINE_REASONS",
    "MONEY_KINDS",
    "NO_CURRENCY",
    "OTHER_REASON",
    "RECENT_DLQ",
    "REJECT_REASONS",
    "RING_SECONDS",
    "SERIES_SECONDS",
    "TOP_SKUS",
    "UNKNOWN_STAGE",
    "WINDOWS",
    "ZERO_BIN",
    "Analytics",
    "DlqAlert",
    "End",
    "Latency",
    "LifeWindow",
    "Lifecycle",
    "LifecycleView",
    "Money",
    "RecentDlq",
    "Series",
    "SkuQuantity",
    "Snapshot",
    "TopSkus",
    "Totals",
    "Window",
    "bin_value",
    "latency_bin",
    "percentile",
]


WINDOWS: Final = (1, 10, 60)
# the ring keeps a little more than the series so the oldest series second is complete
RING_SECONDS: Final = 310
SERIES_SECONDS: Final = 300
TOP_SKUS: Final = 10
RECENT_DLQ: Final = 20
REJECT_REASONS: Final[tuple[str, ...]] = get_args(schema.RejectReason)


# The DLQ alert: the window it looks at, and the default share of that window's
# ``orders`` records above which dead letters are an incident (Settings overrides it).
ALERT_WINDOW: Final = 60
DEFAULT_DLQ_ALERT_RATIO: Final = 0.05
assert ALERT_WINDOW in WINDOWS

# --- what the lifecycle says analytics counts --------------------------------------------

# The failure ends: terminal statuses off the happy path.
FAILURE_ENDS: Final[tuple[str, ...]] = tuple(
    s for s in STATUSES if s in TERMINAL and s not in FUNNEL
)
# The stages an order can be cancelled from (the sources of its transitions to CANCELLED).
CANCEL_STAGES: Final[tuple[str, ...]] = tuple(
    t.source for t in TRANSITIONS if t.target == "CANCELLED"
)
UNKNOWN_STAGE: Final = "UNKNOWN"  # an OrderCancelled without a known stage
# Decline reasons are the gateway's free text: past this many distinct ones, "OTHER".
MAX_DECLINE_REASONS: Final = 20
OTHER_REASON: Final = "OTHER"
# The currency of money whose order's currency analytics never saw (ISO 4217's "none").
NO_CURRENCY: Final = "XXX"
MONEY_KINDS: Final = ("authorized", "captured", "voided", "refunded")
_AUTHORIZED, _CAPTURED, _VOIDED, _REFUNDED = range(4)

# The per-order int: one bit per event type seen (and OrderPlaced), the current status's
# index in STATUSES, and the currency's index + 1 (0: not known yet).
_EVENT_NAMES: Final = tuple(sorted(lifecycle.EVENTS))
_PLACED: Final = 1
_BIT: Final[dict[str, int]] = {name: 1 << (i + 1) for i, name in enumerate(_EVENT_NAMES)}
_DECIDED: Final = _BIT["OrderReserved"] | _BIT["OrderRejected"]
_STATUS_SHIFT: Final = len(_EVENT_NAMES) + 1
_STATUS_FIELD: Final = 0xF << _STATUS_SHIFT
_CURRENCY_SHIFT: Final = _STATUS_SHIFT + 4
_CURRENCY_FIELD: Final = 0x3F << _CURRENCY_SHIFT
_MAX_CURRENCIES: Final = 0x3F
assert len(STATUSES) <= 16
# event -> (status index -> status index it moves to, -1: it does not apply); a lookup
# per event instead of lifecycle.applies' four
_MOVES: Final[dict[str, tuple[int, ...]]] = {
    event: tuple(
        STATUSES.index(target) if lifecycle.applies(current, event) else -1 for current in STATUSES
    )
    for event, target in TARGET.items()
}


# --- per-second buckets ---------------------------------------------------------------


class _Bucket:
    """Everything counted in one second of event time (or merged over a window, or all
    time: the same counters, added up)."""

    __slots__ = (
        "authorized",
        "cancelled",
        "cancelled_at",
        "declined",
        "dlq",
        "expired",
        "failed",
        "lat",
        "malformed",
        "money",
        "paid",
        "pay",
        "placed",
        "rejected",
        "reserved",
        "revenue",
        "sec",
        "ship",
        "shipped",
        "skus",
    )

    def __init__(self, sec: int) -> None:
        self.sec = sec
        self.placed = 0
        self.malformed = 0
        self.reserved = 0
        self.rejected: dict[str, int] = {}
        self.cancelled = 0
        self.dlq: dict[str, int] = {}
        self.revenue: dict[str, int] = {}  # currency -> cents
        self.lat = Histogram()
        self.skus: dict[str, int] = {}
        self.paid = 0
        self.shipped = 0
        self.expired = 0
        self.failed: dict[str, int] = {}  # decline reason -> orders
        self.cancelled_at: dict[str, int] = {}  # stage -> orders
        self.authorized = 0
        self.declined = 0
        # MONEY_KINDS, in order: currency -> cents
        self.money: tuple[dict[str, int], ...] = ({}, {}, {}, {})
        self.pay = Histogram()
        self.ship = Histogram()

    @property
    def decided(self) -> int:
        return self.reserved + sum(self.rejected.values())

    def add_money(self, kind: int, currency: str, cents: int) -> None:
        into = self.money[kind]
        into[currency] = into.get(currency, 0) + cents

    def merge(self, b: _Bucket) -> None:
        self.placed += b.placed
        self.malformed += b.malformed
        self.reserved += b.reserved
        merge_counts(self.rejected, b.rejected)
        self.cancelled += b.cancelled
        merge_counts(self.dlq, b.dlq)
        merge_counts(self.revenue, b.revenue)
        self.lat.merge(b.lat)
        merge_counts(self.skus, b.skus)
        self.paid += b.paid
        self.shipped += b.shipped
        self.expired += b.expired
        merge_counts(self.failed, b.failed)
        merge_counts(self.cancelled_at, b.cancelled_at)
        self.authorized += b.authorized
        self.declined += b.declined
        for mine, theirs in zip(self.money, b.money, strict=True):
            merge_counts(mine, theirs)
        self.pay.merge(b.pay)
        self.ship.merge(b.ship)


class _Totals:
    """All-time counts (not windowed)."""

    def __init__(self) -> None:
        self.records: dict[str, int] = {"orders": 0, "events": 0, "dlq": 0}
        self.placed = 0
        self.malformed = 0
        self.duplicate_orders = 0
        self.reserved = 0
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.cancelled = 0
        self.cancel_rejected = 0
        self.duplicate_outcomes = 0
        self.undecodable_events = 0
        self.decided_placed = 0  # placed orders that have an outcome (for in_flight)
        self.dlq: dict[str, int] = {}
        self.revenue: dict[str, int] = {}
        self.skus: dict[str, int] = {}
        self.skipped = 0  # records below the expected offset (already counted)


def _cents(amount: float) -> int:
    cents = schema.to_cents(amount)
    return cents if cents is not None else round(amount * 100)


def _money(cents_by_currency: dict[str, int]) -> dict[str, float]:
    return {cur: cents / 100 for cur, cents in sorted(cents_by_currency.items())}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _latency(hist: Histogram) -> Latency:
    bins, top = hist.bins, hist.max
    return Latency(
        count=sum(bins.values()),
        p50=_ms(percentile(bins, 0.50, top)),
        p90=_ms(percentile(bins, 0.90, top)),
        p99=_ms(percentile(bins, 0.99, top)),
        max=_ms(top),
    )


def _top(quantities: dict[str, int], n: int = TOP_SKUS) -> list[SkuQuantity]:
    best = heapq.nsmallest(n, quantities.items(), key=lambda kv: (-kv[1], kv[0]))
    return [SkuQuantity(sku, qty) for sku, qty in best]


def _funnel(agg: _Bucket) -> dict[str, int]:
    reached = {"PLACED": agg.placed, "RESERVED": agg.reserved, "PAID": agg.paid}
    reached["SHIPPED"] = agg.shipped
    return {status: reached[status] for status in FUNNEL}


def _ends(agg: _Bucket) -> dict[str, End]:
    stages = dict.fromkeys(CANCEL_STAGES, 0)
    merge_counts(stages, agg.cancelled_at)
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    merge_counts(rejected, agg.rejected)
    ends = {
        "REJECTED": End(sum(rejected.values()), rejected),
        "PAYMENT_FAILED": End(sum(agg.failed.values()), dict(sorted(agg.failed.items()))),
        "EXPIRED": End(agg.expired, {}),
        "CANCELLED": End(sum(stages.values()), stages),
    }
    return {status: ends[status] for status in FAILURE_ENDS}


# a lifecycle.py that grows a step or an end must grow analytics with it
_probe = _Bucket(0)
assert set(_funnel(_probe)) == set(FUNNEL), "analytics counts every FUNNEL step"
assert set(_ends(_probe)) == set(FAILURE_ENDS), "analytics counts every failure end"
del _probe


def _life(seconds: int | None, agg: _Bucket) -> LifeWindow:
    funnel = _funnel(agg)
    conversion: dict[str, float | None] = {
        FUNNEL[i]: _ratio(funnel[FUNNEL[i]], funnel[FUNNEL[i - 1]]) for i in range(1, len(FUNNEL))
    }
    money = agg.money
    net = dict(money[_CAPTURED])
    for currency, cents in money[_REFUNDED].items():
        net[currency] = net.get(currency, 0) - cents
    return LifeWindow(
        seconds=seconds,
        funnel=funnel,
        conversion=conversion,
        ends=_ends(agg),
        authorizations=agg.authorized,
        declines=agg.declined,
        decline_rate=_ratio(agg.declined, agg.authorized + agg.declined),
        expiry_rate=_ratio(agg.expired, agg.reserved),
        time_to_pay_ms=_latency(agg.pay),
        time_to_ship_ms=_latency(agg.ship),
        money=Money(
            authorized=_money(money[_AUTHORIZED]),
            captured=_money(money[_CAPTURED]),
            voided=_money(money[_VOIDED]),
            refunded=_money(money[_REFUNDED]),
            net_captured=_money(net),
        ),
    )


class Analytics:
    """Pure analytics over decoded topic records; ``handle`` produces nothing."""

    def __init__(
        self,
        *,
        orders_topic: str,
        events_topic: str,
        dlq_topic: str,
        clock: Callable[[], float] = time.time,
        dlq_alert_ratio: float = DEFAULT_DLQ_ALERT_RATIO,
    ) -> None:
        self.orders_topic = orders_topic
        self.events_topic = events_topic
        self.dlq_topic = dlq_topic
        self.dlq_alert_ratio = dlq_alert_ratio
        self._clock = clock
        self._ring: list[_Bucket | None] = [None] * RING_SECONDS
        self._orders: dict[str, int] = {}  # order_id -> events seen, status, currency
        self._created: dict[str, float] = {}  # order_id -> created_at, until it ends
        self._status_counts = [0] * len(STATUSES)  # orders moved into each status, net
        self._currencies: list[str] = []
        self._currency_index: dict[str, int] = {}
        self._next: dict[tuple[str, int], int] = {}
        self._recent: list[tuple[int, int, int, RecentDlq]] = []  # min-heap
        self._all = _Bucket(0)  # the lifecycle counters since the beginning
        self.stale_events = 0
        self.totals = _Totals()
        # one dict lookup per event instead of an isinstance chain
        self._handlers: dict[type, Callable[[Any, int], None]] = {
            OrderReserved: self._reserved,
            OrderRejected: self._rejected,
            OrderCancelled: self._cancelled,
            CancelRejected: self._cancel_rejected,
            OrderPaid: self._paid,
            OrderPaymentFailed: self._payment_failed,
            ReservationExpired: self._expired,
            OrderShipped: self._shipped,
            PaymentAuthorized: self._authorized,
            PaymentDeclined: self._declined,
            PaymentCaptured: self._captured,
            PaymentVoided: self._voided,
            PaymentRefunded: self._refunded,
            # StockReleased and ShipmentReady accompany events counted already
        }

    # --- positions ------------------------------------------------------------------

    def positions(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> next offset to read: everything before it is counted."""
        return dict(self._next)

    # --- input ----------------------------------------------------------------------

    def handle(self, batch: Sequence[InRecord]) -> list[OutRecord]:
        """Count a batch; records already counted (by offset) are skipped."""
        now = self._clock()
        now_sec = int(now)
        nxt = self._next
        events_topic = self.events_topic
        for rec in batch:
            key = (rec.topic, rec.partition)
            expected = nxt.get(key, 0)
            if rec.offset < expected:
                self.totals.skipped += 1
                continue
            nxt[key] = rec.offset + 1
            if rec.topic == events_topic:
                self._event(rec, now_sec)
            elif rec.topic == self.orders_topic:
                self._order(rec, now_sec)
            elif rec.topic == self.dlq_topic:
                self._dlq(rec, now_sec)
        return []

    def _bucket(self, ts: float, now_sec: int) -> _Bucket | None:
        """The bucket of event time ``ts``; None when it is older than the ring."""
        sec = int(ts) if 0 < ts < now_sec + 1 else now_sec
        if sec <= now_sec - RING_SECONDS:
            return None
        index = sec % RING_SECONDS
        bucket = self._ring[index]
        if bucket is None or bucket.sec != sec:
            if bucket is not None and bucket.sec > sec:
                return None  # cannot happen while the clock goes forward; be safe
            bucket = _Bucket(sec)
            self._ring[index] = bucket
        return bucket

    def _order(self, rec: InRecord, now_sec: int) -> None:
        t = self.totals
        t.records["orders"] += 1
        ts = rec.timestamp_ms / 1000.0
        try:
            order = schema.decode_order(rec.value)
        except DecodeError:
            t.malformed += 1
            bucket = self._bucket(ts, now_sec)
            if bucket is not None:
                bucket.malformed += 1
            return
        seen = self._orders.get(order.order_id, 0)
        if seen & _PLACED:
            t.duplicate_orders += 1
            return
        self._orders[order.order_id] = seen | _PLACED
        t.placed += 1
        self._all.placed += 1
        if seen & _DECIDED:
            t.decided_placed += 1
        bucket = self._bucket(ts, now_sec)
        if bucket is not None:
            bucket.placed += 1

    def _event(self, rec: InRecord, now_sec: int) -> None:
        t = self.totals
        t.records["events"] += 1
        try:
            event = schema.decode_event(rec.value)
        except DecodeError:
            t.undecodable_events += 1
            return
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event, now_sec)

    def _first(self, order_id: str, event: str, currency: int = 0) -> int:
        """Mark ``event`` seen for the order and move its status if ``event`` does; the
        order's new mask, -1 if ``event`` was seen already (a duplicate copy), -2 if it
        moves a status but not this order's (``lifecycle.applies``: stale, it counts
        nowhere else). ``currency``: the currency field to set if the order has none."""
        orders = self._orders
        seen = orders.get(order_id, 0)
        bit = _BIT[event]
        if seen & bit:
            self.totals.duplicate_outcomes += 1
            return -1
        mask = seen | bit
        if currency and not seen & _CURRENCY_FIELD:
            mask |= currency
        stale = False
        moves = _MOVES.get(event)
        if moves is not None:
            current = (seen & _STATUS_FIELD) >> _STATUS_SHIFT
            target = moves[current]
            if target >= 0:
                counts = self._status_counts
                counts[current] -= 1
                counts[target] += 1
                mask = (mask & ~_STATUS_FIELD) | (target << _STATUS_SHIFT)
            else:
                stale = True
        orders[order_id] = mask
        if bit & _DECIDED and seen & _PLACED and not seen & _DECIDED:
            self.totals.decided_placed += 1
        if stale:
            # an event at or below the order's rank (a payment after its expiry): the
            # status stays, and so do the counts; verify reports the undeclared step
            self.stale_events += 1
            return -2
        return mask

    def _currency_bits(self, currency: str) -> int:
        index = self._currency_index.get(currency)
        if index is None:
            if len(self._currencies) >= _MAX_CURRENCIES:
                return 0  # more currencies than bits: later facts count as NO_CURRENCY
            self._currencies.append(currency)
            index = self._currency_index[currency] = len(self._currencies)
        return index << _CURRENCY_SHIFT

    def _currency_of(self, mask: int) -> str:
        index = (mask & _CURRENCY_FIELD) >> _CURRENCY_SHIFT
        return self._currencies[index - 1] if index else NO_CURRENCY

    def _reserved(self, event: OrderReserved, now_sec: int) -> None:
        if self._first(event.order_id, "OrderReserved", self._currency_bits(event.currency)) < 0:
            return
        t = self.totals
        t.reserved += 1
        self._all.reserved += 1
        self._created[event.order_id] = event.order_created_at
        cents = _cents(event.total)
        t.revenue[event.currency] = t.revenue.get(event.currency, 0) + cents
        skus = t.skus
        for item in event.items:
            skus[item.sku] = skus.get(item.sku, 0) + item.quantity
        bucket = self._bucket(event.at, now_sec)
        if bucket is not None:
            bucket.reserved += 1
            bucket.revenue[event.currency] = bucket.revenue.get(event.currency, 0) + cents
            bskus = bucket.skus
            for item in event.items:
                bskus[item.sku] = bskus.get(item.sku, 0) + item.quantity
            bucket.lat.add(event.at - event.order_created_at)

    def _rejected(self, event: OrderRejected, now_sec: int) -> None:
        if self._first(event.order_id, "OrderRejected") < 0:
            return
        why = event.reason
        t = self.totals
        t.rejected[why] = t.rejected.get(why, 0) + 1
        self._all.rejected[why] = self._all.rejected.get(why, 0) + 1
        bucket = self._bucket(event.at, now_sec)
        if bucket is not None:
            bucket.rejected[why] = bucket.rejected.get(why, 0) + 1
            bucket.lat.add(event.at - event.order_created_at)

    def _cancelled(self, event: OrderCancelled, now_sec: int) -> None:
        if self._first(event.order_id, "OrderCancelled") < 0:
            return
        self._created.pop(event.order_id, None)
        stage = event.stage if event.stage in CANCEL_STAGES else UNKNOWN_STAGE
        self.totals.cancelled += 1
        every = self._all
        every.cancelled += 1
        every.cancelled_at[stage] = every.cancelled_at.get(stage, 0) + 1
        bucket = self._bucket(event.at, now_sec)
        if bucket is not None:
            bucket.cancelled += 1
            bucket.cancelled_at[stage] = bucket.cancelled_at.get(stage, 0) + 1

    def _cancel_rejected(self, event: CancelRejected, _now_sec: int) -> None:
        if self._first(event.order_id, "CancelRejected") >= 0:
            self.totals.cancel_rejected += 1

    def _paid(self, event: OrderPaid, now_sec: int) -> None:
        if self._first(event.order_id, "OrderPaid") < 0:
            return
        created = self._created.get(event.order_id)
        bucket = self._bucket(event.at, now_sec)
        self._all.paid += 1
        if bucket is not None:
            bucket.paid += 1
        if created is not None:
            self._all.pay.add(event.at - created, None if bucket is None else bucket.pay)

    def _shipped(self, event: OrderShipped, now_sec: int) -> None:
        if self._first(event.order_id, "OrderShipped") < 0:
            return
        created = self._created.pop(event.order_id, None)
        bucket = self._bucket(event.at, now_sec)
        self._all.shipped += 1
        if bucket is not None:
            bucket.shipped += 1
        if created is not None:
            self._all.ship.add(event.at - created, None if bucket is None else bucket.ship)

    def _payment_failed(self, event: OrderPaymentFailed, now_sec: int) -> None:
        if self._first(event.order_id, "OrderPaymentFailed") < 0:
            return
        self._created.pop(event.order_id, None)
        why = event.reason or UNKNOWN_STAGE
        failed = self._all.failed
        if why not in failed and len(failed) >= MAX_DECLINE_REASONS:
            why = OTHER_REASON  # free text from the gateway: bound the keys
        failed[why] = failed.get(why, 0) + 1
        bucket = self._bucket(event.at, now_sec)
        if bucket is not None:
            bucket.failed[why] = bucket.failed.get(why, 0) + 1

    def _expired(self, event: ReservationExpired, now_sec: int) -> None:
        if self._first(event.order_id, "ReservationExpired") < 0:
            return
        self._created.pop(event.order_id, None)
        self._all.expired += 1
        bucket = self._bucket(event.at, now_sec)
        if bucket is not None:
            bucket.expired += 1

    def _authorized(self, event: PaymentAuthorized, now_sec: int) -> None:
        if (
            self._first(event.order_id, "PaymentAuthorized", self._currency_bits(event.currency))
            < 0
        ):
            return
        cents = _cents(event.amount)
        self._all.authorized += 1
        self._all.add_money(_AUTHORIZED, event.currency, cents)
        bucket = self._bucket(event.at, now_sec)
        if bucket is not None:
            bucket.authorized += 1
            bucket.add_money(_AUTHORIZED, event.currency, cents)

    def _declined(self, event: PaymentDeclined, now_sec: int) -> None:
        if self._first(event.order_id, "PaymentDeclined") < 0:
            return
        self._all.declined += 1
        bucket = self._bucket(event.at, now_sec)
        if bucket is not None:
            bucket.declined += 1

    def _settled(
        self, kind: int, event: PaymentCaptured | PaymentVoided | PaymentRefunded, now_sec: int
    ) -> None:
        """A capture, void or refund: money in the currency of its order."""
        mask = self._first(event.order_id, type(event).__name__)
        if mask < 0:
            return
        currency = self._currency_of(mask)
        cents = _cents(event.amount)
        self._all.add_money(kind, currency, cents)
        bucket = self._bucket(event.at, now_sec)
        if bucket is not None:
            bucket.add_money(kind, currency, cents)

    def _captured(self, event: PaymentCaptured, now_sec: int) -> None:
        self._settled(_CAPTURED, event, now_sec)

    def _voided(self, event: PaymentVoided, now_sec: int) -> None:
        self._settled(_VOIDED, event, now_sec)

    def _refunded(self, event: PaymentRefunded, now_sec: int) -> None:
        self._settled(_REFUNDED, event, now_sec)

    def _dlq(self, rec: InRecord, now_sec: int) -> None:
        t = self.totals
        t.records["dlq"] += 1
        entry = parse_entry(rec)
        why = reason(entry)
        t.dlq[why] = t.dlq.get(why, 0) + 1
        bucket = self._bucket(rec.timestamp_ms / 1000.0, now_sec)
        if bucket is not None:
            bucket.dlq[why] = bucket.dlq.get(why, 0) + 1
        item = RecentDlq(
            at=rec.timestamp_ms / 1000.0,
            reason=why,
            source=entry.source(),
            order_id=entry.order_id,
            service=entry.service,
            stage=entry.stage,
            message=entry.message[:300],
            dlq=entry.where(),
        )
        # keep the newest by record time, whatever order the partitions are read in
        heap_key = (rec.timestamp_ms, rec.partition, rec.offset, item)
        if len(self._recent) < RECENT_DLQ:
            heapq.heappush(self._recent, heap_key)
        elif heap_key[:3] > self._recent[0][:3]:
            heapq.heapreplace(self._recent, heap_key)

    # --- output ---------------------------------------------------------------------

    def _buckets(self, first: int, last: int) -> Iterable[_Bucket]:
        """The non-empty buckets of seconds ``first..last`` (inclusive)."""
        for sec in range(first, last + 1):
            bucket = self._ring[sec % RING_SECONDS]
            if bucket is not None and bucket.sec == sec:
                yield bucket

    def _sum(self, seconds: int, end: int) -> _Bucket:
        """Every bucket of the ``seconds`` complete seconds before ``end``, added up."""
        agg = _Bucket(end)
        for b in self._buckets(end - seconds, end - 1):
            agg.merge(b)
        return agg

    def _window(self, seconds: int, agg: _Bucket) -> Window:
        rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        merge_counts(rejected, agg.rejected)
        rejected_total = sum(rejected.values())
        decided = agg.reserved + rejected_total
        dlq_total = sum(agg.dlq.values())
        return Window(
            seconds=seconds,
            placed=agg.placed,
            placed_per_s=round(agg.placed / seconds, 3),
            malformed=agg.malformed,
            decided=decided,
            decided_per_s=round(decided / seconds, 3),
            reserved=agg.reserved,
            rejected=rejected,
            rejected_total=rejected_total,
            cancelled=agg.cancelled,
            dlq=dlq_total,
            dlq_per_s=round(dlq_total / seconds, 3),
            dlq_by_reason=dict(sorted(agg.dlq.items())),
            revenue=_money(agg.revenue),
            latency_ms=_latency(agg.lat),
        )

    def _series(self, end: int) -> Series:
        start = end - SERIES_SECONDS
        placed: list[int] = []
        decided: list[int] = []
        dlq: list[int] = []
        p50: list[float | None] = []
        p99: list[float | None] = []
        for sec in range(start, end):
            b = self._ring[sec % RING_SECONDS]
            if b is None or b.sec != sec:
                placed.append(0)
                decided.append(0)
                dlq.append(0)
                p50.append(None)
                p99.append(None)
                continue
            placed.append(b.placed)
            decided.append(b.decided)
            dlq.append(sum(b.dlq.values()))
            p50.append(_ms(percentile(b.lat.bins, 0.50, b.lat.max)))
            p99.append(_ms(percentile(b.lat.bins, 0.99, b.lat.max)))
        return Series(
            start=start,
            step_s=1,
            placed=placed,
            decided=decided,
            dlq=dlq,
            p50_ms=p50,
            p99_ms=p99,
        )

    def _totals(self) -> Totals:
        t = self.totals
        rejected_total = sum(t.rejected.values())
        decided = t.reserved + rejected_total
        return Totals(
            orders_records=t.records["orders"],
            placed=t.placed,
            malformed=t.malformed,
            reserved=t.reserved,
            rejected=dict(t.rejected),
            rejected_total=rejected_total,
            decided=decided,
            in_flight=t.placed - t.decided_placed,
            cancelled=t.cancelled,
            cancel_rejected=t.cancel_rejected,
            dlq=sum(t.dlq.values()),
            dlq_by_reason=dict(sorted(t.dlq.items())),
            revenue=_money(t.revenue),
            duplicate_orders=t.duplicate_orders,
            duplicate_outcomes=t.duplicate_outcomes,
            undecodable_events=t.undecodable_events,
            records=dict(t.records),
        )

    def _lifecycle(self, aggs: dict[int, _Bucket]) -> Lifecycle:
        counts = self._status_counts
        # an order counts in PLACED from its OrderPlaced on (counts[PLACED] only nets the
        # orders that left it, read first or not); the others from the event that moved it
        by_status: dict[str, int] = {s: max(0, counts[i]) for i, s in enumerate(STATUSES)}
        by_status["PLACED"] = self.totals.placed - self.totals.decided_placed
        return Lifecycle(
            windows={f"{w}s": _life(w, aggs[w]) for w in WINDOWS},
            all=_life(None, self._all),
            by_status=by_status,
            stale_events=self.stale_events,
        )

    def _alert(self, agg: _Bucket) -> DlqAlert:
        records = agg.placed + agg.malformed
        dlq = sum(agg.dlq.values())
        ratio = _ratio(dlq, records)
        return DlqAlert(
            window_s=ALERT_WINDOW,
            threshold=self.dlq_alert_ratio,
            dlq=dlq,
            orders_records=records,
            ratio=ratio,
            firing=dlq > 0 and (ratio is None or ratio > self.dlq_alert_ratio),
        )

    def snapshot(self) -> Snapshot:
        """Windows, totals, top SKUs, series, the latest DLQ entries, the order's life."""
        now = self._clock()
        end = int(now)  # windows end before the second in progress
        aggs = {w: self._sum(w, end) for w in WINDOWS}
        recent = [item for *_key, item in sorted(self._recent, reverse=True)]
        return Snapshot(
            generated_at=now,
            window_end=end,
            windows={f"{w}s": self._window(w, aggs[w]) for w in WINDOWS},
            totals=self._totals(),
            top_skus=TopSkus(last_60s=_top(aggs[60].skus), all_time=_top(self.totals.skus)),
            series=self._series(end),
            dlq_recent=recent,
            lifecycle=self._lifecycle(aggs),
            dlq_alert=self._alert(aggs[ALERT_WINDOW]),
        )

    def lifecycle(self) -> LifecycleView:
        """The order's life and the DLQ alert alone (``/lifecycle``)."""
        now = self._clock()
        end = int(now)
        aggs = {w: self._sum(w, end) for w in WINDOWS}
        return LifecycleView(
            generated_at=now,
            window_end=end,
            lifecycle=self._lifecycle(aggs),
            dlq_alert=self._alert(aggs[ALERT_WINDOW]),
        )

    def summary(self) -> str:
        """One log line: the funnel since the beginning, its failure ends, the DLQ."""
        life = _life(None, self._all)
        steps = " ".join(f"{s.lower()} {n}" for s, n in life.funnel.items())
        ends = " ".join(f"{s.lower()} {e.total}" for s, e in life.ends.items())
        return (
            f"{steps}; {ends}; malformed {self.totals.malformed}, "
            f"dlq {sum(self.totals.dlq.values())}"
        )
