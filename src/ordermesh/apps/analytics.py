"""The analytics process: a runner feeding ``Analytics`` plus its dashboard and metrics.

One process, two threads:

- the **main thread** runs the ``BatchRunner`` loop, exactly like every other service: it
  owns the consumer, the signal handlers (SIGTERM/SIGINT stop it cleanly) and the final
  close. Handling is CPU-bound Python, so it gets the thread that signals land in;
- a **background thread** runs uvicorn (Starlette) on a socket bound by the main thread
  before anything starts, so a port already in use fails at once with a clear error.
  uvicorn installs no signal handlers off the main thread; it is stopped by
  ``should_exit`` after the runner has closed. The HTTP side is light (a dashboard makes
  two requests a second), and sync endpoints run in Starlette's thread pool.

``Analytics`` is not thread-safe: the handler and every reader (``/snapshot``,
``/lifecycle``, ``/metrics``) take one lock, held for a batch or for one snapshot
(milliseconds). The handler logs a one-line summary of the funnel every
``SUMMARY_EVERY_S``, never a line per record.

Offsets: totals are rebuilt from the durable topics on every start, never from committed
offsets. The process reads *every* partition of ``orders``, ``order-events`` and
``orders-dlq`` from the beginning by manual assignment (its ``ServiceSpec`` says
``per_partition_assignment``, so the runner uses ``kafka.assignment.EveryPartition``)
instead of joining the ``analytics`` group, because:

- analytics is an aggregate view: as a group member, a second instance would get half
  the partitions and both would show half the totals. Read-everything instances each
  show the whole picture, so running two is as correct as running one;
- a restarted instance (after kill -9) starts at once: a KIP-848 group keeps a dead
  member's partitions until its session times out (45 s), which left the dashboard
  empty that long after a crash;
- nothing is ever revoked, so there is no rebalance to get wrong.

The runner still commits what it handled under group ``analytics`` (a non-member
commit, accepted while the group has no members), which only makes how far analytics
is behind visible in ``/groups``; it is never read back.

Consumer groups (``/groups``): every consumer group of ``topology``, described by
``kafka.groups.GroupsMonitor`` in a thread of its own; requests read the cached result.

Endpoints (JSON is ``services.analytics``' Structs, keys in field order):

- ``/snapshot``: ``generated_at``, ``window_end``, ``windows`` ("1s", "10s", "60s":
  placed, decided, reserved, rejected by reason, cancelled, dlq, revenue, latency),
  ``totals``, ``top_skus``, ``series`` (300 s per second), ``dlq_recent``, then
  ``lifecycle`` and ``dlq_alert`` (below);
- ``/lifecycle``: ``generated_at``, ``window_end``, ``lifecycle`` and ``dlq_alert``
  alone. ``lifecycle.windows`` ("1s", "10s", "60s") and ``lifecycle.all`` (since the
  topics' beginning, ``seconds`` null) each hold ``funnel`` (PLACED, RESERVED, PAID,
  SHIPPED: orders that reached the step), ``conversion`` (each step's share of the one
  before, null over 0), ``ends`` (REJECTED, PAYMENT_FAILED, EXPIRED, CANCELLED: ``total``
  and ``causes`` by reject reason, decline reason, none, and cancelled-from stage),
  ``authorizations``, ``declines``, ``decline_rate``, ``expiry_rate`` (shares, 0..1),
  ``time_to_pay_ms`` and ``time_to_ship_ms`` (count, p50, p90, p99, max from the order's
  creation), ``money`` (authorized, captured, voided, refunded, net_captured: currency ->
  amount, summed in cents); ``lifecycle.by_status`` counts the orders in each status now,
  ``lifecycle.stale_events`` the status events that did not apply to their order.
  ``dlq_alert``: ``window_s`` (60), ``threshold`` (``--dlq-alert-ratio``,
  ``ORDERMESH_ANALYTICS_DLQ_ALERT_RATIO``), ``dlq``, ``orders_records``, ``ratio`` (dlq
  over orders records, null over 0) and ``firing``;
- ``/groups``, ``/metrics`` (Prometheus: the runner's and ``ordermesh_analytics_*``,
  the funnel, ends, money and ``ordermesh_analytics_dlq_alert`` included), ``/healthz``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

import msgspec
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ordermesh.apps.base import service_runner
from ordermesh.config import Settings
from ordermesh.errors import ConfigError
from ordermesh.kafka.groups import GroupsMonitor
from ordermesh.kafka.runner import BatchRunner, RunnerStats
from ordermesh.records import InRecord, OutRecord
from ordermesh.services.analytics import MONEY_KINDS, Analytics, LifecycleView, Snapshot
from ordermesh.topics import DLQ, EVENTS, ORDERS
from ordermesh.topology import SERVICES, ServiceSpec, group_topics, service

log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8090
SPEC: Final[ServiceSpec] = service("analytics")
_JSON_HEADERS: Final = {"cache-control": "no-store"}
# how often the handler logs the funnel (a summary: a line per event would be thousands)
SUMMARY_EVERY_S: Final = 60.0


class AnalyticsState:
    """``Analytics`` behind a lock: the runner's handler and the HTTP readers share it."""

    def __init__(self, settings: Settings) -> None:
        self.analytics = Analytics(
            orders_topic=settings.topic(ORDERS),
            events_topic=settings.topic(EVENTS),
            dlq_topic=settings.topic(DLQ),
            dlq_alert_ratio=settings.analytics_dlq_alert_ratio,
        )
        self.lock = threading.Lock()
        self._next_summary = time.monotonic() + SUMMARY_EVERY_S

    def handle(self, batch: list[InRecord]) -> list[OutRecord]:
        with self.lock:
            out = self.analytics.handle(batch)
            now = time.monotonic()
            if now >= self._next_summary:
                self._next_summary = now + SUMMARY_EVERY_S
                log.info("analytics: %s", self.analytics.summary())
            return out

    def snapshot(self) -> Snapshot:
        with self.lock:
            return self.analytics.snapshot()

    def lifecycle(self) -> LifecycleView:
        with self.lock:
            return self.analytics.lifecycle()

    def positions(self) -> dict[tuple[str, int], int]:
        with self.lock:
            return self.analytics.positions()


def analytics_runner(settings: Settings, state: AnalyticsState) -> BatchRunner:
    """A ``BatchRunner`` feeding ``state`` from every partition of the three topics,
    each resumed at the position ``state`` has reached."""
    return service_runner(settings, SPEC, state, positions=state.positions)


def groups_monitor(settings: Settings) -> GroupsMonitor:
    """The monitor of every consumer group of the topology (``/groups``)."""
    readers = [s.group for s in SERVICES if s.group is not None and s.per_partition_assignment]
    return GroupsMonitor(settings, group_topics(), readers)


# --- Prometheus ---------------------------------------------------------------------------


class AnalyticsCollector(Collector):
    """Analytics totals, window rates and latency quantiles, read at scrape time."""

    def __init__(self, state: AnalyticsState) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        return []  # unchecked registration: the families are built at scrape time

    def collect(self) -> Iterator[Metric]:
        snap = msgspec.to_builtins(self.state.snapshot())
        t = snap["totals"]
        for name, value, doc in (
            ("orders_placed", t["placed"], "Valid orders placed (distinct order ids)."),
            ("orders_malformed", t["malformed"], "Records of orders that failed validation."),
            ("orders_reserved", t["reserved"], "Orders whose stock was reserved."),
            ("orders_cancelled", t["cancelled"], "Orders cancelled."),
            ("duplicate_outcomes", t["duplicate_outcomes"], "Repeated outcome copies ignored."),
        ):
            counter = CounterMetricFamily(f"ordermesh_analytics_{name}", doc)
            counter.add_metric([], value)
            yield counter
        rejected = CounterMetricFamily(
            "ordermesh_analytics_orders_rejected", "Orders rejected, by reason.", labels=["reason"]
        )
        for reason, n in t["rejected"].items():
            rejected.add_metric([reason], n)
        yield rejected
        dlq = CounterMetricFamily(
            "ordermesh_analytics_dlq", "Dead-lettered records, by error class.", labels=["reason"]
        )
        for reason, n in t["dlq_by_reason"].items():
            dlq.add_metric([reason], n)
        yield dlq
        revenue = CounterMetricFamily(
            "ordermesh_analytics_revenue",
            "Sum of reserved order totals, by currency (gross of cancellations).",
            labels=["currency"],
        )
        for currency, amount in t["revenue"].items():
            revenue.add_metric([currency], amount)
        yield revenue
        in_flight = GaugeMetricFamily(
            "ordermesh_analytics_orders_in_flight", "Valid orders placed but not decided yet."
        )
        in_flight.add_metric([], t["in_flight"])
        yield in_flight
        yield from self._windows(snap["windows"])
        yield from self._lifecycle(snap["lifecycle"], snap["dlq_alert"])

    def _lifecycle(self, life: dict[str, Any], alert: dict[str, Any]) -> Iterator[Metric]:
        every = life["all"]
        funnel = CounterMetricFamily(
            "ordermesh_analytics_funnel_orders",
            "Orders that reached each step of the funnel.",
            labels=["status"],
        )
        for status, n in every["funnel"].items():
            funnel.add_metric([status], n)
        ends = CounterMetricFamily(
            "ordermesh_analytics_order_ends",
            "Orders that ended off the funnel, by status and cause.",
            labels=["status", "cause"],
        )
        for status, end in every["ends"].items():
            for cause, n in end["causes"].items():
                ends.add_metric([status, cause], n)
            if not end["causes"]:
                ends.add_metric([status, ""], end["total"])
        by_status = GaugeMetricFamily(
            "ordermesh_analytics_orders_by_status", "Orders now in each status.", labels=["status"]
        )
        for status, n in life["by_status"].items():
            by_status.add_metric([status], n)
        money = CounterMetricFamily(
            "ordermesh_analytics_money",
            "Payment facts summed, by kind and currency.",
            labels=["kind", "currency"],
        )
        for kind in MONEY_KINDS:
            for currency, amount in every["money"][kind].items():
                money.add_metric([kind, currency], amount)
        durations = GaugeMetricFamily(
            "ordermesh_analytics_order_time_seconds",
            "Order created -> paid / shipped, quantiles over a window.",
            labels=["step", "window", "quantile"],
        )
        for label, w in life["windows"].items():
            for step in ("pay", "ship"):
                lat = w[f"time_to_{step}_ms"]
                for q, key in (("0.5", "p50"), ("0.99", "p99")):
                    if lat[key] is not None:
                        durations.add_metric([step, label, q], lat[key] / 1000.0)
        firing = GaugeMetricFamily(
            "ordermesh_analytics_dlq_alert",
            "1 while the last 60 s's dead letters exceed their share of orders records.",
        )
        firing.add_metric([], 1 if alert["firing"] else 0)
        yield from (funnel, ends, by_status, money, durations, firing)

    def _windows(self, windows: dict[str, Any]) -> Iterator[Metric]:
        rate = GaugeMetricFamily(
            "ordermesh_analytics_rate_per_second",
            "Per-second rate over a rolling window of event time.",
            labels=["kind", "window"],
        )
        latency = GaugeMetricFamily(
            "ordermesh_analytics_latency_seconds",
            "End-to-end latency (order created -> decided) quantiles over a window.",
            labels=["window", "quantile"],
        )
        latency_max = GaugeMetricFamily(
            "ordermesh_analytics_latency_max_seconds",
            "Largest end-to-end latency over a window.",
            labels=["window"],
        )
        dlq = GaugeMetricFamily(
            "ordermesh_analytics_window_dlq",
            "Dead-lettered records over a window, by error class.",
            labels=["window", "reason"],
        )
        for label, w in windows.items():
            for kind in ("placed", "decided", "dlq"):
                rate.add_metric([kind, label], w[f"{kind}_per_s"])
            lat = w["latency_ms"]
            for q, key in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
                if lat[key] is not None:
                    latency.add_metric([label, q], lat[key] / 1000.0)
            if lat["max"] is not None:
                latency_max.add_metric([label], lat["max"] / 1000.0)
            for reason, n in w["dlq_by_reason"].items():
                dlq.add_metric([label, reason], n)
        yield from (rate, latency, latency_max, dlq)


# --- HTTP ---------------------------------------------------------------------------------


def _json(obj: Any) -> Response:
    return Response(msgspec.json.encode(obj), media_type="application/json", headers=_JSON_HEADERS)


def _dashboard_index() -> str:
    from importlib.resources import files

    return files("ordermesh").joinpath("dashboard", "index.html").read_text(encoding="utf-8")


def create_app(
    state: AnalyticsState, groups: GroupsMonitor | None, registry: CollectorRegistry
) -> Starlette:
    """``/`` dashboard, ``/snapshot``, ``/lifecycle``, ``/groups``, ``/metrics``,
    ``/static/*``."""
    index_html = _dashboard_index()

    def index(_request: Request) -> Response:
        return HTMLResponse(index_html, headers=_JSON_HEADERS)

    def snapshot(_request: Request) -> Response:
        return _json(state.snapshot())

    def lifecycle(_request: Request) -> Response:
        return _json(state.lifecycle())

    def groups_view(_request: Request) -> Response:
        empty: dict[str, Any] = {"generated_at": None, "groups": {}, "error": "not monitored"}
        return _json(groups.latest() if groups is not None else empty)

    def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def healthz(_request: Request) -> Response:
        return _json({"ok": True})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/snapshot", snapshot),
            Route("/lifecycle", lifecycle),
            Route("/groups", groups_view),
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(packages=[("ordermesh", "dashboard")]), name="static"),
        ]
    )


class HttpServer:
    """uvicorn in a background thread, on a socket bound up front."""

    def __init__(self, host: str, port: int) -> None:
        try:
            self._sock = socket.create_server((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
        self.port = int(self._sock.getsockname()[1])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, app: Starlette) -> None:
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="analytics-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(10)
        self._sock.close()


def run_analytics(
    settings: Settings,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    idle_exit_s: float | None = None,
    groups: bool = True,
) -> RunnerStats:
    """Run analytics and its dashboard until SIGTERM/SIGINT (or idle)."""
    server = HttpServer(host, port)  # bound first: a busy port fails before anything starts
    state = AnalyticsState(settings)
    runner = analytics_runner(settings, state)
    # signals before the threads start: a SIGTERM from then on ends in a clean close
    runner.install_signal_handlers()
    runner.metrics.registry.register(AnalyticsCollector(state))
    monitor = groups_monitor(settings) if groups else None
    try:
        server.start(create_app(state, monitor, runner.metrics.registry))
        if monitor is not None:
            monitor.start()
        log.info("analytics: dashboard on http://%s:%d/", host, server.port)
        return runner.run(idle_exit_s=idle_exit_s)
    finally:
        if monitor is not None:
            monitor.stop()
        server.stop()
        with state.lock:
            totals = state.analytics.totals
            log.info(
                "analytics: %d orders placed, %d malformed, %d reserved, %d rejected, %d dlq",
                totals.placed,
                totals.malformed,
                totals.reserved,
                sum(totals.rejected.values()),
                sum(totals.dlq.values()),
            )
            log.info("analytics: %s", state.analytics.summary())
