"""The whole life of an order in ``ordermesh bench mesh``: reserved, paid, shipped, captured.

The reservation-only runs of ``bench.mesh`` stop at the inventory's decision. These run
the mesh with the gateway, payments and fulfilment as well (``MeshPlan.lifecycle``), on
the same broker and in the same run, so a noisy machine slows both alike:

- ``drain``: the same backlog as the reservation-only drain (as many orders, the same
  malformed share; no declining cards, no cancels), the gateway with no faults (its
  lowest latency), ``fulfilment_delay_s`` 0 and a reservation TTL no drain reaches. Timed
  from the services' start until the mesh has ``settled``: every valid order SHIPPED in
  the tracker, payments with no gateway call due and an empty outbox, fulfilment with
  nothing scheduled and an empty outbox, every group's lag 0, and nothing appended to
  ``order-events``/``order-commands`` while those were read (so no answer was on its
  way). Then ``verify`` (the gateway still serving its ledger) audits every life.
- ``realistic``: the same with a card processor's latency at the gateway (p50 150 ms,
  p99 800 ms by default); payments keeps up to ``payments_concurrency`` calls in flight,
  sent in batches of ``gateway_batch_max``, so by Little's law it can finish at most
  ``concurrency / (2 × mean time in flight)`` orders/s per instance (an authorize and a
  capture per order, each answered with its batch's slowest): ``gateway_bound`` says so
  beside the measured rate.
- ``latency``: a fresh lifecycle mesh under a fixed rate, as ``bench.mesh.latency_run``:
  created → RESERVED (the ``OrderReserved`` record's timestamp minus ``created_at``, as
  the reservation-only runs measure created → decided) and created → SHIPPED (the
  ``OrderShipped`` record's) of the orders created in the window.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple

from ordermesh import lifecycle, schema
from ordermesh.bench.api import percentiles_ms
from ordermesh.bench.mesh import (
    BENCH_STOCK,
    LAG_POLL_S,
    LOAD_START_S,
    MALFORMED_RATIO,
    Db,
    OutcomeStamp,
    Step,
    _group_lag,
    _prepared_run,
    _quiet,
    _restarts,
    _sleep_watching,
    _verify,
    _wait_ready,
    cpu_per_order,
    machine_busy_s,
    process_cpu_s,
    window_latencies,
)
from ordermesh.config import Settings
from ordermesh.errors import DecodeError, OrderMeshError, StoreError
from ordermesh.gateway.faults import Latency
from ordermesh.kafka.client import kafka_errors
from ordermesh.kafka.reader import end_offsets, read_topic
from ordermesh.loadgen import DEFAULT_SKUS, random_seed, run_load
from ordermesh.mesh import GATEWAY, Mesh, fetch_json
from ordermesh.stores.factory import (
    backend,
    open_order_queries,
)
from ordermesh.topics import COMMANDS, EVENTS
from ordermesh.verify import held_work

log = logging.getLogger(__name__)

# What every lifecycle run changes in the settings: a shipment is ready at once (pick and
# pack is not what is measured), and no reservation expires while a backlog drains.
LIFE_SETTINGS: Final[Mapping[str, Any]] = {
    "fulfilment_delay_s": 0.0,
    "reservation_ttl_s": 7 * 86_400.0,
}
# a card processor's latency (the gateway's lognormal fit)
REALISTIC_P50_MS: Final = 150.0
REALISTIC_P99_MS: Final = 800.0
# an authorize when the order is reserved, a capture when it ships
GATEWAY_CALLS_PER_ORDER: Final = 2
SHIPPED: Final = "SHIPPED"
# the estimate of a batch's slowest call in ``gateway_bound``
BOUND_SEED: Final = 1
BOUND_SAMPLES: Final = 2000
# how long a latency run's mesh may take after its load to finish every life
SETTLE_S: Final = 90.0


def gateway_latency_options(p50_ms: float, p99_ms: float) -> tuple[str, ...]:
    """``ordermesh gateway``'s options for a latency of ``p50_ms``/``p99_ms`` (0/0: none)."""
    if p50_ms == 0 and p99_ms == 0:
        return ()
    return ("--latency-p50-ms", f"{p50_ms:g}", "--latency-p99-ms", f"{p99_ms:g}")


def gateway_bound(
    p50_ms: float, p99_ms: float, *, concurrency: int, instances: int = 1, batch: int = 1
) -> dict[str, float]:
    """The mean time a call is in flight and the orders/s that ``instances`` payments
    processes with ``concurrency`` calls in flight each can finish at most (Little's law:
    in flight = rate × time in flight). A call sent in a batch of ``batch`` is answered
    with the slowest of its batch: its time in flight is the mean of the largest of
    ``batch`` draws of the gateway's lognormal (estimated with a fixed seed)."""
    latency = Latency.fitted(p50_ms, p99_ms)
    if batch <= 1:
        mean_s = latency.median_s * math.exp(latency.sigma**2 / 2)
    else:
        rng = random.Random(BOUND_SEED)
        draws = [max(latency.draw(rng) for _ in range(batch)) for _ in range(BOUND_SAMPLES)]
        mean_s = sum(draws) / len(draws)
    rate = concurrency * instances / (GATEWAY_CALLS_PER_ORDER * mean_s) if mean_s > 0 else 0.0
    return {
        "mean_call_ms": round(mean_s * 1000, 1),
        "batch": batch,
        "in_flight": concurrency * instances,
        "orders_per_s": round(rate, 1),
    }


# --- when a lifecycle mesh is done -----------------------------------------------------


class LifeProgress(NamedTuple):
    """One look at a lifecycle mesh: the tracker's statuses, the work payments and
    fulfilment still hold, the groups' lag, and the topics' ends before and after."""

    statuses: Mapping[str, int]
    # payments: calls due or waiting for a retry + outbox; fulfilment: scheduled + outbox
    work: int
    lag: int
    ends_before: int
    ends_after: int


def all_ended(statuses: Mapping[str, int], orders: int | None) -> bool:
    """No order the tracker holds is short of its end (and, given ``orders``, it holds
    that many valid orders)."""
    if any(count for status, count in statuses.items() if status not in lifecycle.TERMINAL):
        return False
    return orders is None or sum(statuses.values()) == orders


def settled(progress: LifeProgress, orders: int | None) -> bool:
    """Every order at its end and nothing left to happen: no work held, no lag, and no
    record appended while the look was taken (an answer published meanwhile is not yet
    consumed)."""
    return (
        all_ended(progress.statuses, orders)
        and progress.work == 0
        and progress.lag == 0
        and progress.ends_before == progress.ends_after
    )


def _statuses(settings: Settings) -> dict[str, int]:
    if backend(settings) == "sqlite" and not settings.tracker_db_path().exists():
        return {}  # the tracker has not created its store yet (and opening it would warn)
    store = open_order_queries(settings)
    try:
        return store.status_counts()
    except StoreError:
        return {}  # the tracker has not created its store yet
    finally:
        store.close()


def _topic_ends(settings: Settings) -> int:
    return sum(
        high
        for topic in (EVENTS, COMMANDS)
        for _low, high in end_offsets(settings, settings.topic(topic)).values()
    )


def _look(mesh: Mesh) -> LifeProgress:
    settings = mesh.settings
    with kafka_errors(settings):
        before = _topic_ends(settings)
        # lag first: whatever was consumed by then left its work in the stores read next
        lag = sum(_group_lag(settings, group) for group in mesh.groups())
        work = held_work(settings)
        statuses = _statuses(settings)
        after = _topic_ends(settings)
    return LifeProgress(statuses, work, lag, before, after)


def wait_settled(
    mesh: Mesh,
    started: float,
    *,
    orders: int | None,
    timeout_s: float,
    give_up: bool = False,
) -> dict[str, float | None]:
    """Poll until the mesh ``settled``: seconds from ``started`` until the tracker first
    showed every order at its end, and until it settled (None: not within ``timeout_s``
    and ``give_up``; otherwise that raises OrderMeshError)."""
    ended_at: float | None = None
    while True:
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            if give_up:
                return {"shipped_s": ended_at, "settled_s": None}
            raise OrderMeshError(
                f"the lifecycle mesh did not settle in {timeout_s:.0f}s (services restarted"
                f" {_restarts(mesh)} times)"
            )
        mesh.supervisor.check()
        if ended_at is None:
            # the tracker alone until every order ended: one query per look
            if all_ended(_statuses(mesh.settings), orders):
                ended_at = time.monotonic() - started
                continue
            time.sleep(LAG_POLL_S)
            continue
        try:
            progress = _look(mesh)
        except (OrderMeshError, StoreError) as exc:
            # group coordinators or a store's first transaction: transient
            log.info("settle check: %s", exc)
            time.sleep(LAG_POLL_S)
            continue
        if settled(progress, orders):
            return {"shipped_s": ended_at, "settled_s": time.monotonic() - started}
        time.sleep(LAG_POLL_S)


# --- the drains ------------------------------------------------------------------------


def _life_settings(settings: Settings) -> Settings:
    return settings.model_copy(update=dict(LIFE_SETTINGS))


def lifecycle_drain(
    settings: Settings,
    *,
    orders: int,
    workdir: Path,
    gateway_faults: tuple[str, ...] = (),
    db: Db = "sqlite",
    skus: int = DEFAULT_SKUS,
    stock: int = BENCH_STOCK,
    malformed_ratio: float = MALFORMED_RATIO,
    on_step: Step = _quiet,
    label: str = "life-drain",
) -> dict[str, Any]:
    """Produce ``orders`` orders, start the lifecycle mesh and time it until every valid
    order is SHIPPED and the mesh settled; verify with the gateway still serving."""
    with _prepared_run(
        _life_settings(settings),
        workdir,
        label,
        db=db,
        inventory=1,
        skus=skus,
        stock=stock,
        lifecycle=True,
        gateway_faults=gateway_faults,
    ) as run:
        on_step(f"{label}: producing {orders:,} orders")
        load = run_load(
            run.settings,
            count=orders,
            duration=None,
            rate=None,
            malformed_ratio=malformed_ratio,
            seed=random_seed(),
            skus=skus,
        )
        if load.failed:
            raise OrderMeshError(f"{label}: {load.failed} of {load.sent} orders not acknowledged")
        valid = load.acknowledged - load.malformed_sent
        on_step(f"{label}: starting the lifecycle mesh, {valid:,} orders to ship")
        run.mesh = mesh = Mesh(run.settings, run.plan)
        started = time.monotonic()
        busy_before = machine_busy_s()
        mesh.start()
        timeline = wait_settled(mesh, started, orders=valid, timeout_s=max(300.0, orders / 50))
        busy_after = machine_busy_s()
        service_cpu = {
            name: cpu
            for name, service in mesh.supervisor.services.items()
            if (cpu := process_cpu_s(service.pid)) is not None
        }
        statuses = _statuses(mesh.settings)
        restarts = _restarts(mesh)
        on_step(f"{label}: settled in {timeline['settled_s']:.1f}s; verifying")
        report = _verify(mesh, serving=(GATEWAY,))
    seconds = timeline["settled_s"] or 0.0
    shipped_s = timeline["shipped_s"] or seconds
    return {
        "orders": load.acknowledged,
        "valid_orders": valid,
        "malformed": load.malformed_sent,
        "shipped": statuses.get(SHIPPED, 0),
        "statuses": {k: v for k, v in statuses.items() if v},
        "gateway_faults": list(gateway_faults),
        "seconds": round(seconds, 2),
        "orders_per_s": round(load.acknowledged / seconds, 1),
        "shipped_s": round(shipped_s, 2),
        "shipped_per_s": round(valid / shipped_s, 1),
        "restarts": restarts,
        "cpu": cpu_per_order(
            service_cpu,
            None if busy_before is None or busy_after is None else busy_after - busy_before,
            max(1, load.acknowledged),
        ),
        "verify": report,
    }


def lifecycle_drains(
    settings: Settings,
    *,
    orders: int,
    realistic_orders: int,
    workdir: Path,
    reference: Mapping[str, Any] | None,
    db: Db = "sqlite",
    skus: int = DEFAULT_SKUS,
    stock: int = BENCH_STOCK,
    malformed_ratio: float = MALFORMED_RATIO,
    realistic_p50_ms: float = REALISTIC_P50_MS,
    realistic_p99_ms: float = REALISTIC_P99_MS,
    on_step: Step = _quiet,
) -> dict[str, Any]:
    """The drain with the fastest gateway (beside ``reference``, the reservation-only
    drain of the same run), then ``realistic_orders`` (0: none) with a realistic one."""
    common: dict[str, Any] = {
        "workdir": workdir,
        "db": db,
        "skus": skus,
        "stock": stock,
        "malformed_ratio": malformed_ratio,
        "on_step": on_step,
    }
    fastest = lifecycle_drain(settings, orders=orders, label="life-drain", **common)
    result: dict[str, Any] = {"drain": fastest}
    if reference is not None:
        fastest["reservation_only_orders_per_s"] = reference["orders_per_s"]
        fastest["pct_of_reservation_only"] = round(
            100 * fastest["orders_per_s"] / reference["orders_per_s"], 1
        )
    if realistic_orders:
        faults = gateway_latency_options(realistic_p50_ms, realistic_p99_ms)
        realistic = lifecycle_drain(
            settings,
            orders=realistic_orders,
            gateway_faults=faults,
            label="life-realistic",
            **common,
        )
        realistic["gateway_latency_ms"] = {"p50": realistic_p50_ms, "p99": realistic_p99_ms}
        realistic["bound"] = gateway_bound(
            realistic_p50_ms,
            realistic_p99_ms,
            concurrency=settings.payments_concurrency,
            batch=settings.gateway_batch_max,
        )
        result["realistic"] = realistic
    return result


# --- latency ---------------------------------------------------------------------------


def life_stamps(settings: Settings) -> tuple[list[OutcomeStamp], dict[str, float]]:
    """The decisions of ``order-events`` as ``OutcomeStamp``s, and each order's first
    ``OrderShipped`` record's timestamp (epoch s), in one read."""
    stamps: list[OutcomeStamp] = []
    shipped: dict[str, float] = {}
    for record in read_topic(settings, settings.topic(EVENTS)):
        try:
            event = schema.decode_event(record.value)
        except DecodeError:
            continue
        at = record.timestamp_ms / 1000
        if isinstance(event, schema.OrderReserved | schema.OrderRejected):
            stamps.append(
                OutcomeStamp(
                    event.order_id,
                    event.order_created_at,
                    event.at,
                    at,
                    isinstance(event, schema.OrderReserved),
                )
            )
        elif isinstance(event, schema.OrderShipped):
            shipped[event.order_id] = min(at, shipped.get(event.order_id, at))
    return stamps, shipped


def life_window_latencies(
    stamps: Iterable[OutcomeStamp],
    shipped: Mapping[str, float],
    *,
    warmup_s: float,
    window_s: float,
) -> dict[str, Any]:
    """``window_latencies`` of the decisions (created → RESERVED is its
    ``created_to_event_ms`` of reserved orders), plus created → SHIPPED of the window's
    reserved orders and how many of them shipped."""
    first: dict[str, OutcomeStamp] = {}
    for stamp in stamps:
        seen = first.get(stamp.order_id)
        if seen is None or stamp.event_ts < seen.event_ts:
            first[stamp.order_id] = stamp
    result = window_latencies(first.values(), warmup_s=warmup_s, window_s=window_s)
    if not first:
        return {**result, "shipped": 0, "created_to_shipped_ms": percentiles_ms([])}
    # the same window as window_latencies draws
    start = min(s.created_at for s in first.values()) + warmup_s
    chosen = [s for s in first.values() if s.reserved and start <= s.created_at < start + window_s]
    to_ship = [shipped[s.order_id] - s.created_at for s in chosen if s.order_id in shipped]
    return {
        **result,
        "created_to_reserved_ms": percentiles_ms([s.event_ts - s.created_at for s in chosen]),
        "shipped": len(to_ship),
        "created_to_shipped_ms": percentiles_ms(to_ship),
    }


def lifecycle_latency_run(
    settings: Settings,
    *,
    rate: float,
    workdir: Path,
    db: Db = "sqlite",
    skus: int = DEFAULT_SKUS,
    stock: int = BENCH_STOCK,
    malformed_ratio: float = MALFORMED_RATIO,
    warmup_s: float = 3.0,
    window_s: float = 20.0,
    settle_s: float = SETTLE_S,
    on_step: Step = _quiet,
) -> dict[str, Any]:
    """A fresh lifecycle mesh (the fastest gateway), ready, under ``rate`` orders/s for
    warm-up + window seconds, then up to ``settle_s`` to finish every life; created →
    RESERVED and → SHIPPED of the window's orders."""
    label = f"life-rate-{rate:g}"
    with _prepared_run(
        _life_settings(settings),
        workdir,
        label,
        db=db,
        inventory=1,
        skus=skus,
        stock=stock,
        lifecycle=True,
        gateway_faults=(),
    ) as run:
        run.mesh = mesh = Mesh(run.settings, run.plan)
        mesh.start()
        ready_s = _wait_ready(mesh)
        # payments' first authorize must not wait for the gateway's start
        health = mesh.settings.gateway_base_url() + "/health"
        deadline = time.monotonic() + 60
        while fetch_json(health) is None:
            if time.monotonic() > deadline:
                raise OrderMeshError(f"{label}: the gateway did not answer in 60s")
            _sleep_watching(mesh, 0.5)
        seconds = warmup_s + window_s
        on_step(f"{label}: ready after {ready_s:.1f}s; {rate:g} orders/s for {seconds:g}s")
        mesh.start_load(rate=rate, duration=seconds, malformed_ratio=malformed_ratio)
        started = time.monotonic()
        while mesh.load_running():
            if time.monotonic() - started > LOAD_START_S + seconds + 120:
                raise OrderMeshError(f"{label}: the load did not finish")
            _sleep_watching(mesh, 0.5)
        backlog = _group_lag(mesh.settings, "inventory")
        on_step(f"{label}: load done (inventory backlog {backlog:,}); settling, verifying")
        # a mesh that fell behind the rate is not waited for without end: what it did not
        # finish shows as orders not shipped and verify's pending checks
        settle = wait_settled(mesh, time.monotonic(), orders=None, timeout_s=settle_s, give_up=True)
        statuses = _statuses(mesh.settings)
        restarts = _restarts(mesh)
        report = _verify(mesh, serving=(GATEWAY,))
        stamps, shipped = life_stamps(mesh.settings)
    return {
        "rate": rate,
        "db": db,
        "warmup_s": warmup_s,
        "window_s": window_s,
        "ready_s": round(ready_s, 1),
        **life_window_latencies(stamps, shipped, warmup_s=warmup_s, window_s=window_s),
        "backlog_at_load_end": backlog,
        "settled_s": None if settle["settled_s"] is None else round(settle["settled_s"], 1),
        "statuses": {k: v for k, v in statuses.items() if v},
        "restarts": restarts,
        "verify": report,
    }


def compare_latency(
    life: Mapping[str, Any], reservation_only: Iterable[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """created → RESERVED of the lifecycle run beside the reservation-only run at its
    rate (created → decided there: every order of it is reserved), p50 and p99 as ratios;
    None without a run at that rate."""
    other = next((r for r in reservation_only if float(r["rate"]) == float(life["rate"])), None)
    if other is None:
        return None
    ratios: dict[str, float | None] = {}
    for p in ("p50", "p99"):
        mine, theirs = life["created_to_reserved_ms"].get(p), other["created_to_event_ms"].get(p)
        ratios[p] = round(mine / theirs, 2) if mine is not None and theirs else None
    return {
        "rate": life["rate"],
        "reservation_only_ms": {p: other["created_to_event_ms"].get(p) for p in ("p50", "p99")},
        "lifecycle_ms": {p: life["created_to_reserved_ms"].get(p) for p in ("p50", "p99")},
        "ratio": ratios,
    }
