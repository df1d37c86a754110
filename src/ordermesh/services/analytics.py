"""Analytics core: rolling windows, all-time totals and chart series, from the topics.

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
  time from the beginning), and outcomes are deduplicated per (order_id, event type): a
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
- **Memory.** One dict entry per order id (a bitmask of what was seen) keeps the
  deduplication: about 150 bytes per order, 150 MB for a million orders.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final, TypeVar, get_args

import msgspec

from ordermesh import schema
from ordermesh.errors import DecodeError
from ordermesh.records import InRecord, OutRecord
from ordermesh.schema import (
    CancelRejected,
    OrderCancelled,
    OrderRejected,
    OrderReserved,
)
from ordermesh.services.dlq import parse_entry, reason

logger = logging.getLogger(__name__)

WINDOWS: Final = (1, 10, 60)
# the ring keeps a little more than the series so the oldest series second is complete
RING_SECONDS: Final = 310
SERIES_SECONDS: Final = 300
TOP_SKUS: Final = 10
RECENT_DLQ: Final = 20
REJECT_REASONS: Final[tuple[str, ...]] = get_args(schema.RejectReason)

LATENCY_ALPHA: Final = 0.01
_GAMMA: Final = (1 + LATENCY_ALPHA) / (1 - LATENCY_ALPHA)
_LOG_GAMMA: Final = math.log(_GAMMA)
# latencies are clamped into [1 us, 1 day]; <= 0 (clock skew) has a bin of its own
_MIN_LATENCY: Final = 1e-6
_MAX_LATENCY: Final = 86_400.0
ZERO_BIN: Final = -(10**6)

_K = TypeVar("_K")

# bits of the per-order dedupe mask
_PLACED: Final = 1
_RESERVED: Final = 2
_REJECTED: Final = 4
_CANCELLED: Final = 8
_CANCEL_REJECTED: Final = 16
_DECIDED: Final = _RESERVED | _REJECTED


# --- latency histogram ----------------------------------------------------------------


def latency_bin(seconds: float) -> int:
    """The log-scale bin of a latency: bin i holds (gamma^(i-1), gamma^i]."""
    if not seconds > 0:  # also NaN
        return ZERO_BIN
    clamped = min(max(seconds, _MIN_LATENCY), _MAX_LATENCY)
    return math.ceil(math.log(clamped) / _LOG_GAMMA)


def bin_value(index: int) -> float:
    """The value reported for a bin: within ``LATENCY_ALPHA`` of anything in it."""
    if index == ZERO_BIN:
        return 0.0
    return 2.0 * _GAMMA**index / (_GAMMA + 1.0)


def percentile(hist: dict[int, int], q: float, exact_max: float | None = None) -> float | None:
    """Nearest-rank ``q``-quantile (0 < q <= 1) of a histogram; None when it is empty."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            value = bin_value(index)
            # the exact max bounds every estimate (and only moves it closer to the truth)
            return value if exact_max is None else min(value, exact_max)
    raise AssertionError("unreachable: rank <= total")


def _merge(into: dict[_K, int], other: dict[_K, int]) -> None:
    for key, count in other.items():
        into[key] = into.get(key, 0) + count


# --- the snapshot -----------------------------------------------------------------------
# The JSON of ``/snapshot``, read by the dashboard (app.js) and the live view of
# ``ordermesh up``/``top``: renaming or reordering a field changes that JSON.


class Latency(msgspec.Struct, frozen=True):
    """End-to-end latency over a window, in milliseconds; None when nothing was decided."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


class Window(msgspec.Struct, frozen=True):
    """Counts and rates over the ``seconds`` complete seconds before ``window_end``."""

    seconds: int
    placed: int
    placed_per_s: float
    malformed: int
    decided: int
    decided_per_s: float
    reserved: int
    rejected: dict[str, int]  # every reject reason, zeros included
    rejected_total: int
    cancelled: int
    dlq: int
    dlq_per_s: float
    dlq_by_reason: dict[str, int]
    revenue: dict[str, float]  # currency -> amount
    latency_ms: Latency


class Totals(msgspec.Struct, frozen=True):
    """All-time counts since the topics' beginning."""

    orders_records: int
    placed: int
    malformed: int
    reserved: int
    rejected: dict[str, int]
    rejected_total: int
    decided: int
    in_flight: int
    cancelled: int
    cancel_rejected: int
    dlq: int
    dlq_by_reason: dict[str, int]
    revenue: dict[str, float]
    duplicate_orders: int
    duplicate_outcomes: int
    undecodable_events: int
    records: dict[str, int]  # records read per input: orders, events, dlq


class SkuQuantity(msgspec.Struct, frozen=True):
    """Units of one SKU reserved."""

    sku: str
    quantity: int


class TopSkus(msgspec.Struct, frozen=True):
    """The most reserved SKUs, by quantity, ties by name."""

    last_60s: list[SkuQuantity]
    all_time: list[SkuQuantity]


class Series(msgspec.Struct, frozen=True):
    """Per-second chart series, oldest first, ``SERIES_SECONDS`` long."""

    start: int
    step_s: int
    placed: list[int]
    decided: list[int]
    dlq: list[int]
    p50_ms: list[float | None]
    p99_ms: list[float | None]


class RecentDlq(msgspec.Struct, frozen=True):
    """One of the latest DLQ entries, by record time."""

    at: float
    reason: str
    source: str
    order_id: str | None
    service: str
    stage: str
    message: str
    dlq: str


class Snapshot(msgspec.Struct, frozen=True):
    """Everything the dashboard shows, as of ``generated_at``."""

    generated_at: float
    window_end: int
    windows: dict[str, Window]  # "1s", "10s", "60s"
    totals: Totals
    top_skus: TopSkus
    series: Series
    dlq_recent: list[RecentDlq]  # newest first


# --- per-second buckets ---------------------------------------------------------------


class _Bucket:
    """Everything counted in one second of event time."""

    __slots__ = (
        "cancelled",
        "dlq",
        "lat",
        "lat_max",
        "malformed",
        "placed",
        "rejected",
        "reserved",
        "revenue",
        "sec",
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
        self.lat: dict[int, int] = {}
        self.lat_max: float | None = None
        self.skus: dict[str, int] = {}

    @property
    def decided(self) -> int:
        return self.reserved + sum(self.rejected.values())

    def add_latency(self, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        seconds = max(seconds, 0.0)  # clock skew between hosts: count it as instant
        index = latency_bin(seconds)
        self.lat[index] = self.lat.get(index, 0) + 1
        if self.lat_max is None or seconds > self.lat_max:
            self.lat_max = seconds


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


def _top(quantities: dict[str, int], n: int = TOP_SKUS) -> list[SkuQuantity]:
    best = heapq.nsmallest(n, quantities.items(), key=lambda kv: (-kv[1], kv[0]))
    return [SkuQuantity(sku, qty) for sku, qty in best]


class Analytics:
    """Pure analytics over decoded topic records; ``handle`` produces nothing."""

    def __init__(
        self,
        *,
        orders_topic: str,
        events_topic: str,
        dlq_topic: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.orders_topic = orders_topic
        self.events_topic = events_topic
        self.dlq_topic = dlq_topic
        self._clock = clock
        self._ring: list[_Bucket | None] = [None] * RING_SECONDS
        self._orders: dict[str, int] = {}  # order_id -> bitmask of what was seen
        self._next: dict[tuple[str, int], int] = {}
        self._recent: list[tuple[int, int, int, RecentDlq]] = []  # min-heap
        self.totals = _Totals()

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
        for rec in batch:
            key = (rec.topic, rec.partition)
            expected = nxt.get(key, 0)
            if rec.offset < expected:
                self.totals.skipped += 1
                continue
            nxt[key] = rec.offset + 1
            if rec.topic == self.events_topic:
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
        if isinstance(event, OrderReserved):
            if not self._first(event.order_id, _RESERVED):
                return
            t.reserved += 1
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
                bucket.add_latency(event.at - event.order_created_at)
        elif isinstance(event, OrderRejected):
            if not self._first(event.order_id, _REJECTED):
                return
            t.rejected[event.reason] = t.rejected.get(event.reason, 0) + 1
            bucket = self._bucket(event.at, now_sec)
            if bucket is not None:
                bucket.rejected[event.reason] = bucket.rejected.get(event.reason, 0) + 1
                bucket.add_latency(event.at - event.order_created_at)
        elif isinstance(event, OrderCancelled):
            if not self._first(event.order_id, _CANCELLED):
                return
            t.cancelled += 1
            bucket = self._bucket(event.at, now_sec)
            if bucket is not None:
                bucket.cancelled += 1
        elif isinstance(event, CancelRejected) and self._first(event.order_id, _CANCEL_REJECTED):
            t.cancel_rejected += 1
        # StockReleased accompanies OrderCancelled and adds nothing to count

    def _first(self, order_id: str, bit: int) -> bool:
        """Mark ``bit`` seen for the order; False (a duplicate copy) if it already was."""
        seen = self._orders.get(order_id, 0)
        if seen & bit:
            self.totals.duplicate_outcomes += 1
            return False
        self._orders[order_id] = seen | bit
        if bit & _DECIDED and seen & _PLACED and not seen & _DECIDED:
            self.totals.decided_placed += 1
        return True

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

    def _window(self, seconds: int, end: int) -> Window:
        placed = malformed = reserved = cancelled = 0
        rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        dlq: dict[str, int] = {}
        revenue: dict[str, int] = {}
        lat: dict[int, int] = {}
        lat_max: float | None = None
        for b in self._buckets(end - seconds, end - 1):
            placed += b.placed
            malformed += b.malformed
            reserved += b.reserved
            cancelled += b.cancelled
            _merge(rejected, b.rejected)
            _merge(dlq, b.dlq)
            _merge(revenue, b.revenue)
            _merge(lat, b.lat)
            if b.lat_max is not None and (lat_max is None or b.lat_max > lat_max):
                lat_max = b.lat_max
        rejected_total = sum(rejected.values())
        decided = reserved + rejected_total
        dlq_total = sum(dlq.values())
        return Window(
            seconds=seconds,
            placed=placed,
            placed_per_s=round(placed / seconds, 3),
            malformed=malformed,
            decided=decided,
            decided_per_s=round(decided / seconds, 3),
            reserved=reserved,
            rejected=rejected,
            rejected_total=rejected_total,
            cancelled=cancelled,
            dlq=dlq_total,
            dlq_per_s=round(dlq_total / seconds, 3),
            dlq_by_reason=dict(sorted(dlq.items())),
            revenue=_money(revenue),
            latency_ms=Latency(
                count=sum(lat.values()),
                p50=_ms(percentile(lat, 0.50, lat_max)),
                p90=_ms(percentile(lat, 0.90, lat_max)),
                p99=_ms(percentile(lat, 0.99, lat_max)),
                max=_ms(lat_max),
            ),
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
            p50.append(_ms(percentile(b.lat, 0.50, b.lat_max)))
            p99.append(_ms(percentile(b.lat, 0.99, b.lat_max)))
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

    def snapshot(self) -> Snapshot:
        """Windows, totals, top SKUs, series and the latest DLQ entries."""
        now = self._clock()
        end = int(now)  # windows end before the second in progress
        sku_60: dict[str, int] = {}
        for b in self._buckets(end - 60, end - 1):
            _merge(sku_60, b.skus)
        recent = [item for *_key, item in sorted(self._recent, reverse=True)]
        return Snapshot(
            generated_at=now,
            window_end=end,
            windows={f"{w}s": self._window(w, end) for w in WINDOWS},
            totals=self._totals(),
            top_skus=TopSkus(last_60s=_top(sku_60), all_time=_top(self.totals.skus)),
            series=self._series(end),
            dlq_recent=recent,
        )
