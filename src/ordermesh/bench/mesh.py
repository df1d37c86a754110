"""``ordermesh bench mesh``: the whole mesh measured against Kafka's own tools, in one run.

Everything runs on one throwaway single-node broker (or the configured cluster), in a
temporary directory. First the mesh drains ``warm_orders`` orders once, untimed (as
``drain`` below): a new broker spends its first minutes of load compiling its hot
paths, which a broker in service has long done. Then, in this order (each part can be
skipped):

- ``kafka``: Kafka's ``ProducerPerformance`` then ``ConsumerPerformance``
  (``ordermesh.bench.kafka_tools``) on a topic shaped like ``orders`` (6 partitions),
  with records as large as an order: the mean key + value size of the load generator's
  valid orders. ProducerPerformance's records/s is the reference every other rate is
  given as a percentage of.
- ``python``: a bare confluent-kafka ``consume(5000)`` loop over the same records, in a
  consumer group, with the project's consumer settings and no decoding: what one Python
  process can read at all. Timed from its first assignment, as ConsumerPerformance's
  ``fetch.nMsg.sec`` is timed from the end of its group join.
- ``drain``: a backlog of ``orders`` orders is produced first by the load generator (its
  malformed share as ``ordermesh up``'s load), with stock that never runs out. Then the
  mesh is started as ``ordermesh up`` starts it (``ordermesh.mesh.Mesh``: every service a
  supervised process; SQLite files, or a fresh local PostgreSQL, in a temporary data dir),
  and timed from the start until every consumer group's committed lag is 0. The services
  are stopped and ``ordermesh verify`` checks the result. With ``--inventory 1,3``, once
  per count of inventory instances (more than one needs PostgreSQL, as for ``up``).
- ``latency``: per fixed rate, a fresh mesh; once it is ready (every group's partitions
  assigned, the HTTP services answering) the load generator runs at that rate
  (``ordermesh load --rate R``, a process of its own) for a warm-up plus a window. The
  latency of an order created in the window is the Kafka timestamp (CreateTime) of its
  outcome record in ``order-events`` minus its ``created_at``. ``created_at`` is stamped
  by the load generator just before it produces the order; the event's timestamp by the
  inventory's producer when it hands the event to Kafka, after the batch's database
  transaction committed. So it covers the order's trip through the producer, the broker,
  the inventory's poll, decision and commit, and leaves out only the event's own
  acknowledgement (milliseconds). Both stamps come from the one machine clock. The
  event's ``at`` (the batch's decision clock, taken before the commit) gives the
  ``created_to_decision_ms`` beside it.
- ``api``: during the run at ``api_rate`` (1000/s by default), a sample of orders is
  POSTed to the API at a low rate, each followed by ``GET /orders/{id}?wait=10``; the time
  from sending the POST to the answer showing RESERVED is the API path's latency (API ->
  Kafka -> inventory -> Kafka -> tracker -> API). The client is ``bench.api``'s bare
  keep-alive connection in this process, which does nothing else meanwhile, while the
  load runs in its own process.

- the whole life of an order (``ordermesh.bench.lifecycle``, unless ``--no-lifecycle``):
  with ``drain``, the same backlog drained by the mesh with the gateway, payments and
  fulfilment until every order is SHIPPED and captured (beside the reservation-only
  drain above, its ratio), and again with a card processor's latency at the gateway;
  with ``latency``, created -> RESERVED and -> SHIPPED on a lifecycle mesh at 1000/s.

The numbers go to ``bench-results/mesh-<time>.json`` and, unless told otherwise, to
``docs/performance.md`` and its chart (``ordermesh.bench.performance_doc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, get_args

from ordermesh import schema
from ordermesh.bench import kafka_tools
from ordermesh.bench.api import api_headers, order_bodies, percentiles_ms, post_then_read
from ordermesh.bench.inventory import bench_cluster
from ordermesh.broker.jars import ensure_jars
from ordermesh.config import Settings
from ordermesh.errors import ConfigError, DecodeError, OrderMeshError
from ordermesh.kafka.admin import ensure_topics
from ordermesh.kafka.client import kafka_errors, make_admin, make_consumer
from ordermesh.kafka.groups import describe_groups
from ordermesh.kafka.lag import group_lag
from ordermesh.kafka.reader import read_topic
from ordermesh.loadgen import DEFAULT_SKUS, OrderGenerator, random_seed, run_load, sku_name
from ordermesh.mesh import GROUP_TOPICS, Mesh, MeshPlan, check_plan, fetch_json, parse_instances
from ordermesh.postgres.local import LocalPostgres
from ordermesh.stores.factory import migrate, open_inventory_store
from ordermesh.topics import EVENTS, ORDERS, SPECS
from ordermesh.topology import BY_NAME
from ordermesh.verify import verify

log = logging.getLogger(__name__)

Part = Literal["kafka", "python", "drain", "latency", "api"]
PARTS: Final[tuple[Part, ...]] = get_args(Part)
Db = Literal["sqlite", "postgres"]
# a fixed rate in orders/s, or "half": half the first drain's orders/s
Rate = float | Literal["half"]
HALF: Final = "half"

# the malformed share of the load ``ordermesh up`` runs (``Mesh.start_load``'s default)
MALFORMED_RATIO: Final = 0.01
# units per SKU: the top SKU is in a third of all orders, so stock never runs out
BENCH_STOCK: Final = 10_000_000
# a seed as long as the random ones (12 digits): order ids, and so records, of real size
SIZE_SEED: Final = 123_456_789_012
SIZE_SAMPLE: Final = 20_000
CONSUME_BATCH: Final = 5000
# lag is read this often while a mesh drains (each read is a short-lived client)
LAG_POLL_S: Final = 0.5
# the row of ``cpu_per_order`` for what no service used
REST_OF_MACHINE: Final = "rest of the machine (broker, OS)"
READY_DEADLINE_S: Final = 120.0
# ``ordermesh load`` needs a moment to start before its first order
LOAD_START_S: Final = 2.0
WAIT_S: Final = 10.0
IDLE_REUSE_S: Final = 2.0

Step = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


# --- command-line values ---------------------------------------------------------------


def parse_rates(text: str) -> list[Rate]:
    """``"1000,5000,half"`` -> ``[1000.0, 5000.0, "half"]``; ConfigError when malformed."""
    rates: list[Rate] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == HALF:
            rates.append(HALF)
            continue
        try:
            rate = float(part)
        except ValueError:
            raise ConfigError(f"rate {part!r}: expected orders/s or 'half'") from None
        if not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(f"rate {part!r}: must be a positive number")
        rates.append(rate)
    if not rates:
        raise ConfigError("rates: expected at least one, like 1000,5000,half")
    return rates


def parse_parts(skip: str | None, only: str | None) -> frozenset[Part]:
    """The parts to run: all, all but ``skip``, or ``only``; ConfigError for unknown names."""
    if skip and only:
        raise ConfigError("--skip and --only exclude each other")

    def names(text: str) -> set[Part]:
        found: set[Part] = set()
        for name in (n.strip() for n in text.split(",")):
            if not name:
                continue
            if name not in PARTS:
                raise ConfigError(f"unknown part {name!r} (parts: {', '.join(PARTS)})")
            found.add(name)
        return found

    if only:
        chosen = names(only)
        if not chosen:
            raise ConfigError("--only: name at least one part")
        return frozenset(chosen)
    return frozenset(PARTS) - names(skip or "")


def resolve_rates(rates: Sequence[Rate], drain_rate: float | None) -> tuple[list[float], str]:
    """Fixed rates with ``half`` resolved against ``drain_rate`` (duplicates dropped), and
    a note when ``half`` had nothing to resolve against."""
    out: list[float] = []
    note = ""
    for rate in rates:
        if rate == HALF:
            if drain_rate is None:
                note = "half: no drain was measured, so that rate was left out"
                continue
            value = float(round(drain_rate / 2))
        else:
            value = float(rate)
        if value not in out:
            out.append(value)
    return out, note


# --- pure measurements -----------------------------------------------------------------


def mean_record_bytes(skus: int = DEFAULT_SKUS, sample: int = SIZE_SAMPLE) -> int:
    """Mean key + value bytes of the load generator's valid orders (ProducerPerformance
    sends no key, so its payload stands for both)."""
    gen = OrderGenerator(SIZE_SEED, skus=skus)
    total = 0
    for _ in range(sample):
        message = gen.next()
        total += len(message.key) + len(message.value)
    return round(total / sample)


class OutcomeStamp(NamedTuple):
    """When an order was created, decided, and its outcome handed to Kafka (epoch s)."""

    order_id: str
    created_at: float
    decided_at: float
    event_ts: float
    reserved: bool


def window_latencies(
    stamps: Iterable[OutcomeStamp], *, warmup_s: float, window_s: float
) -> dict[str, Any]:
    """Latencies of the orders created in ``[first + warmup_s, first + warmup_s +
    window_s)``, ``first`` the earliest ``created_at``; a redelivered outcome counts once
    (its first record)."""
    first: dict[str, OutcomeStamp] = {}
    for stamp in stamps:
        seen = first.get(stamp.order_id)
        if seen is None or stamp.event_ts < seen.event_ts:
            first[stamp.order_id] = stamp
    if not first:
        empty = percentiles_ms([])
        return {
            "orders": 0,
            "decided_per_s": 0.0,
            "reserved": 0,
            "created_to_event_ms": empty,
            "created_to_decision_ms": empty,
        }
    start = min(s.created_at for s in first.values()) + warmup_s
    end = start + window_s
    chosen = [s for s in first.values() if start <= s.created_at < end]
    return {
        "orders": len(chosen),
        "decided_per_s": round(len(chosen) / window_s, 1),
        "reserved": sum(1 for s in chosen if s.reserved),
        "created_to_event_ms": percentiles_ms([s.event_ts - s.created_at for s in chosen]),
        "created_to_decision_ms": percentiles_ms([s.decided_at - s.created_at for s in chosen]),
    }


def throughput_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The "what | rate | % of ProducerPerformance" table of a result."""
    kafka = result.get("kafka") or {}
    reference = (kafka.get("producer_performance") or {}).get("records_per_s")
    size = result.get("setup", {}).get("record_bytes")
    rows: list[dict[str, Any]] = []

    def add(what: str, label: str, rate: float | None, unit: str) -> None:
        if rate is None:
            return
        pct = round(100 * rate / reference, 1) if reference else None
        rows.append(
            {"what": what, "label": label, "rate": rate, "unit": unit, "pct_of_producer": pct}
        )

    if kafka:
        add(
            f"Kafka ProducerPerformance (Java client, acks=all, {size} B records)",
            "Kafka ProducerPerformance",
            kafka["producer_performance"]["records_per_s"],
            "records/s",
        )
        add(
            "Kafka ConsumerPerformance (Java client, after its group join)",
            "Kafka ConsumerPerformance",
            kafka["consumer_performance"]["fetch_records_per_s"],
            "records/s",
        )
    python = result.get("python_consume")
    if python:
        add(
            f"Python confluent-kafka consume({CONSUME_BATCH}) loop, no decoding",
            f"Python consume({CONSUME_BATCH}) loop",
            python["records_per_s"],
            "records/s",
        )
    drains = result.get("drain") or []
    if drains:
        add(
            "ordermesh load generator, as fast as it goes (Python producer)",
            "ordermesh load generator (produce)",
            drains[0]["load"]["rate"],
            "orders/s",
        )
    for run in drains:
        add(
            f"whole mesh draining {run['orders']:,} orders ({run['db']},"
            f" {run['inventory_instances']} inventory), start to lag 0",
            f"whole mesh drain ({run['db']}, {run['inventory_instances']} inventory)",
            run["orders_per_s"],
            "orders/s",
        )
    return rows


# --- machine ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def machine_info(settings: Settings) -> dict[str, Any]:
    """CPUs, CPU model, RAM, Python, Java, Kafka and client versions, platform."""
    return {
        "cpus": os.cpu_count() or 0,
        "cpu_model": _cpu_model(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "java": kafka_tools.java_version(),
        "kafka": settings.kafka_version,
        "confluent_kafka": _package_version("confluent-kafka"),
        "platform": platform.platform(),
    }


# --- Kafka's tools and the bare Python loop --------------------------------------------


def kafka_reference(
    settings: Settings, jar_dir: Path, *, records: int, record_size: int
) -> dict[str, Any]:
    """ProducerPerformance, then ConsumerPerformance over what it wrote."""
    bootstrap = settings.bootstrap_servers or ""
    topic = settings.topic(ORDERS)
    timeout = 120.0 + records / 1000
    args = kafka_tools.producer_performance_args(bootstrap, topic, records, record_size)
    out = kafka_tools.run_tool(jar_dir, args, timeout_s=timeout)
    producer = {
        **kafka_tools.parse_producer_performance(out),
        "command": kafka_tools.shown_command(args),
    }
    group = settings.group("consumer-performance")
    args = kafka_tools.consumer_performance_args(bootstrap, topic, records, group)
    out = kafka_tools.run_tool(jar_dir, args, timeout_s=timeout)
    consumer = {
        **kafka_tools.parse_consumer_performance(out),
        "command": kafka_tools.shown_command(args),
    }
    return {"producer_performance": producer, "consumer_performance": consumer}


def python_consume(settings: Settings, *, records: int, timeout_s: float = 300.0) -> dict[str, Any]:
    """``records`` records of ``orders`` through a bare ``consume(5000)`` loop."""
    topic = settings.topic(ORDERS)
    consumer = make_consumer(settings, "python-consume")
    assigned: list[float] = []

    def on_assign(_consumer: Any, _partitions: list[Any]) -> None:
        if not assigned:
            assigned.append(time.perf_counter())

    count = size = 0
    try:
        consumer.subscribe([topic], on_assign=on_assign)
        deadline = time.monotonic() + timeout_s
        while count < records:
            if time.monotonic() > deadline:
                raise OrderMeshError(f"python consume: {count} of {records} records read")
            for msg in consumer.consume(num_messages=CONSUME_BATCH, timeout=1.0):
                if msg.error() is None:
                    count += 1
                    size += len(msg.value() or b"")
        end = time.perf_counter()
    finally:
        consumer.close()
    seconds = end - assigned[0]
    return {
        "records": count,
        "seconds": round(seconds, 3),
        "records_per_s": round(count / seconds, 1),
        "mb_per_s": round(size / seconds / 1024**2, 2),
    }


# --- the mesh --------------------------------------------------------------------------


@dataclass
class _Run:
    """One mesh of the benchmark: its settings, plan, and the database it started."""

    settings: Settings
    plan: MeshPlan
    database: LocalPostgres | None = None
    mesh: Mesh | None = field(default=None, repr=False)


def _run_settings(base: Settings, workdir: Path, label: str) -> Settings:
    # fresh topics, groups and stores per run: no run sees another's orders
    return base.model_copy(
        update={
            "topic_prefix": f"bench-{label}-{uuid.uuid4().hex[:6]}-",
            "data_dir": workdir / label,
            "database_url": None,
            "inventory_db": None,
            "tracker_db": None,
            "api_db": None,
            "payments_db": None,
            "fulfilment_db": None,
            "gateway_db": None,
            # the run's own gateway, on a free port
            "gateway_url": None,
            "gateway_port": 0,
            "metrics_port": None,
        }
    )


@contextlib.contextmanager
def _prepared_run(
    base: Settings,
    workdir: Path,
    label: str,
    *,
    db: Db,
    inventory: int,
    skus: int,
    stock: int,
    lifecycle: bool = False,
    gateway_faults: tuple[str, ...] = (),
) -> Iterator[_Run]:
    """Topics, the database (a fresh local PostgreSQL for ``postgres``) and the stock of a
    run, ready before anything is timed; the services, the database stopped at the end.
    ``lifecycle``: with the gateway (``gateway_faults`` its options), payments and
    fulfilment (``bench.lifecycle``); otherwise the reservation-only mesh."""
    settings = _run_settings(base, workdir, label)
    plan = MeshPlan(
        instances=parse_instances(f"inventory={inventory}"),
        skus=skus,
        stock=stock,
        api_port=0,
        analytics_port=0,
        db=db,
        # False: the reservation-only mesh, what the inventory and its neighbours do per order
        lifecycle=lifecycle,
        gateway_faults=gateway_faults,
    )
    run = _Run(settings, plan)
    try:
        if db == "postgres":
            # started here, not by the mesh: its start (initdb) is not the mesh's
            run.database = LocalPostgres.from_settings(settings)
            state, _ = run.database.up()
            settings = settings.model_copy(update={"database_url": state.url()})
            migrate(settings)
        check_plan(plan, settings)
        ensure_topics(make_admin(settings), settings)
        store = open_inventory_store(settings)
        try:
            store.seed({sku_name(i): stock for i in range(1, skus + 1)})
        finally:
            store.close()
        run.settings = settings
        yield run
    finally:
        if run.mesh is not None:
            run.mesh.stop(stop_broker=False, stop_db=False)
        if run.database is not None:
            run.database.down()
            run.database.purge()


def _group_lag(settings: Settings, group: str) -> int:
    topics = [settings.topic(t) for t in GROUP_TOPICS[group]]
    with kafka_errors(settings):
        return sum(group_lag(settings, group, topics).values())


def _verify(mesh: Mesh, *, serving: Collection[str] = ()) -> dict[str, Any]:
    """Stop the services (so the stores are idle) but ``serving`` (the gateway, whose
    ledger verify reads), then ``ordermesh verify``."""
    if serving:
        for name in [*mesh._inputs(), *mesh.supervisor.services]:
            if name in mesh.supervisor.services and name not in serving:
                mesh.supervisor.stop(name)
    else:
        mesh.stop(stop_broker=False, stop_db=False)
    report = verify(mesh.settings).as_dict()
    keep = (
        "ok",
        "pending",
        "orders_records",
        "valid_orders",
        "invalid_records",
        "outcomes",
        "dlq_entries",
        "duplicate_outcomes",
        "violation_counts",
        "violations",
    )
    return {key: report[key] for key in keep}


def _restarts(mesh: Mesh) -> int:
    return sum(s.restarts for s in mesh.supervisor.services.values())


def _wait_lag_zero(mesh: Mesh, started: float, timeout_s: float) -> dict[str, float | None]:
    """Poll until every group's committed lag is 0: the inventory's first (nothing else
    can finish before it), then all of them in one round."""
    settings = mesh.settings
    initial: int | None = None
    first_progress: float | None = None
    inventory_done: float | None = None
    while True:
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            raise OrderMeshError(
                f"the mesh did not drain in {timeout_s:.0f}s (inventory lag {initial} at"
                f" the start; services restarted {_restarts(mesh)} times)"
            )
        mesh.supervisor.check()
        groups = ["inventory"] if inventory_done is None else list(mesh.groups())
        try:
            lags = {group: _group_lag(settings, group) for group in groups}
        except OrderMeshError as exc:
            # group coordinators warming up: transient
            log.info("lag read: %s", exc)
            time.sleep(LAG_POLL_S)
            continue
        read_at = time.monotonic() - started
        if initial is None:
            initial = lags["inventory"]
        if first_progress is None and lags["inventory"] < initial:
            first_progress = read_at
        if inventory_done is None and lags["inventory"] == 0:
            inventory_done = read_at
            continue  # now read every group in one round
        if inventory_done is not None and not any(lags.values()):
            return {
                "first_commit_s": first_progress,
                "inventory_drained_s": inventory_done,
                "drained_s": read_at,
            }
        time.sleep(LAG_POLL_S)


_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (None: not readable)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # fields after the ")" that ends the command name: utime and stime are 14th and 15th
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy (all cores, not idle or iowait) so far."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / _CLOCK_TICKS


def cpu_per_order(
    services: dict[str, float], machine_s: float | None, orders: int
) -> dict[str, Any]:
    """Where the drain's CPU went: seconds and microseconds per order, per service, and
    the rest of the machine (the broker, the OS, anything else running)."""
    rows: dict[str, Any] = {
        name: {"cpu_s": round(sec, 2), "us_per_order": round(sec * 1e6 / orders, 1)}
        for name, sec in sorted(services.items(), key=lambda kv: -kv[1])
    }
    if machine_s is not None:
        rest = max(0.0, machine_s - sum(services.values()))
        rows[REST_OF_MACHINE] = {
            "cpu_s": round(rest, 2),
            "us_per_order": round(rest * 1e6 / orders, 1),
        }
        rows["total"] = {
            "cpu_s": round(machine_s, 2),
            "us_per_order": round(machine_s * 1e6 / orders, 1),
        }
    return rows


def drain_mesh(
    settings: Settings,
    *,
    orders: int,
    workdir: Path,
    inventory: int = 1,
    db: Db = "sqlite",
    skus: int = DEFAULT_SKUS,
    stock: int = BENCH_STOCK,
    malformed_ratio: float = MALFORMED_RATIO,
    on_step: Step = _quiet,
    label: str | None = None,
) -> dict[str, Any]:
    """Produce ``orders`` orders, then start the mesh and time it until every group's lag
    is 0; stop it and verify. ``settings.bootstrap_servers`` names the cluster."""
    label = label or f"drain-{db}-{inventory}"
    with _prepared_run(
        settings, workdir, label, db=db, inventory=inventory, skus=skus, stock=stock
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
        on_step(f"{label}: starting the mesh, draining {load.acknowledged:,} orders")
        run.mesh = mesh = Mesh(run.settings, run.plan)
        started = time.monotonic()
        busy_before = machine_busy_s()
        mesh.start()
        timeline = _wait_lag_zero(mesh, started, timeout_s=max(180.0, orders / 200))
        busy_after = machine_busy_s()
        service_cpu = {
            name: cpu
            for name, service in mesh.supervisor.services.items()
            if (cpu := process_cpu_s(service.pid)) is not None
        }
        restarts = _restarts(mesh)
        on_step(f"{label}: drained in {timeline['drained_s']:.1f}s; verifying")
        report = _verify(mesh)
    seconds = timeline["drained_s"] or 0.0
    first = timeline["first_commit_s"]
    return {
        "db": db,
        "inventory_instances": inventory,
        "orders": load.acknowledged,
        "malformed": load.malformed_sent,
        "seconds": round(seconds, 2),
        "orders_per_s": round(load.acknowledged / seconds, 1),
        "first_commit_s": None if first is None else round(first, 2),
        "after_first_commit_orders_per_s": (
            round(load.acknowledged / (seconds - first), 1)
            if first is not None and seconds > first
            else None
        ),
        "inventory_drained_s": round(timeline["inventory_drained_s"] or 0.0, 2),
        "restarts": restarts,
        # a restarted service's CPU before its restart is not counted
        "cpu": cpu_per_order(
            service_cpu,
            None if busy_before is None or busy_after is None else busy_after - busy_before,
            max(1, load.acknowledged),
        ),
        "load": {"rate": round(load.rate, 1), "seconds": round(load.elapsed_s, 2)},
        "verify": report,
    }


# --- live: latency at fixed rates, and the API path ------------------------------------


def _member_groups(mesh: Mesh) -> dict[str, tuple[str, ...]]:
    """The groups whose instances join (analytics reads every partition without)."""
    return {
        group: topics
        for group, topics in mesh.groups().items()
        if not any(s.group == group and s.per_partition_assignment for s in BY_NAME.values())
    }


def _ready(mesh: Mesh, admin: Any) -> bool:
    """Every partition of every joining group assigned; the API and analytics answer."""
    if fetch_json(mesh.api_url + "/health") is None:
        return False
    if fetch_json(mesh.dashboard_url.rstrip("/") + "/snapshot") is None:
        return False
    groups = _member_groups(mesh)
    partitions = {spec.name: spec.partitions for spec in SPECS}
    try:
        with kafka_errors(mesh.settings):
            found = describe_groups(mesh.settings, admin, groups)["groups"]
    except OrderMeshError:
        return False
    for group, topics in groups.items():
        wanted = {f"{t}[{p}]" for t in topics for p in range(partitions[t])}
        owned = {tp for member in found[group]["members"] for tp in member["partitions"]}
        if owned != wanted:
            return False
    return True


def _wait_ready(mesh: Mesh, deadline_s: float = READY_DEADLINE_S) -> float:
    started = time.monotonic()
    admin = make_admin(mesh.settings)
    while not _ready(mesh, admin):
        mesh.supervisor.check()
        if time.monotonic() - started > deadline_s:
            raise OrderMeshError(f"the mesh was not ready after {deadline_s:.0f}s")
        time.sleep(0.5)
    return time.monotonic() - started


def _sleep_watching(mesh: Mesh, seconds: float) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        mesh.supervisor.check()
        time.sleep(min(0.5, left))


def outcome_stamps(settings: Settings) -> Iterator[OutcomeStamp]:
    """Every outcome record of ``order-events`` as an ``OutcomeStamp``."""
    for record in read_topic(settings, settings.topic(EVENTS)):
        try:
            event = schema.decode_event(record.value)
        except DecodeError:
            continue
        if isinstance(event, schema.OrderReserved | schema.OrderRejected):
            yield OutcomeStamp(
                event.order_id,
                event.order_created_at,
                event.at,
                record.timestamp_ms / 1000,
                isinstance(event, schema.OrderReserved),
            )


@dataclass(frozen=True)
class ApiSample:
    """The API sample of a latency run: ``orders`` POSTs at ``rate``/s."""

    orders: int = 300
    rate: float = 25.0


def latency_run(
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
    api: ApiSample | None = None,
    on_step: Step = _quiet,
) -> dict[str, Any]:
    """A fresh mesh, ready, under ``rate`` orders/s for warm-up + window seconds;
    created -> decided latency of the window's orders (and the API sample's)."""
    label = f"rate-{rate:g}"
    with _prepared_run(settings, workdir, label, db=db, inventory=1, skus=skus, stock=stock) as run:
        run.mesh = mesh = Mesh(run.settings, run.plan)
        mesh.start()
        ready_s = _wait_ready(mesh)
        seconds = warmup_s + window_s
        on_step(f"{label}: ready after {ready_s:.1f}s; {rate:g} orders/s for {seconds:g}s")
        mesh.start_load(rate=rate, duration=seconds, malformed_ratio=malformed_ratio)
        started = time.monotonic()
        api_result = None
        if api is not None:
            _sleep_watching(mesh, LOAD_START_S + warmup_s)
            bodies = order_bodies(api.orders, skus=skus, seed=random_seed())
            api_result = asyncio.run(
                post_then_read(mesh.api_url, bodies, api.rate, api_headers(mesh.settings))
            )
            api_result["orders"] = api_result.pop("count")
            api_result["background_rate"] = rate
        while mesh.load_running():
            if time.monotonic() - started > LOAD_START_S + warmup_s + window_s + 120:
                raise OrderMeshError(f"{label}: the load did not finish")
            _sleep_watching(mesh, 0.5)
        backlog = _group_lag(mesh.settings, "inventory")
        on_step(f"{label}: load done (inventory backlog {backlog:,}); draining, verifying")
        drained = mesh.wait_drained(max(120.0, backlog / 500))
        restarts = _restarts(mesh)
        report = _verify(mesh)
        stamps = list(outcome_stamps(mesh.settings))
    result = {
        "rate": rate,
        "db": db,
        "warmup_s": warmup_s,
        "window_s": window_s,
        "ready_s": round(ready_s, 1),
        **window_latencies(stamps, warmup_s=warmup_s, window_s=window_s),
        "backlog_at_load_end": backlog,
        "drained": drained,
        "restarts": restarts,
        "verify": report,
    }
    return {"latency": result, "api": api_result}


# --- the whole benchmark ---------------------------------------------------------------


@dataclass(frozen=True)
class MeshBenchPlan:
    """What ``ordermesh bench mesh`` runs."""

    orders: int = 200_000
    rates: tuple[Rate, ...] = (1000.0, 5000.0, HALF)
    inventory: tuple[int, ...] = (1,)
    db: Db = "sqlite"
    parts: frozenset[Part] = frozenset(PARTS)
    skus: int = DEFAULT_SKUS
    stock: int = BENCH_STOCK
    malformed_ratio: float = MALFORMED_RATIO
    warmup_s: float = 3.0
    window_s: float = 20.0
    # orders drained once, untimed, before anything is measured (0: none); see bench_mesh
    warm_orders: int = 200_000
    api_rate: float = 1000.0
    api_sample: ApiSample = ApiSample()
    # the whole life of an order (``bench.lifecycle``): with ``drain``, a lifecycle drain
    # of ``orders`` and one of ``realistic_orders`` (0: none) with a realistic gateway;
    # with ``latency``, a lifecycle mesh at ``life_rate``
    lifecycle: bool = True
    # None: ``orders``, as the reservation-only drain; fewer by default, since every order
    # costs the gateway two HTTP calls and the lifecycle drain is far slower
    life_orders: int | None = 20_000
    realistic_orders: int = 5_000
    life_rate: float = 1000.0


def _live_runs(plan: MeshBenchPlan, drain_rate: float | None) -> tuple[list[float], str]:
    """The rates of the live runs: the plan's (with ``latency``), plus the API's."""
    rates, note = resolve_rates(plan.rates, drain_rate) if "latency" in plan.parts else ([], "")
    if "api" in plan.parts and plan.api_rate not in rates:
        rates.append(plan.api_rate)
    return rates, note


def bench_mesh(
    settings: Settings,
    plan: MeshBenchPlan,
    *,
    command: str,
    out_dir: Path = Path("bench-results"),
    on_step: Step = _quiet,
) -> dict[str, Any]:
    """Run the parts of ``plan``; returns (and writes to ``out_dir``) the numbers."""
    if plan.db == "sqlite" and any(k > 1 for k in plan.inventory):
        raise ConfigError("more than one inventory instance needs --db postgres")
    record_bytes = mean_record_bytes(plan.skus)
    result: dict[str, Any] = {
        "benchmark": "mesh",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "machine": machine_info(settings),
        "setup": {
            "orders": plan.orders,
            "record_bytes": record_bytes,
            "skus": plan.skus,
            "stock_per_sku": plan.stock,
            "malformed_ratio": plan.malformed_ratio,
            "db": plan.db,
            "inventory_instances": list(plan.inventory),
            "batch_max": settings.batch_max,
            "broker": "the configured cluster" if settings.bootstrap_servers else "local, 1 node",
            "partitions": next(s.partitions for s in SPECS if s.name == ORDERS),
            "warmup_s": plan.warmup_s,
            "window_s": plan.window_s,
            "warm_orders": plan.warm_orders,
            "lifecycle": plan.lifecycle,
            "life_orders": (plan.life_orders or plan.orders) if plan.lifecycle else 0,
            "realistic_orders": plan.realistic_orders if plan.lifecycle else 0,
            "payments_concurrency": settings.payments_concurrency,
        },
        "parts": [p for p in PARTS if p in plan.parts],
        "notes": [],
    }
    on_step("starting a local broker" if not settings.bootstrap_servers else "using the cluster")
    with (
        bench_cluster(settings) as bootstrap,
        tempfile.TemporaryDirectory(prefix="ordermesh-bench-mesh-") as tmp,
    ):
        base = settings.model_copy(update={"bootstrap_servers": bootstrap})
        workdir = Path(tmp)
        drain = functools.partial(
            drain_mesh,
            base,
            workdir=workdir,
            db=plan.db,
            skus=plan.skus,
            stock=plan.stock,
            malformed_ratio=plan.malformed_ratio,
            on_step=on_step,
        )
        if plan.warm_orders:
            # A new broker compiles its hot paths during its first minutes of load: in a
            # first drain of 200,000 orders its JIT compiler threads took more CPU (2.1 s)
            # than its request threads (1.8 s), CPU the services then lacked. Kafka's
            # tools and the mesh alike are measured on a broker past that, as in service.
            on_step(f"warming the broker: the mesh drains {plan.warm_orders:,} orders, untimed")
            warm = drain(orders=plan.warm_orders, label="warm-up")
            result["warm_up"] = {
                key: warm[key] for key in ("orders", "seconds", "orders_per_s", "cpu", "verify")
            }
        if plan.parts & {"kafka", "python"}:
            perf = base.model_copy(update={"topic_prefix": f"bench-perf-{uuid.uuid4().hex[:6]}-"})
            ensure_topics(make_admin(perf), perf)
            if "kafka" in plan.parts:
                on_step(f"Kafka Producer/ConsumerPerformance, {plan.orders:,} records")
                jar_dir = ensure_jars(settings.kafka_jar_dir(), settings.kafka_version)
                result["kafka"] = kafka_reference(
                    perf, jar_dir, records=plan.orders, record_size=record_bytes
                )
            else:
                # the Python loop still needs records to read: the load generator's
                run_load(
                    perf,
                    count=plan.orders,
                    duration=None,
                    rate=None,
                    malformed_ratio=0.0,
                    seed=random_seed(),
                    skus=plan.skus,
                )
            if "python" in plan.parts:
                on_step(f"Python consume({CONSUME_BATCH}) loop, {plan.orders:,} records")
                result["python_consume"] = python_consume(perf, records=plan.orders)
        if "drain" in plan.parts:
            result["drain"] = [
                drain(orders=plan.orders, inventory=count) for count in plan.inventory
            ]
            if plan.lifecycle:
                # right after the reservation-only drain: the machine's noise of the moment
                # weighs on both alike
                from ordermesh.bench.lifecycle import lifecycle_drains

                reference = next(
                    (d for d in result["drain"] if d["inventory_instances"] == 1),
                    result["drain"][0],
                )
                result["lifecycle"] = lifecycle_drains(
                    base,
                    orders=plan.life_orders or plan.orders,
                    realistic_orders=plan.realistic_orders,
                    workdir=workdir,
                    reference=reference,
                    db=plan.db,
                    skus=plan.skus,
                    stock=plan.stock,
                    malformed_ratio=plan.malformed_ratio,
                    on_step=on_step,
                )
        drain_rate = result["drain"][0]["orders_per_s"] if result.get("drain") else None
        rates, note = _live_runs(plan, drain_rate)
        if note:
            result["notes"].append(note)
        latency: list[dict[str, Any]] = []
        for rate in rates:
            measured = latency_run(
                base,
                rate=rate,
                workdir=workdir,
                db=plan.db,
                skus=plan.skus,
                stock=plan.stock,
                malformed_ratio=plan.malformed_ratio,
                warmup_s=plan.warmup_s,
                window_s=plan.window_s,
                api=plan.api_sample if "api" in plan.parts and rate == plan.api_rate else None,
                on_step=on_step,
            )
            if "latency" in plan.parts:
                latency.append(measured["latency"])
            if measured["api"] is not None:
                result["api"] = measured["api"]
        if latency:
            result["latency"] = latency
        if plan.lifecycle and "latency" in plan.parts:
            from ordermesh.bench.lifecycle import compare_latency, lifecycle_latency_run

            life = lifecycle_latency_run(
                base,
                rate=plan.life_rate,
                workdir=workdir,
                db=plan.db,
                skus=plan.skus,
                stock=plan.stock,
                malformed_ratio=plan.malformed_ratio,
                warmup_s=plan.warmup_s,
                window_s=plan.window_s,
                on_step=on_step,
            )
            lifecycle_result = result.setdefault("lifecycle", {})
            lifecycle_result["latency"] = life
            lifecycle_result["latency_vs_reservation_only"] = compare_latency(life, latency)
    result["rows"] = throughput_rows(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"mesh-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    result["file"] = str(path)
    return result
