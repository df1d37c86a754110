"""The JSON of analytics' ``/snapshot`` and ``/lifecycle``: msgspec Structs, encoded by
``msgspec.json.encode`` (field order is the JSON key order).

Read by the dashboard (app.js), the live view of ``ordermesh up``/``top`` and
``/metrics``: renaming or reordering a field changes that JSON. ``services.analytics``
builds them; what each number means is said there.
"""

from __future__ import annotations

import msgspec


class Latency(msgspec.Struct, frozen=True):
    """A duration's distribution over a window, in milliseconds; None when empty."""

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


class End(msgspec.Struct, frozen=True):
    """Orders that ended in one failure status, and why."""

    total: int
    causes: dict[str, int]


class Money(msgspec.Struct, frozen=True):
    """Payment facts summed per currency (exact: added in integer cents)."""

    authorized: dict[str, float]
    captured: dict[str, float]
    voided: dict[str, float]
    refunded: dict[str, float]
    net_captured: dict[str, float]  # captured - refunded: what the business keeps


class LifeWindow(msgspec.Struct, frozen=True):
    """The order's life over a window (``seconds``; None: since the topics' beginning)."""

    seconds: int | None
    funnel: dict[str, int]  # FUNNEL status -> orders that reached it
    conversion: dict[str, float | None]  # each step after the first: its share of the previous
    ends: dict[str, End]  # FAILURE_ENDS status -> orders that ended there, by cause
    authorizations: int  # PaymentAuthorized
    declines: int  # PaymentDeclined
    decline_rate: float | None  # declines / (authorizations + declines)
    expiry_rate: float | None  # EXPIRED / reserved
    time_to_pay_ms: Latency  # order created -> OrderPaid
    time_to_ship_ms: Latency  # order created -> OrderShipped
    money: Money


class Lifecycle(msgspec.Struct, frozen=True):
    """The funnel, its failure ends, times and money, per window and since start."""

    windows: dict[str, LifeWindow]  # "1s", "10s", "60s"
    all: LifeWindow
    by_status: dict[str, int]  # every status -> orders in it now
    stale_events: int  # status events that did not apply to their order (counted nowhere)


class DlqAlert(msgspec.Struct, frozen=True):
    """Dead letters over ``window_s`` as a share of that window's ``orders`` records;
    ``firing`` when above ``threshold`` (or dead letters with no order records at all)."""

    window_s: int
    threshold: float
    dlq: int
    orders_records: int
    ratio: float | None
    firing: bool


class LifecycleView(msgspec.Struct, frozen=True):
    """The JSON of ``/lifecycle``: the order's life and the DLQ alert alone."""

    generated_at: float
    window_end: int
    lifecycle: Lifecycle
    dlq_alert: DlqAlert


class Snapshot(msgspec.Struct, frozen=True):
    """Everything the dashboard shows, as of ``generated_at``."""

    generated_at: float
    window_end: int
    windows: dict[str, Window]  # "1s", "10s", "60s"
    totals: Totals
    top_skus: TopSkus
    series: Series
    dlq_recent: list[RecentDlq]  # newest first
    lifecycle: Lifecycle
    dlq_alert: DlqAlert
