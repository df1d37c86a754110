"""Analytics core: windows over event time, dedupe, percentiles, top SKUs, snapshot."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ordermesh import schema
from ordermesh.records import InRecord, dead_letter
from ordermesh.schema import (
    CancelRejected,
    ItemQty,
    OrderCancelled,
    OrderItem,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    StockReleased,
)
from ordermesh.services.analytics import (
    LATENCY_ALPHA,
    RECENT_DLQ,
    REJECT_REASONS,
    RING_SECONDS,
    SERIES_SECONDS,
    Analytics,
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
