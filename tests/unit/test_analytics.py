"""Analytics core: windows over event time, dedupe, percentiles, top SKUs, snapshot."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ordermesh import lifecycle, schema
from ordermesh.records import InRecord, dead_letter
from ordermesh.schema import (
    CancelRejected,
    ItemQty,
    OrderCancelled,
    OrderItem,
    OrderPaid,
    OrderPaymentFailed,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    OrderShipped,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    ReservationExpired,
    ShipmentReady,
    StockReleased,
)
from ordermesh.services.analytics import (
    DEFAULT_DLQ_ALERT_RATIO,
    FAILURE_ENDS,
    LATENCY_ALPHA,
    MAX_DECLINE_REASONS,
    OTHER_REASON,
    RECENT_DLQ,
    REJECT_REASONS,
    RING_SECONDS,
    SERIES_SECONDS,
    Analytics,
    End,
    SkuQuantity,
    Snapshot,
    bin_value,
    latency_bin,
    percentile,
)

ORDERS = "orders"
EVENTS = "order-events"
DLQ = "orders-dlq"
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Feed:
    """Builds records with increasing offsets per (topic, partition)."""

    def __init__(self) -> None:
        self.offsets: dict[tuple[str, int], int] = {}

    def record(
        self,
        topic: str,
        value: bytes | None,
        ts: float,
        *,
        key: bytes | None = None,
        partition: int = 0,
        headers: list[tuple[str, bytes]] | None = None,
        offset: int | None = None,
    ) -> InRecord:
        if offset is None:
            offset = self.offsets.get((topic, partition), 0)
            self.offsets[(topic, partition)] = offset + 1
        return InRecord(topic, partition, offset, key, value, headers or [], int(ts * 1000))

    def order(self, order_id: str, ts: float, partition: int = 0) -> InRecord:
        order = OrderPlaced(
            order_id=order_id,
            customer_id="cust-1",
            items=(OrderItem("SKU-00001", 2, 5.25),),
            currency="USD",
            total=10.5,
            created_at=ts,
        )
        return self.record(
            ORDERS, schema.encode(order), ts, key=order_id.encode(), partition=partition
        )

    def malformed(self, ts: float) -> InRecord:
        return self.record(ORDERS, b"#not json", ts, key=b"bad")

    def event(self, event: Any, partition: int = 0) -> InRecord:
        return self.record(EVENTS, schema.encode(event), event.at, partition=partition)


def reserved(
    order_id: str,
    at: float,
    latency: float = 0.05,
    items: tuple[tuple[str, int], ...] = (("SKU-00001", 2),),
    total: float = 10.5,
    currency: str = "USD",
) -> OrderReserved:
    return OrderReserved(
        order_id=order_id,
        items=tuple(ItemQty(sku, qty) for sku, qty in items),
        total=total,
        currency=currency,
        order_created_at=at - latency,
        at=at,
    )


def rejected(
    order_id: str, at: float, reason: Any = "OUT_OF_STOCK", latency: float = 0.05
) -> OrderRejected:
    return OrderRejected(
        order_id=order_id, reason=reason, detail="", order_created_at=at - latency, at=at
    )


def make(now: float = T0 + 0.5) -> tuple[Analytics, Clock, Feed]:
    clock = Clock(now)
    return (
        Analytics(orders_topic=ORDERS, events_topic=EVENTS, dlq_topic=DLQ, clock=clock),
        clock,
        Feed(),
    )


# --- windows ----------------------------------------------------------------------------


def test_windows_cover_complete_seconds_of_event_time() -> None:
    an, _clock, feed = make(T0 + 0.5)  # the second in progress is T0
    batch = [
        feed.order("o-now", T0 + 0.2),  # current second: in no window yet
        feed.order("o-1s", T0 - 0.7),  # second T0-1: every window
        feed.order("o-5s", T0 - 5),  # 10 s and 60 s
        feed.order("o-30s", T0 - 30),  # 60 s only
        feed.order("o-90s", T0 - 90),  # no window, but totals
    ]
    assert an.handle(batch) == []
    snap = an.snapshot()
    w = snap.windows
    assert (w["1s"].placed, w["10s"].placed, w["60s"].placed) == (1, 2, 3)
    assert w["1s"].placed_per_s == 1.0
    assert w["10s"].placed_per_s == 0.2
    assert w["60s"].placed_per_s == 0.05
    assert snap.totals.placed == 5
    assert snap.window_end == int(T0)
    # the series holds the complete seconds, oldest first
    series = snap.series
    assert series.start == int(T0) - SERIES_SECONDS
    assert len(series.placed) == SERIES_SECONDS
    assert sum(series.placed) == 4
    assert series.placed[-1] == 1 and series.placed[-90] == 1


def test_old_buckets_roll_out_and_totals_stay() -> None:
    an, clock, feed = make()
    an.handle([feed.order(f"o{i}", T0 - 0.5) for i in range(10)])
    an.handle([feed.event(reserved(f"o{i}", T0 - 0.4)) for i in range(4)])
    assert an.snapshot().windows["1s"].decided == 4
    clock.now += 1  # one second later: out of the 1 s window, in the others
    w = an.snapshot().windows
    assert (w["1s"].placed, w["10s"].placed, w["60s"].placed) == (0, 10, 10)
    clock.now += 60
    w = an.snapshot().windows
    assert (w["10s"].placed, w["60s"].placed) == (0, 0)
    assert w["60s"].latency_ms.p50 is None
    clock.now += SERIES_SECONDS
    snap = an.snapshot()
    assert sum(snap.series.placed) == 0
    assert snap.totals.placed == 10 and snap.totals.reserved == 4
    # a bucket reused by a much later second starts empty
    an.handle([feed.order("late", clock.now - 1)])
    assert an.snapshot().windows["1s"].placed == 1
    assert an.snapshot().windows["60s"].placed == 1


def test_event_older_than_the_ring_counts_only_in_totals() -> None:
    an, _clock, feed = make()
    an.handle([feed.order("ancient", T0 - RING_SECONDS - 5)])
    snap = an.snapshot()
    assert snap.totals.placed == 1
    assert sum(snap.series.placed) == 0


def test_future_and_missing_timestamps_count_now() -> None:
    an, clock, feed = make()
    an.handle([feed.order("future", T0 + 3600), feed.order("zero", 0.0)])
    clock.now += 1
    assert an.snapshot().windows["1s"].placed == 2


def test_replay_into_a_fresh_instance_refills_the_same_windows() -> None:
    an, clock, feed = make()
    records = [feed.order(f"o{i}", T0 - 1 - i % 50) for i in range(200)]
    records += [feed.event(reserved(f"o{i}", T0 - 1 - i % 50 + 0.01)) for i in range(150)]
    an.handle(records)
    fresh = Analytics(orders_topic=ORDERS, events_topic=EVENTS, dlq_topic=DLQ, clock=clock)
    for i in range(0, len(records), 37):
        fresh.handle(records[i : i + 37])
    assert fresh.snapshot() == an.snapshot()


# --- totals and dedupe ------------------------------------------------------------------


def test_outcomes_reasons_revenue_latency_and_cancellations() -> None:
    an, clock, feed = make()
    t = T0 - 0.5
    an.handle([feed.order(f"o{i}", t - 0.1) for i in range(6)] + [feed.malformed(t)])
    an.handle(
        [
            feed.event(reserved("o0", t, latency=0.010, total=10.5)),
            feed.event(reserved("o1", t, latency=0.020, total=0.1)),
            feed.event(reserved("o2", t, latency=0.030, total=99.99, currency="EUR")),
            feed.event(rejected("o3", t, "OUT_OF_STOCK", latency=0.040)),
            feed.event(rejected("o4", t, "UNKNOWN_SKU", latency=0.050)),
            feed.event(OrderCancelled(order_id="o0", at=t)),
            feed.event(StockReleased(order_id="o0", items=(ItemQty("SKU-00001", 2),), at=t)),
            feed.event(CancelRejected(order_id="o3", reason="ORDER_REJECTED", detail="", at=t)),
            feed.record(EVENTS, b"{broken", t),
        ]
    )
    snap = an.snapshot()
    totals = snap.totals
    assert totals.orders_records == 7
    assert (totals.placed, totals.malformed) == (6, 1)
    assert totals.reserved == 3
    assert totals.rejected == {"OUT_OF_STOCK": 1, "UNKNOWN_SKU": 1, "INVALID_ORDER": 0}
    assert totals.rejected_total == 2 and totals.decided == 5
    assert totals.in_flight == 1  # o5
    assert (totals.cancelled, totals.cancel_rejected) == (1, 1)
    assert totals.revenue == {"EUR": 99.99, "USD": 10.6}
    assert totals.undecodable_events == 1
    w = snap.windows["1s"]
    assert (w.placed, w.malformed, w.decided, w.reserved) == (6, 1, 5, 3)
    assert w.rejected["UNKNOWN_SKU"] == 1 and w.cancelled == 1
    assert w.revenue == {"EUR": 99.99, "USD": 10.6}
    lat = w.latency_ms
    assert lat.count == 5
    assert lat.max == pytest.approx(50.0, abs=1e-6)
    assert lat.p50 == pytest.approx(30.0, rel=LATENCY_ALPHA)
    clock.now += 100
    assert an.snapshot().totals == totals


def test_duplicate_outcome_copies_are_counted_once() -> None:
    an, _clock, feed = make()
    t = T0 - 0.5
    an.handle([feed.order("o1", t), feed.order("o2", t)])
    copy = reserved("o1", t)
    # at-least-once: the same outcome twice (new offsets), a rejection copy, a repeated order
    an.handle(
        [
            feed.event(copy),
            feed.event(copy, partition=1),
            feed.event(rejected("o2", t)),
            feed.event(rejected("o2", t)),
            feed.event(OrderCancelled(order_id="o1", at=t)),
            feed.event(OrderCancelled(order_id="o1", at=t)),
            feed.order("o1", t),
        ]
    )
    snap = an.snapshot()
    totals = snap.totals
    assert totals.reserved == 1 and totals.rejected_total == 1
    assert totals.cancelled == 1
    assert totals.duplicate_outcomes == 3
    assert totals.placed == 1 + 1 and totals.duplicate_orders == 1
    assert totals.revenue == {"USD": 10.5}
    assert totals.in_flight == 0
    w = snap.windows["1s"]
    assert w.decided == 2 and w.latency_ms.count == 2 and w.placed == 2


def test_redelivered_offsets_are_skipped_and_positions_advance() -> None:
    an, _clock, feed = make()
    first = [feed.order("o1", T0 - 1), feed.order("o2", T0 - 1, partition=3)]
    an.handle(first)
    assert an.positions() == {(ORDERS, 0): 1, (ORDERS, 3): 1}
    an.handle(first)  # the runner re-reads from a stale position: nothing counts twice
    snap = an.snapshot()
    assert snap.totals.placed == 2 and snap.totals.duplicate_orders == 0
    assert an.totals.skipped == 2


def test_outcome_before_its_order_keeps_in_flight_right() -> None:
    an, _clock, feed = make()
    an.handle([feed.event(reserved("o1", T0 - 1))])  # events read before orders
    assert an.snapshot().totals.in_flight == 0
    an.handle([feed.order("o1", T0 - 1), feed.order("o2", T0 - 1)])
    assert an.snapshot().totals.in_flight == 1


# --- DLQ --------------------------------------------------------------------------------


def test_dlq_by_reason_and_latest_entries() -> None:
    an, clock, feed = make()
    source = feed.record(ORDERS, b'{"order_id": "o-bad", ', T0 - 3, key=b"o-bad")
    records = []
    for i in range(RECENT_DLQ + 5):
        cls = "DecodeError.json" if i % 3 else "CancelRejected"
        dl = dead_letter(
            source,
            dlq_topic=DLQ,
            service="inventory",
            stage="decode",
            error_class=cls,
            message=f"problem {i}",
        )
        # two DLQ partitions, read one after the other: the newest overall must win
        records.append(
            feed.record(
                DLQ, dl.value, T0 - 2 + i * 0.01, key=dl.key, partition=i % 2, headers=dl.headers
            )
        )
    records.sort(key=lambda r: r.partition)
    records.append(feed.record(DLQ, b"x", T0 - 2, partition=2))  # no error headers at all
    an.handle(records)
    clock.now += 1
    snap = an.snapshot()
    assert snap.totals.dlq == RECENT_DLQ + 6
    assert snap.totals.dlq_by_reason == {
        "CancelRejected": 9,
        "DecodeError.json": 16,
        "unknown": 1,
    }
    assert snap.windows["10s"].dlq_by_reason["DecodeError.json"] == 16
    assert snap.windows["10s"].dlq == RECENT_DLQ + 6
    recent = snap.dlq_recent
    assert len(recent) == RECENT_DLQ
    assert [e.message for e in recent[:2]] == ["problem 24", "problem 23"]
    assert [e.at for e in recent] == sorted((e.at for e in recent), reverse=True)
    first = recent[0]
    assert first.reason == "CancelRejected"  # problem 24: every third is a CancelRejected
    assert first.source == f"{ORDERS}[0]@0"
    assert first.order_id == "o-bad"
    assert first.service == "inventory" and first.stage == "decode"


# --- latency percentiles ----------------------------------------------------------------


def _nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


latencies = st.lists(
    st.floats(min_value=1e-5, max_value=3600.0, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(latencies, st.sampled_from([0.01, 0.5, 0.9, 0.99, 1.0]))
def test_histogram_percentile_is_within_alpha_of_the_exact_one(
    values: list[float], q: float
) -> None:
    hist: dict[int, int] = {}
    for v in values:
        hist[latency_bin(v)] = hist.get(latency_bin(v), 0) + 1
    exact = _nearest_rank(values, q)
    estimate = percentile(hist, q, max(values))
    assert estimate is not None
    assert abs(estimate - exact) <= LATENCY_ALPHA * exact * (1 + 1e-9)


@settings(max_examples=50, deadline=None)
@given(latencies)
def test_window_latency_matches_a_sorted_reference(values: list[float]) -> None:
    an, clock, feed = make()
    t = T0 - 0.5
    an.handle([feed.event(reserved(f"o{i}", t, latency=v)) for i, v in enumerate(values)])
    clock.now += 5
    lat = an.snapshot().windows["10s"].latency_ms
    measured = [(t - (t - v)) for v in values]  # what the events carry, float-rounded
    assert lat.count == len(values)
    assert lat.max == pytest.approx(max(measured) * 1000, abs=1e-3)
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        exact = _nearest_rank(measured, q) * 1000
        assert abs(getattr(lat, key) - exact) <= LATENCY_ALPHA * exact + 1e-3


def test_latency_edge_values() -> None:
    assert percentile({}, 0.5) is None
    assert bin_value(latency_bin(0.0)) == 0.0
    assert bin_value(latency_bin(-1.0)) == 0.0
    huge = bin_value(latency_bin(1e9))  # clamped to a day
    assert huge == pytest.approx(86_400.0, rel=LATENCY_ALPHA)
    an, _clock, feed = make()
    an.handle([feed.event(reserved("skewed", T0 - 0.5, latency=-2.0))])
    lat = an.snapshot().windows["1s"].latency_ms
    assert (lat.p50, lat.max) == (0.0, 0.0)


# --- top SKUs ---------------------------------------------------------------------------


def test_top_skus_last_minute_and_all_time() -> None:
    an, clock, feed = make()
    old = T0 - 120
    recent = T0 - 10
    events = [
        reserved("old-1", old, items=(("SKU-OLD", 1000),)),
        *(
            reserved(f"r{i}", recent, items=((f"SKU-{i:02d}", i + 1), ("SKU-HOT", 5)))
            for i in range(15)
        ),
        reserved("tie", recent, items=(("SKU-AAA", 15),)),
    ]
    an.handle([feed.event(e) for e in events])
    top = an.snapshot().top_skus
    last = top.last_60s
    assert len(last) == 10
    assert last[0] == SkuQuantity("SKU-HOT", 75)
    # ties are ordered by SKU name so the list is stable
    assert last[1:3] == [SkuQuantity("SKU-14", 15), SkuQuantity("SKU-AAA", 15)]
    assert all(row.sku != "SKU-OLD" for row in last)
    assert top.all_time[0] == SkuQuantity("SKU-OLD", 1000)
    assert [r.quantity for r in top.all_time] == sorted(
        (r.quantity for r in top.all_time), reverse=True
    )
    clock.now += 61
    assert an.snapshot().top_skus.last_60s == []


# --- snapshot ---------------------------------------------------------------------------


def test_snapshot_is_json_able_and_complete() -> None:
    an, clock, feed = make()
    an.handle([feed.order("o1", T0 - 1), feed.malformed(T0 - 1)])
    an.handle([feed.event(reserved("o1", T0 - 0.9))])
    clock.now += 1
    snap = an.snapshot()
    text = msgspec.json.encode(snap)
    assert msgspec.json.decode(text, type=Snapshot) == snap
    doc = json.loads(text)
    assert set(doc) == {
        "generated_at",
        "window_end",
        "windows",
        "totals",
        "top_skus",
        "series",
        "dlq_recent",
        "lifecycle",
        "dlq_alert",
    }
    assert set(snap.windows) == {"1s", "10s", "60s"}
    assert snap.generated_at == clock.now
    for key in ("placed", "decided", "dlq", "p50_ms", "p99_ms"):
        assert len(doc["series"][key]) == SERIES_SECONDS
    assert snap.series.p50_ms[-2] is not None and snap.series.p50_ms[-3] is None
    # an empty instance is JSON-able too
    empty, _c, _f = make()
    json.loads(msgspec.json.encode(empty.snapshot()))


LATENCY_KEYS = ["count", "p50", "p90", "p99", "max"]
WINDOW_KEYS = [
    "seconds",
    "placed",
    "placed_per_s",
    "malformed",
    "decided",
    "decided_per_s",
    "reserved",
    "rejected",
    "rejected_total",
    "cancelled",
    "dlq",
    "dlq_per_s",
    "dlq_by_reason",
    "revenue",
    "latency_ms",
]
TOTALS_KEYS = [
    "orders_records",
    "placed",
    "malformed",
    "reserved",
    "rejected",
    "rejected_total",
    "decided",
    "in_flight",
    "cancelled",
    "cancel_rejected",
    "dlq",
    "dlq_by_reason",
    "revenue",
    "duplicate_orders",
    "duplicate_outcomes",
    "undecodable_events",
    "records",
]


def test_snapshot_json_keeps_the_shape_the_dashboard_reads() -> None:
    """The keys, in order, that app.js, ``ordermesh top`` and ``/metrics`` read."""
    an, clock, feed = make()
    bad = feed.record(ORDERS, b"nope", T0 - 2, key=b"o-bad")
    dl = dead_letter(
        bad,
        dlq_topic=DLQ,
        service="inventory",
        stage="decode",
        error_class="DecodeError.json",
        message="not json",
    )
    an.handle(
        [
            feed.order("o1", T0 - 3),
            feed.order("o2", T0 - 3),
            feed.event(reserved("o1", T0 - 2.9)),
            feed.event(rejected("o2", T0 - 2.9)),
            feed.record(DLQ, dl.value, T0 - 2, key=dl.key, headers=dl.headers),
        ]
    )
    clock.now += 1
    doc = json.loads(msgspec.json.encode(an.snapshot()))
    assert list(doc) == [
        "generated_at",
        "window_end",
        "windows",
        "totals",
        "top_skus",
        "series",
        "dlq_recent",
        "lifecycle",
        "dlq_alert",
    ]
    assert list(doc["windows"]) == ["1s", "10s", "60s"]
    for window in doc["windows"].values():
        assert list(window) == WINDOW_KEYS
        assert list(window["latency_ms"]) == LATENCY_KEYS
        assert list(window["rejected"]) == list(REJECT_REASONS)
    assert list(doc["totals"]) == TOTALS_KEYS
    assert list(doc["totals"]["records"]) == ["orders", "events", "dlq"]
    assert list(doc["totals"]["rejected"]) == list(REJECT_REASONS)
    assert doc["totals"]["revenue"] == {"USD": 10.5}
    assert doc["totals"]["dlq_by_reason"] == {"DecodeError.json": 1}
    assert list(doc["top_skus"]) == ["last_60s", "all_time"]
    assert doc["top_skus"]["all_time"] == [{"sku": "SKU-00001", "quantity": 2}]
    assert list(doc["series"]) == [
        "start",
        "step_s",
        "placed",
        "decided",
        "dlq",
        "p50_ms",
        "p99_ms",
    ]
    (entry,) = doc["dlq_recent"]
    assert list(entry) == [
        "at",
        "reason",
        "source",
        "order_id",
        "service",
        "stage",
        "message",
        "dlq",
    ]
    assert entry["order_id"] == "o-bad" and entry["reason"] == "DecodeError.json"
    # a window with no decisions keeps every latency key, as null
    assert doc["windows"]["1s"]["latency_ms"] == dict.fromkeys(LATENCY_KEYS, None) | {"count": 0}


# --- the order's life -------------------------------------------------------------------

AUTH = "auth-1"


class Life:
    """Builds one order's events, as the saga emits them, at increasing times."""

    def __init__(self, feed: Feed, order_id: str, created: float, total: float = 10.5) -> None:
        self.feed = feed
        self.order_id = order_id
        self.created = created
        self.total = total
        self.records: list[InRecord] = [feed.order(order_id, created)]

    def add(self, event: Any) -> Life:
        self.records.append(self.feed.event(event))
        return self

    def reserve(self, at: float, currency: str = "USD") -> Life:
        return self.add(
            OrderReserved(
                order_id=self.order_id,
                items=(ItemQty("SKU-00001", 2),),
                total=self.total,
                currency=currency,
                order_created_at=self.created,
                at=at,
                expires_at=at + 900,
            )
        )

    def reject(self, at: float, reason: Any = "OUT_OF_STOCK") -> Life:
        return self.add(rejected(self.order_id, at, reason, latency=at - self.created))

    def release(self, at: float, cause: Any) -> Life:
        items = (ItemQty("SKU-00001", 2),)
        return self.add(StockReleased(order_id=self.order_id, items=items, at=at, cause=cause))

    def authorize(self, at: float, currency: str = "USD") -> Life:
        return self.add(
            PaymentAuthorized(
                order_id=self.order_id,
                authorization_id=AUTH,
                amount=self.total,
                currency=currency,
                at=at,
            )
        )

    def decline(self, at: float, reason: str = "card_declined") -> Life:
        self.add(PaymentDeclined(order_id=self.order_id, reason=reason, detail="", at=at))
        self.add(OrderPaymentFailed(order_id=self.order_id, reason=reason, detail="", at=at))
        return self.release(at, "PAYMENT_FAILED")

    def pay(self, at: float) -> Life:
        return self.add(
            OrderPaid(order_id=self.order_id, authorization_id=AUTH, amount=self.total, at=at)
        )

    def ship(self, at: float) -> Life:
        self.add(ShipmentReady(order_id=self.order_id, shipment_id="sh-1", at=at))
        return self.add(OrderShipped(order_id=self.order_id, shipment_id="sh-1", at=at))

    def capture(self, at: float) -> Life:
        return self.add(
            PaymentCaptured(order_id=self.order_id, authorization_id=AUTH, amount=self.total, at=at)
        )

    def expire(self, at: float) -> Life:
        self.add(ReservationExpired(order_id=self.order_id, expires_at=at, at=at))
        return self.release(at, "EXPIRED")

    def cancel(self, at: float, stage: str) -> Life:
        self.add(OrderCancelled(order_id=self.order_id, at=at, stage=stage))
        return self.release(at, "CANCELLED")

    def void(self, at: float, cause: Any) -> Life:
        return self.add(
            PaymentVoided(
                order_id=self.order_id,
                authorization_id=AUTH,
                amount=self.total,
                cause=cause,
                at=at,
            )
        )

    def refund(self, at: float, cause: Any) -> Life:
        return self.add(
            PaymentRefunded(
                order_id=self.order_id,
                authorization_id=AUTH,
                amount=self.total,
                cause=cause,
                at=at,
            )
        )

    def cancel_rejected(self, at: float, reason: Any) -> Life:
        return self.add(CancelRejected(order_id=self.order_id, reason=reason, detail="", at=at))


def every_branch(feed: Feed, t: float, prefix: str = "") -> list[Life]:
    """One order down every branch of lifecycle.py, each step 0.1 s after the last;
    order ids start with ``prefix``."""
    return [
        # shipped, then a cancel that comes too late
        Life(feed, prefix + "ship-1", t)
        .reserve(t + 0.1)
        .authorize(t + 0.2)
        .pay(t + 0.3)
        .ship(t + 1.3)
        .capture(t + 1.4)
        .cancel_rejected(t + 1.5, "ALREADY_SHIPPED"),
        Life(feed, prefix + "ship-2", t, total=20.0)
        .reserve(t + 0.1)
        .authorize(t + 0.4)
        .pay(t + 0.5)
        .ship(t + 2.5)
        .capture(t + 2.6),
        Life(feed, prefix + "oos", t)
        .reject(t + 0.1, "OUT_OF_STOCK")
        .cancel_rejected(t + 0.2, "ORDER_REJECTED"),
        Life(feed, prefix + "unknown", t).reject(t + 0.1, "UNKNOWN_SKU"),
        Life(feed, prefix + "declined", t).reserve(t + 0.1).decline(t + 0.2, "card_declined"),
        Life(feed, prefix + "poor", t)
        .reserve(t + 0.1)
        .decline(t + 0.2, "insufficient_funds")
        .cancel_rejected(t + 0.3, "ALREADY_ENDED"),
        # the sweep expires it: payments never started
        Life(feed, prefix + "expired", t).reserve(t + 0.1).expire(t + 0.2),
        # late success: authorized after the deadline, voided, the order stays EXPIRED
        Life(feed, prefix + "late", t)
        .reserve(t + 0.1)
        .expire(t + 0.2)
        .authorize(t + 0.3)
        .void(t + 0.4, "EXPIRED"),
        Life(feed, prefix + "cancel-r", t).reserve(t + 0.1).cancel(t + 0.2, "RESERVED"),
        Life(feed, prefix + "cancel-p", t)
        .reserve(t + 0.1)
        .authorize(t + 0.2)
        .pay(t + 0.3)
        .cancel(t + 0.4, "PAID")
        .void(t + 0.5, "CANCELLED"),
        # a captured amount given back
        Life(feed, prefix + "refund", t)
        .reserve(t + 0.1)
        .authorize(t + 0.2)
        .pay(t + 0.3)
        .cancel(t + 0.4, "PAID")
        .capture(t + 0.5)
        .refund(t + 0.6, "CANCELLED"),
        # still on its way: reserved, authorization pending; and one not decided yet
        Life(feed, prefix + "waiting", t).reserve(t + 0.1),
        Life(feed, prefix + "placed", t),
    ]


def records_of(lives: list[Life]) -> list[InRecord]:
    return [rec for life in lives for rec in life.records]


def test_funnel_ends_rates_money_and_statuses_over_every_branch() -> None:
    an, clock, feed = make(T0 + 0.5)
    t = T0 - 5
    an.handle(records_of(every_branch(feed, t)))
    snap = an.snapshot()
    life = snap.lifecycle
    every = life.all
    assert every.seconds is None
    assert every.funnel == {"PLACED": 13, "RESERVED": 10, "PAID": 4, "SHIPPED": 2}
    assert list(every.funnel) == list(lifecycle.FUNNEL)
    assert every.conversion == {
        "RESERVED": round(10 / 13, 4),
        "PAID": round(4 / 10, 4),
        "SHIPPED": round(2 / 4, 4),
    }
    ends = every.ends
    assert list(ends) == ["REJECTED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED"]
    assert ends["REJECTED"] == End(2, {"OUT_OF_STOCK": 1, "UNKNOWN_SKU": 1, "INVALID_ORDER": 0})
    assert ends["PAYMENT_FAILED"] == End(2, {"card_declined": 1, "insufficient_funds": 1})
    assert ends["EXPIRED"] == End(2, {})
    assert ends["CANCELLED"] == End(3, {"RESERVED": 1, "PAID": 2})
    # authorizations: ship-1, ship-2, late, cancel-p, refund; declines: declined, poor
    assert (every.authorizations, every.declines) == (5, 2)
    assert every.decline_rate == round(2 / 7, 4)
    assert every.expiry_rate == round(2 / 10, 4)
    money = every.money
    assert money.authorized == {"USD": 10.5 * 4 + 20.0}
    assert money.captured == {"USD": 10.5 + 20.0 + 10.5}
    assert money.voided == {"USD": 21.0}  # late + cancel-p
    assert money.refunded == {"USD": 10.5}
    assert money.net_captured == {"USD": 30.5}  # the shipped orders' value
    # time to pay: created -> OrderPaid of ship-1, ship-2, cancel-p, refund
    pay = every.time_to_pay_ms
    assert pay.count == 4
    assert pay.max == pytest.approx(500.0, abs=1e-3)
    assert pay.p50 == pytest.approx(300.0, rel=LATENCY_ALPHA)
    ship = every.time_to_ship_ms
    assert ship.count == 2
    assert ship.p50 == pytest.approx(1300.0, rel=LATENCY_ALPHA)
    assert ship.p99 == pytest.approx(2500.0, rel=LATENCY_ALPHA)
    assert ship.max == pytest.approx(2500.0, abs=1e-3)
    # every order where lifecycle.timeline puts it
    assert life.by_status == {
        "PLACED": 1,
        "RESERVED": 1,
        "PAID": 0,
        "SHIPPED": 2,
        "REJECTED": 2,
        "PAYMENT_FAILED": 2,
        "EXPIRED": 2,
        "CANCELLED": 3,
    }
    assert list(life.by_status) == list(lifecycle.STATUSES)
    # the same events all within the last 10 s: the 10 s and 60 s windows equal all time,
    # the 1 s window holds only what happened in its second
    assert life.windows["10s"] == msgspec.structs.replace(every, seconds=10)
    assert life.windows["60s"] == msgspec.structs.replace(every, seconds=60)
    one = life.windows["1s"]  # second T0-1: nothing happened in it
    assert one.funnel == dict.fromkeys(lifecycle.FUNNEL, 0)
    assert one.conversion == dict.fromkeys(lifecycle.FUNNEL[1:], None)
    assert one.decline_rate is None and one.time_to_ship_ms.p50 is None
    # the older counts keep working alongside
    assert snap.totals.cancelled == 3 and snap.totals.cancel_rejected == 3
    assert snap.totals.duplicate_outcomes == 0
    clock.now += 120
    later = an.snapshot().lifecycle
    assert later.all == every
    assert later.windows["60s"].funnel == dict.fromkeys(lifecycle.FUNNEL, 0)


def test_windows_count_each_step_in_the_second_it_happened() -> None:
    an, _clock, feed = make(T0 + 0.5)
    t = T0 - 30
    # placed and reserved 30 s ago, paid 5 s ago, shipped in the last complete second
    life = Life(feed, "o1", t).reserve(t + 0.1).authorize(T0 - 5).pay(T0 - 5).ship(T0 - 0.5)
    an.handle(life.records)
    windows = an.snapshot().lifecycle.windows
    assert windows["1s"].funnel == {"PLACED": 0, "RESERVED": 0, "PAID": 0, "SHIPPED": 1}
    assert windows["1s"].conversion["SHIPPED"] is None  # nothing paid in that second
    assert windows["10s"].funnel == {"PLACED": 0, "RESERVED": 0, "PAID": 1, "SHIPPED": 1}
    assert windows["10s"].conversion["SHIPPED"] == 1.0
    assert windows["60s"].funnel == {"PLACED": 1, "RESERVED": 1, "PAID": 1, "SHIPPED": 1}
    assert windows["1s"].time_to_ship_ms.max == pytest.approx(29_500.0, abs=1e-3)
    assert windows["10s"].time_to_pay_ms.max == pytest.approx(25_000.0, abs=1e-3)
    assert windows["1s"].time_to_pay_ms.count == 0


def test_redelivered_life_events_count_once() -> None:
    an, _clock, feed = make()
    t = T0 - 5
    life = Life(feed, "o1", t).reserve(t + 0.1).authorize(t + 0.2).pay(t + 0.3).ship(t + 1)
    life.capture(t + 1.1)
    an.handle(life.records)
    first = an.snapshot().lifecycle
    # at-least-once: every event again, at new offsets (as after a producer retry)
    again = [feed.record(EVENTS, r.value, r.timestamp_ms / 1000) for r in life.records[1:]]
    an.handle(again)
    snap = an.snapshot()
    assert snap.lifecycle == first
    assert snap.totals.duplicate_outcomes == len(again) - 1  # ShipmentReady is not counted
    assert first.all.money.captured == {"USD": 10.5}
    assert first.by_status["SHIPPED"] == 1


def test_money_in_the_currency_of_its_order() -> None:
    an, _clock, feed = make()
    t = T0 - 5
    eur = Life(feed, "eur", t, total=7.25).reserve(t + 0.1, "EUR").authorize(t + 0.2, "EUR")
    eur.pay(t + 0.3).ship(t + 1).capture(t + 1.1)
    usd = Life(feed, "usd", t).reserve(t + 0.1).authorize(t + 0.2).pay(t + 0.3)
    usd.ship(t + 1).capture(t + 1.1)
    # a capture of an order analytics never saw reserved or authorized
    stray = PaymentCaptured(order_id="stray", authorization_id=AUTH, amount=1.0, at=t)
    an.handle(eur.records + usd.records + [feed.event(stray)])
    money = an.snapshot().lifecycle.all.money
    assert money.authorized == {"EUR": 7.25, "USD": 10.5}
    assert money.captured == {"EUR": 7.25, "USD": 10.5, "XXX": 1.0}
    # sums are exact in cents: 0.1 + 0.2 is 0.3 here
    an2, _c, feed2 = make()
    dimes = [Life(feed2, f"d{i}", t, total=0.1).reserve(t).authorize(t) for i in range(3)]
    an2.handle(records_of(dimes))
    assert an2.snapshot().lifecycle.all.money.authorized == {"USD": 0.3}


def test_decline_reasons_are_bounded() -> None:
    an, _clock, feed = make()
    t = T0 - 5
    lives = [
        Life(feed, f"o{i}", t).reserve(t).decline(t + 0.1, f"reason-{i:02d}")
        for i in range(MAX_DECLINE_REASONS + 5)
    ]
    an.handle(records_of(lives))
    failed = an.snapshot().lifecycle.all.ends["PAYMENT_FAILED"]
    assert failed.total == MAX_DECLINE_REASONS + 5
    assert len(failed.causes) == MAX_DECLINE_REASONS + 1
    assert failed.causes[OTHER_REASON] == 5


def test_dlq_alert_fires_above_its_share_of_orders_not_on_any_entry() -> None:
    def alert_for(orders: int, malformed: int, threshold: float) -> Any:
        clock = Clock(T0 + 0.5)
        an = Analytics(
            orders_topic=ORDERS,
            events_topic=EVENTS,
            dlq_topic=DLQ,
            clock=clock,
            dlq_alert_ratio=threshold,
        )
        feed = Feed()
        batch = [feed.order(f"o{i}", T0 - 2) for i in range(orders)]
        for _ in range(malformed):
            bad = feed.malformed(T0 - 2)
            dl = dead_letter(
                bad,
                dlq_topic=DLQ,
                service="inventory",
                stage="decode",
                error_class="DecodeError.json",
                message="not json",
            )
            batch += [bad, feed.record(DLQ, dl.value, T0 - 2, key=dl.key, headers=dl.headers)]
        an.handle(batch)
        return an.snapshot().dlq_alert

    # 1 % malformed, as `ordermesh up` sends: no alert at the default threshold
    quiet = alert_for(99, 1, DEFAULT_DLQ_ALERT_RATIO)
    assert (quiet.dlq, quiet.orders_records, quiet.ratio) == (1, 100, 0.01)
    assert not quiet.firing and quiet.threshold == DEFAULT_DLQ_ALERT_RATIO
    assert quiet.window_s == 60
    loud = alert_for(90, 10, DEFAULT_DLQ_ALERT_RATIO)
    assert loud.ratio == 0.1 and loud.firing
    assert alert_for(99, 1, 0.0).firing  # threshold 0: any dead letter, as before
    assert not alert_for(50, 0, 0.0).firing
    # dead letters while no order came in (a replay, bad commands): an incident
    assert alert_for(0, 0, 0.5).firing is False
    clock = Clock(T0 + 0.5)
    an = Analytics(orders_topic=ORDERS, events_topic=EVENTS, dlq_topic=DLQ, clock=clock)
    feed = Feed()
    an.handle([feed.record(DLQ, b"x", T0 - 2)])
    alone = an.snapshot().dlq_alert
    assert alone.ratio is None and alone.firing


# every declared path of an order, as the saga may emit it (facts left out)
PATHS = [
    ["OrderRejected"],
    ["OrderReserved"],
    ["OrderReserved", "OrderPaid"],
    ["OrderReserved", "OrderPaid", "OrderShipped"],
    ["OrderReserved", "OrderPaid", "OrderCancelled"],
    ["OrderReserved", "OrderPaymentFailed"],
    ["OrderReserved", "ReservationExpired"],
    ["OrderReserved", "OrderCancelled"],
    # races the inventory loses gracefully: a late event after the end changes nothing
    ["OrderReserved", "ReservationExpired", "OrderPaid"],
    ["OrderReserved", "OrderPaid", "OrderShipped", "OrderCancelled"],
    [],
]


def _status_event(name: str, order_id: str, at: float, created: float) -> Any:
    if name == "OrderReserved":
        return reserved(order_id, at, latency=at - created)
    if name == "OrderRejected":
        return rejected(order_id, at, latency=at - created)
    if name == "OrderPaid":
        return OrderPaid(order_id=order_id, authorization_id=AUTH, amount=10.5, at=at)
    if name == "OrderShipped":
        return OrderShipped(order_id=order_id, shipment_id="s", at=at)
    if name == "OrderCancelled":
        return OrderCancelled(order_id=order_id, at=at, stage="RESERVED")
    if name == "OrderPaymentFailed":
        return OrderPaymentFailed(order_id=order_id, reason="r", detail="", at=at)
    assert name == "ReservationExpired"
    return ReservationExpired(order_id=order_id, expires_at=at, at=at)


def _walk(path: list[str]) -> list[str]:
    """The statuses an order passes through, by lifecycle.applies (the reference)."""
    status: lifecycle.Status = "PLACED"
    visited: list[str] = [status]
    for event in path:
        if lifecycle.applies(status, event):
            status = lifecycle.TARGET[event]
            visited.append(status)
    return visited


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(PATHS))), st.booleans()), max_size=40))
def test_by_status_funnel_and_ends_agree_with_lifecycle(picks: list[tuple[int, bool]]) -> None:
    an, _clock, feed = make()
    t = T0 - 20
    expected: dict[str, int] = dict.fromkeys(lifecycle.STATUSES, 0)
    reached: dict[str, int] = dict.fromkeys(lifecycle.STATUSES, 0)
    stale = 0
    records: list[InRecord] = []
    for n, (pick, order_first) in enumerate(picks):
        order_id = f"o{n}"
        path = PATHS[pick]
        order = feed.order(order_id, t)
        events = [
            feed.event(_status_event(name, order_id, t + 0.1 * (i + 1), t), partition=n % 3)
            for i, name in enumerate(path)
        ]
        # orders and events are separate topics: either may be read first
        records += [order, *events] if order_first else [*events, order]
        final, _undeclared = lifecycle.timeline(path)
        expected[final] += 1
        visited = _walk(path)
        assert visited[-1] == final
        for status in visited:
            reached[status] += 1
        stale += len(path) - (len(visited) - 1)
    an.handle(records)
    life = an.snapshot().lifecycle
    assert life.by_status == expected
    assert life.all.funnel == {s: reached[s] for s in lifecycle.FUNNEL}
    assert {s: e.total for s, e in life.all.ends.items()} == {s: reached[s] for s in FAILURE_ENDS}
    assert life.stale_events == stale


def test_summary_is_one_line_of_the_funnel_and_ends() -> None:
    an, _clock, feed = make()
    an.handle(records_of(every_branch(feed, T0 - 5)))
    line = an.summary()
    assert "\n" not in line
    assert line.startswith("placed 13 reserved 10 paid 4 shipped 2; rejected 2")
    assert "payment_failed 2 expired 2 cancelled 3" in line


def test_lifecycle_view_equals_the_snapshot_part() -> None:
    an, _clock, feed = make()
    an.handle(records_of(every_branch(feed, T0 - 5)))
    snap = an.snapshot()
    view = an.lifecycle()
    assert view.lifecycle == snap.lifecycle and view.dlq_alert == snap.dlq_alert
    assert view.window_end == snap.window_end
    doc = json.loads(msgspec.json.encode(view))
    assert list(doc) == ["generated_at", "window_end", "lifecycle", "dlq_alert"]
    assert list(doc["lifecycle"]) == ["windows", "all", "by_status", "stale_events"]
    assert list(doc["lifecycle"]["all"]) == [
        "seconds",
        "funnel",
        "conversion",
        "ends",
        "authorizations",
        "declines",
        "decline_rate",
        "expiry_rate",
        "time_to_pay_ms",
        "time_to_ship_ms",
        "money",
    ]
    assert list(doc["lifecycle"]["all"]["money"]) == [
        "authorized",
        "captured",
        "voided",
        "refunded",
        "net_captured",
    ]
    assert list(doc["dlq_alert"]) == [
        "window_s",
        "threshold",
        "dlq",
        "orders_records",
        "ratio",
        "firing",
    ]
