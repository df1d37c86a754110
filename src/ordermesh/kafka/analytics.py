"""The analytics process: a consumer loop feeding ``Analytics`` plus its HTTP server.

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
``/metrics``) take one lock, held for a batch or for one snapshot (milliseconds).

Offsets: totals are rebuilt from the durable topics on every start, never from committed
offsets. The process reads *every* partition of ``orders``, ``order-events`` and
``orders-dlq`` from the beginning by manual assignment (``EveryPartition``) instead of
joining the ``analytics`` group, because:

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

Consumer groups (``/groups``): described with the AdminClient and their lag computed with
``group_lag`` every ``GROUPS_REFRESH_S`` in a thread of their own; requests read the
cached result. A group that does not exist (``DEAD``) gets no lag: its "lag" would be
the whole topic.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, cast

import msgspec
import uvicorn
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ordermesh.config import Settings
from ordermesh.errors import ConfigError
from ordermesh.kafka.client import make_admin
from ordermesh.kafka.lag import group_lag
from ordermesh.kafka.runner import BatchRunner, RunnerStats
from ordermesh.records import InRecord, OutRecord
from ordermesh.services.analytics import Analytics
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS

log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8090
GROUPS_REFRESH_S: Final = 2.0
PARTITIONS_REFRESH_S: Final = 10.0
ANALYTICS_GROUP: Final = "analytics"
# the consumer groups the dashboard shows, with the topics each consumes
GROUP_TOPICS: Final[dict[str, tuple[str, ...]]] = {
    "inventory": (ORDERS, COMMANDS),
    "tracker": (ORDERS, EVENTS),
    "analytics": (ORDERS, EVENTS, DLQ),
    "dlq-logger": (DLQ,),
}
_JSON_HEADERS: Final = {"cache-control": "no-store"}


class AnalyticsState:
    """``Analytics`` behind a lock: the runner's handler and the HTTP readers share it."""

    def __init__(self, settings: Settings) -> None:
        self.analytics = Analytics(
            orders_topic=settings.topic(ORDERS),
            events_topic=settings.topic(EVENTS),
            dlq_topic=settings.topic(DLQ),
        )
        self.lock = threading.Lock()

    def handle(self, batch: list[InRecord]) -> list[OutRecord]:
        with self.lock:
            return self.analytics.handle(batch)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return self.analytics.snapshot()

    def positions(self) -> dict[tuple[str, int], int]:
        with self.lock:
            return self.analytics.positions()


class EveryPartition:
    """A consumer that reads *every* partition of its topics, from the beginning.

    Stands in for the runner's consumer: ``subscribe`` assigns all partitions itself
    (manual assignment, no group membership) and reports them through ``on_assign``;
    partitions added later are picked up every ``PARTITIONS_REFRESH_S``. Everything
    else goes to the real consumer, whose group id is still used to commit (so the lag
    of ``analytics`` shows in ``/groups``).
    """

    def __init__(self, consumer: Consumer, positions: Callable[[], dict[tuple[str, int], int]]):
        self._consumer = consumer
        self._positions = positions
        self._topics: list[str] = []
        self._on_assign: Callable[[Any, list[TopicPartition]], None] | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._next_refresh = 0.0

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[TopicPartition]], None] | None = None,
        **_callbacks: Any,  # on_revoke / on_lost: nothing is ever taken away
    ) -> None:
        self._topics = list(topics)
        self._on_assign = on_assign
        self._refresh()

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if time.monotonic() >= self._next_refresh:
            self._refresh()
        return list(self._consumer.consume(num_messages=num_messages, timeout=timeout))

    def _refresh(self) -> None:
        self._next_refresh = time.monotonic() + PARTITIONS_REFRESH_S
        positions = self._positions()
        new: list[TopicPartition] = []
        for topic in self._topics:
            try:
                meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
            except KafkaException as exc:
                log.warning("analytics: no metadata for %s yet: %s", topic, exc)
                continue
            if meta is None or meta.error is not None:
                continue
            for partition in sorted(meta.partitions):
                if (topic, partition) in self._assigned:
                    continue
                start = positions.get((topic, partition), OFFSET_BEGINNING)
                new.append(TopicPartition(topic, partition, start))
        if not new:
            return
        self._consumer.incremental_assign(new)
        self._assigned |= {(tp.topic, tp.partition) for tp in new}
        if self._on_assign is not None:
            self._on_assign(self, new)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def analytics_runner(settings: Settings, state: AnalyticsState) -> BatchRunner:
    """A ``BatchRunner`` feeding ``state`` from every partition of the three topics."""
    runner = BatchRunner(
        settings,
        group=ANALYTICS_GROUP,
        topics=[settings.topic(ORDERS), settings.topic(EVENTS), settings.topic(DLQ)],
        handler=state,
        name="analytics",
    )
    # duck-typed: the runner only subscribes, consumes, commits, reads positions and
    # watermarks, and closes; the real consumer keeps the runner's commit callback
    runner.consumer = cast(Consumer, EveryPartition(runner.consumer, state.positions))
    return runner


# --- consumer groups ----------------------------------------------------------------------


def _logical(settings: Settings, topic: str) -> str:
    prefix = settings.topic_prefix
    return topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic


def describe_groups(settings: Settings, admin: AdminClient) -> dict[str, Any]:
    """Members, assignments and lag per partition of the groups in ``GROUP_TOPICS``."""
    ids = {settings.group(name): name for name in GROUP_TOPICS}
    futures = admin.describe_consumer_groups(list(ids), request_timeout=5)
    groups: dict[str, Any] = {}
    for group_id, future in futures.items():
        name = ids[group_id]
        entry: dict[str, Any] = {
            "group_id": group_id,
            "state": "UNKNOWN",
            "type": "UNKNOWN",
            # analytics reads every partition without joining: it has no members
            "membership": "reader" if name == ANALYTICS_GROUP else "group",
            "member_count": 0,
            "members": [],
            "partitions": [],
            "total_lag": None,
            "error": None,
        }
        groups[name] = entry
        try:
            desc = future.result()
        except Exception as exc:  # noqa: BLE001 - one group failing must not hide the others
            entry["error"] = str(exc)
            continue
        entry["state"] = getattr(desc.state, "name", str(desc.state))
        entry["type"] = getattr(desc.type, "name", str(desc.type))
        owner: dict[tuple[str, int], str] = {}
        for member in sorted(desc.members, key=lambda m: (m.client_id, m.member_id)):
            tps = sorted(
                (_logical(settings, tp.topic), tp.partition)
                for tp in (member.assignment.topic_partitions if member.assignment else [])
            )
            entry["members"].append(
                {
                    "member_id": member.member_id,
                    "client_id": member.client_id,
                    "host": member.host,
                    "partitions": [f"{t}[{p}]" for t, p in tps],
                }
            )
            for tp in tps:
                owner[tp] = member.client_id or member.member_id
        entry["member_count"] = len(entry["members"])
        if entry["state"] == "DEAD":
            continue  # no such group: no committed offsets, no lag to speak of
        topics = [settings.topic(t) for t in GROUP_TOPICS[name]]
        try:
            lag = group_lag(settings, name, topics)
        except Exception as exc:  # noqa: BLE001 - shown on the dashboard, retried next round
            entry["error"] = f"lag: {exc}"
            continue
        rows = sorted(((_logical(settings, t), p), n) for (t, p), n in lag.items())
        entry["partitions"] = [
            {"topic": t, "partition": p, "lag": n, "member": owner.get((t, p))}
            for (t, p), n in rows
        ]
        entry["total_lag"] = sum(n for _tp, n in rows)
    return {"generated_at": time.time(), "groups": groups}


class GroupsMonitor:
    """Refreshes ``describe_groups`` every ``GROUPS_REFRESH_S`` in a thread of its own."""

    def __init__(self, settings: Settings, every_s: float = GROUPS_REFRESH_S) -> None:
        self.settings = settings
        self.every_s = every_s
        self._latest: dict[str, Any] = {"generated_at": None, "groups": {}, "error": None}
        self._lock = threading.Lock()
        self._admin: AdminClient | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="analytics-groups", daemon=True)

    def latest(self) -> dict[str, Any]:
        with self._lock:
            return self._latest

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if self._admin is None:
                    self._admin = make_admin(self.settings)
                found = describe_groups(self.settings, self._admin)
                found["error"] = None
                failures = 0
            except Exception as exc:  # noqa: BLE001 - keep the last good view, say why
                failures += 1
                if failures == 1:
                    log.warning("analytics: describing consumer groups failed: %s", exc)
                with self._lock:
                    found = dict(self._latest)
                found["error"] = str(exc)
            with self._lock:
                self._latest = found
            self._stop.wait(self.every_s)


# --- Prometheus ---------------------------------------------------------------------------


class AnalyticsCollector(Collector):
    """Analytics totals, window rates and latency quantiles, read at scrape time."""

    def __init__(self, state: AnalyticsState) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        return []  # unchecked registration: the families are built at scrape time

    def collect(self) -> Iterator[Metric]:
        snap = self.state.snapshot()
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
    """``/`` dashboard, ``/snapshot``, ``/groups``, ``/metrics``, ``/static/*``."""
    index_html = _dashboard_index()

    def index(_request: Request) -> Response:
        return HTMLResponse(index_html, headers=_JSON_HEADERS)

    def snapshot(_request: Request) -> Response:
        return _json(state.snapshot())

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
    monitor = GroupsMonitor(settings) if groups else None
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
