"""``ordermesh bench``: throughput of the inventory service against its naive baseline.

Both modes run the same ``InventoryService`` through the same ``BatchRunner`` on the same
broker, in one process run, on freshly produced orders:

- ``batched``: msgspec decoding, up to ``settings.batch_max`` messages per poll, one DB
  transaction and one offset commit per batch, outputs acknowledged once per batch;
- ``baseline``: stdlib ``json`` decoding and one message per poll, i.e. one transaction,
  one produce-and-wait and one synchronous offset commit per message (the original
  design's discipline; see ``ordermesh.bench.baseline``).

The rate is records over the time from the first batch to the last commit, so consumer
group joining is not counted. Numbers go to ``bench-results/inventory-<time>.json``.

``bench_inventory_postgres`` (``--db postgres``) measures the batched service with the
SQLite store (1 instance) and with a PostgreSQL store shared by 1, 3, ... instances, each
its own process in one consumer group, on the same order stream. The instances join and
settle on their partitions before the orders are produced (their partitions stay paused
until then), so the time is again first batch (of any instance) to last commit (of any
instance), and the run ends once the group's lag is 0. A local PostgreSQL is started for
each configuration (fresh, as the same order ids come again; durable settings: fsync and
synchronous_commit on, as SQLite runs with ``synchronous=FULL``), then stopped and
purged. Numbers go to ``bench-results/inventory-postgres-<time>.json``, with the CPU
seconds the instances, the PostgreSQL server and the whole machine spent from the gate
to lag 0: on a machine that runs other work too, they tell a configuration that was
slow from one that was starved.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import queue
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, Final, cast

from ordermesh.bench.baseline import StdlibDecoding
from ordermesh.config import Settings
from ordermesh.errors import ConfigError, OrderMeshError
from ordermesh.kafka.admin import ensure_topics
from ordermesh.kafka.client import make_admin, make_consumer
from ordermesh.kafka.lag import group_lag
from ordermesh.kafka.runner import BatchRunner
from ordermesh.loadgen import run_load, sku_name
from ordermesh.services.inventory import InventoryService
from ordermesh.stores.factory import migrate, open_inventory_store
from ordermesh.stores.inventory import (
    AppliedRestock,
    InventoryStore,
    KnownOrder,
    NewCancellation,
    NewOrder,
    OrderOutcome,
    OrderStep,
    Reorder,
    StatusMove,
    StockLevels,
    StockRow,
)
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS, SPECS
from ordermesh.topology import service as service_spec

# the inventory's own fetch tuning, as the service runs it
INVENTORY_FETCH: Final = service_spec("inventory").fetch

log = logging.getLogger(__name__)


@contextmanager
def bench_cluster(settings: Settings) -> Iterator[str]:
    """The configured cluster, or a throwaway local broker on free ports."""
    if settings.bootstrap_servers:
        yield settings.bootstrap_servers
        return
    from ordermesh.broker.local import LocalCluster

    with tempfile.TemporaryDirectory(prefix="ordermesh-bench-") as tmp:
        cluster = LocalCluster.from_settings(settings, root=Path(tmp))
        state, _ = cluster.up(nodes=1)
        try:
            yield state.bootstrap_servers
        finally:
            cluster.down()


def _run_mode(
    base: Settings,
    workdir: Path,
    *,
    mode: str,
    orders: int,
    skus: int,
    batch_max: int,
    pipelined: bool,
    stdlib_json: bool,
) -> dict[str, Any]:
    settings = base.model_copy(
        update={
            "topic_prefix": f"bench-{mode}-{uuid.uuid4().hex[:6]}-",
            # a fresh SQLite file per run (the embedded default): a shared database would
            # already hold the orders of an earlier run under the same ids
            "database_url": None,
            "inventory_db": workdir / f"{mode}.db",
            "batch_max": batch_max,
        }
    )
    ensure_topics(make_admin(settings), settings)
    # the embedded default: one SQLite file, as ``ordermesh up`` runs it
    store = open_inventory_store(settings)
    # plentiful stock: the benchmark measures reservations, not rejections
    store.seed({sku_name(i): 10_000_000 for i in range(1, skus + 1)})
    load = run_load(
        settings, count=orders, duration=None, rate=None, malformed_ratio=0.0, seed=1, skus=skus
    )
    service = InventoryService(
        store,
        orders_topic=settings.topic(ORDERS),
        commands_topic=settings.topic(COMMANDS),
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
    )
    runner = BatchRunner(
        settings,
        group="inventory",
        topics=[settings.topic(ORDERS)],
        handler=StdlibDecoding(service) if stdlib_json else service,
        name=f"bench-{mode}",
        pipelined=pipelined,
        fetch=INVENTORY_FETCH,
    )
    try:
        stats = runner.run(idle_exit_s=2.0)
    finally:
        store.close()
    if stats.first_batch_at is None or stats.last_commit_at is None:
        raise RuntimeError(f"{mode}: nothing was processed")
    seconds = stats.last_commit_at - stats.first_batch_at
    return {
        "orders": stats.records_in,
        "produced": load.acknowledged,
        "seconds": round(seconds, 3),
        "orders_per_s": round(stats.records_in / seconds, 1),
        "batches": stats.batches,
        "commits": stats.commits,
        "handle_s": round(stats.handle_seconds, 3),
        "produce_wait_s": round(stats.produce_seconds, 3),
        "poll_s": round(stats.poll_seconds, 3),
        "reserved": service.stats.reserved,
    }


def bench_inventory(
    settings: Settings,
    *,
    orders: int = 200_000,
    baseline_orders: int = 5_000,
    skus: int = 1000,
    out_dir: Path = Path("bench-results"),
) -> dict[str, Any]:
    """Run both modes in one process run; returns (and writes) the numbers."""
    with bench_cluster(settings) as bootstrap, tempfile.TemporaryDirectory() as tmp:
        base = settings.model_copy(update={"bootstrap_servers": bootstrap})
        workdir = Path(tmp)
        batched = _run_mode(
            base,
            workdir,
            mode="batched",
            orders=orders,
            skus=skus,
            batch_max=settings.batch_max,
            pipelined=True,
            stdlib_json=False,
        )
        baseline = _run_mode(
            base,
            workdir,
            mode="baseline",
            orders=baseline_orders,
            skus=skus,
            batch_max=1,
            pipelined=False,
            stdlib_json=True,
        )
    result = {
        "benchmark": "inventory",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "batched": batched,
        "baseline": baseline,
        "speedup": round(batched["orders_per_s"] / baseline["orders_per_s"], 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"inventory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    result["file"] = str(path)
    return result


def _cpus() -> int:
    return os.cpu_count() or 0


# --- PostgreSQL: N instances in one group over one shared database ---------------------

# a group's instances beyond the partition count of `orders` would only stand by
MAX_INSTANCES: Final = next(spec.partitions for spec in SPECS if spec.name == ORDERS)
# how long the instances may take to start, join and settle on their partitions
JOIN_DEADLINE_S: Final = 120.0
# the group must keep the same split this long before the orders are produced
STABLE_FOR_S: Final = 1.5
# how long the instances report back after the stop
REPORT_DEADLINE_S: Final = 60.0

_Callback = Callable[[Any, list[Any]], None]


class _GatedConsumer:
    """A group consumer whose partitions stay paused until ``gate`` is set.

    Every instance joins the group and settles on its share of the partitions before the
    orders are produced, so no join and no rebalance falls into the measurement. The
    partitions it owns and the records it consumed are counted in arrays shared with the
    bench process (slot ``slot``). Everything else goes to the real consumer.
    """

    def __init__(self, consumer: Any, gate: EventType, slot: int, owned: Any, consumed: Any):
        self._consumer = consumer
        self._gate = gate
        self._slot = slot
        self._owned_counts = owned
        self._consumed_counts = consumed
        self._gate_open = False
        self._owned: set[tuple[str, int]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    def subscribe(
        self, topics: list[str], on_assign: _Callback, on_revoke: _Callback, on_lost: _Callback
    ) -> None:
        def counted(callback: _Callback, *, add: bool) -> _Callback:
            def wrapped(consumer: Any, partitions: list[Any]) -> None:
                callback(consumer, partitions)
                keys = {(p.topic, p.partition) for p in partitions}
                self._owned = self._owned | keys if add else self._owned - keys
                self._owned_counts[self._slot] = len(self._owned)

            return wrapped

        self._consumer.subscribe(
            topics,
            on_assign=counted(on_assign, add=True),
            on_revoke=counted(on_revoke, add=False),
            on_lost=counted(on_lost, add=False),
        )

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        if not self._gate_open:
            # assignments arrive inside consume(): pausing at every call until the gate
            # opens catches each one before any order is produced
            assigned = self._consumer.assignment()
            if self._gate.is_set():
                self._gate_open = True
                if assigned:
                    self._consumer.resume(assigned)
            elif assigned:
                self._consumer.pause(assigned)
        msgs: list[Any] = self._consumer.consume(num_messages=num_messages, timeout=timeout)
        if msgs:
            self._consumed_counts[self._slot] += len(msgs)
        return msgs


class _TimedStore:
    """An ``InventoryStore`` that times its transactions, how long each waited for its row
    locks and how long it held them (PostgreSQL locks a batch's stock rows in the
    transaction's ``load_stock``, queueing behind any other transaction holding one, until
    the commit; a ``load_stock`` outside a transaction locks nothing)."""

    def __init__(self, store: InventoryStore) -> None:
        self._store = store
        self.transactions = 0
        self.transaction_s = 0.0
        self.lock_wait_s = 0.0
        self.lock_hold_s = 0.0
        self._in_transaction = False
        self._locked_at: float | None = None

    @contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        self._locked_at = None
        self._in_transaction = True
        try:
            with self._store.transaction():
                yield
        finally:
            end = time.perf_counter()
            self.transactions += 1
            self.transaction_s += end - start
            if self._locked_at is not None:
                self.lock_hold_s += end - self._locked_at
            self._locked_at = None
            self._in_transaction = False

    def transaction(self) -> AbstractContextManager[None]:
        return self._timed()

    def load_stock(self, skus: Collection[str]) -> dict[str, StockRow]:
        start = time.perf_counter()
        rows = self._store.load_stock(skus)
        if self._in_transaction and self._locked_at is None:
            self._locked_at = time.perf_counter()
            self.lock_wait_s += self._locked_at - start
        return rows

    def load_orders(self, order_ids: Collection[str]) -> dict[str, KnownOrder]:
        return self._store.load_orders(order_ids)

    def update_stock(self, rows: Iterable[StockRow]) -> None:
        self._store.update_stock(rows)

    def insert_orders(self, orders: Iterable[NewOrder]) -> None:
        self._store.insert_orders(orders)

    def update_orders(self, orders: Iterable[NewOrder]) -> None:
        self._store.update_orders(orders)

    def insert_cancellations(self, cancellations: Iterable[NewCancellation]) -> None:
        self._store.insert_cancellations(cancellations)

    def load_steps(self, order_ids: Collection[str]) -> dict[str, tuple[OrderStep, ...]]:
        return self._store.load_steps(order_ids)

    def insert_steps(self, steps: Iterable[OrderStep]) -> None:
        self._store.insert_steps(steps)

    def move_orders(self, moves: Iterable[StatusMove]) -> None:
        self._store.move_orders(moves)

    def applied_restocks(self, restock_ids: Collection[str]) -> set[str]:
        return self._store.applied_restocks(restock_ids)

    def apply_restocks(self, restocks: Iterable[AppliedRestock]) -> None:
        self._store.apply_restocks(restocks)

    def open_reorders(self, skus: Collection[str]) -> set[str]:
        return self._store.open_reorders(skus)

    def insert_reorders(self, reorders: Iterable[Reorder]) -> int:
        return self._store.insert_reorders(reorders)

    def stock_levels(self, sku: str | None = None) -> list[StockLevels]:
        return self._store.stock_levels(sku)

    def stock_totals(self) -> StockLevels:
        return self._store.stock_totals()

    def expired_reservations(self, now: float, limit: int) -> list[tuple[str, float]]:
        return self._store.expired_reservations(now, limit)

    def due_reorders(self, now: float, limit: int) -> list[Reorder]:
        return self._store.due_reorders(now, limit)

    def seed(self, skus: Mapping[str, int]) -> int:
        return self._store.seed(skus)

    def restock(self, sku: str, quantity: int) -> StockRow:
        return self._store.restock(sku, quantity)

    def stock(self, sku: str | None = None) -> list[StockRow]:
        return self._store.stock(sku)

    def movements_total(self) -> dict[str, int]:
        return self._store.movements_total()

    def order_outcomes(self) -> dict[str, OrderOutcome]:
        return self._store.order_outcomes()

    def close(self) -> None:
        self._store.close()


def _instance_main(
    settings: Settings,
    slot: int,
    gate: EventType,
    stop: EventType,
    owned: Any,
    consumed: Any,
    reports: Any,
) -> None:
    """One inventory instance, in its own process: run until ``stop``, report numbers."""
    try:
        store = _TimedStore(open_inventory_store(settings))
        service = InventoryService(
            store,
            orders_topic=settings.topic(ORDERS),
            commands_topic=settings.topic(COMMANDS),
            events_topic=settings.topic(EVENTS),
            dlq_topic=settings.topic(DLQ),
        )
        consumer = _GatedConsumer(
            make_consumer(settings, "inventory", fetch=INVENTORY_FETCH), gate, slot, owned, consumed
        )
        runner = BatchRunner(
            settings,
            group="inventory",
            topics=[settings.topic(ORDERS)],
            handler=service,
            name=f"bench-inventory-{slot}",
            # the runner takes it for the consumer it wraps: same methods, same behaviour
            consumer=cast(Any, consumer),
        )

        cpu_at_gate: list[float] = []

        def stop_when_told() -> None:
            # the gate may never open (the bench failed before): the stop still counts
            while not stop.is_set():
                if gate.wait(0.05):
                    cpu_at_gate.append(time.process_time())
                    break
            stop.wait()
            runner.request_stop()

        threading.Thread(target=stop_when_told, daemon=True).start()
        try:
            stats = runner.run()
        finally:
            store.close()
        cpu_s = time.process_time() - cpu_at_gate[0] if cpu_at_gate else 0.0
        reports.put(
            {
                "slot": slot,
                "records": stats.records_in,
                "first_batch_at": stats.first_batch_at,
                "last_commit_at": stats.last_commit_at,
                "batches": stats.batches,
                "commits": stats.commits,
                "commit_failures": stats.commit_failures,
                "handle_s": round(stats.handle_seconds, 3),
                "produce_wait_s": round(stats.produce_seconds, 3),
                "poll_s": round(stats.poll_seconds, 3),
                "transactions": store.transactions,
                "transaction_s": round(store.transaction_s, 3),
                "lock_wait_s": round(store.lock_wait_s, 3),
                "lock_hold_s": round(store.lock_hold_s, 3),
                "conflict_retries": service.stats.conflicts,
                "reserved": service.stats.reserved,
                # every thread of the process (librdkafka's too), from the gate to the stop
                "cpu_s": round(cpu_s, 3),
            }
        )
    except BaseException as exc:
        reports.put({"slot": slot, "error": f"{type(exc).__name__}: {exc}"})
        raise


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``; Linux only)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    # user, nice, system, (idle, iowait,) irq, softirq; guest time is in user already
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / _clock_ticks()


def _tree_cpu_s(root: int) -> float | None:
    """CPU seconds of process ``root`` (a PostgreSQL postmaster), its live children and
    its reaped ones (``/proc``; Linux only; None if it is gone)."""
    total = 0
    found = False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the command name may hold spaces and parentheses: fields start after the last ")"
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == root:
            found = True
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        elif ppid == root:
            total += int(fields[11]) + int(fields[12])
    return total / _clock_ticks() if found else None


def _cpu_since(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 3)


def _wait_for(
    what: str, deadline_s: float, procs: Sequence[BaseProcess], done: Callable[[], bool]
) -> None:
    """Poll ``done`` until true; OrderMeshError after the deadline or if an instance died."""
    end = time.monotonic() + deadline_s
    while not done():
        dead = [p for p in procs if p.exitcode is not None]
        if dead:
            raise OrderMeshError(
                f"bench: {dead[0].name} exited ({dead[0].exitcode}) while waiting for {what}"
            )
        if time.monotonic() > end:
            raise OrderMeshError(f"bench: no {what} within {deadline_s:.0f}s")
        time.sleep(0.05)


def _settled(owned: Any, instances: int, partitions: int) -> Callable[[], bool]:
    """True once every partition is owned, each instance has some (when there are enough
    partitions) and the split held for ``STABLE_FOR_S``."""
    since: list[float | None] = [None]
    last: list[list[int]] = [[]]

    def check() -> bool:
        counts = list(owned[:])
        even = sum(counts) == partitions and min(counts) > 0
        if not even or counts != last[0]:
            last[0] = counts
            since[0] = time.monotonic() if even else None
            return False
        start = since[0]
        return start is not None and time.monotonic() - start >= STABLE_FOR_S

    return check


def _run_group(
    base: Settings,
    *,
    label: str,
    database_url: str | None,
    sqlite_path: Path,
    instances: int,
    orders: int,
    skus: int,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """``instances`` inventory processes in one group over one database, on fresh topics:
    join and settle, produce ``orders``, open the gate, wait for the group's lag to be 0.

    CPU seconds from the gate to lag 0 are counted for the instances, the PostgreSQL
    server (``server_pid``, its postmaster) and the whole machine (where ``/proc`` is)."""
    settings = base.model_copy(
        update={
            "topic_prefix": f"bench-{label}-{uuid.uuid4().hex[:6]}-",
            "database_url": database_url,
            "inventory_db": sqlite_path,
        }
    )
    ensure_topics(make_admin(settings), settings)
    if database_url is not None:
        migrate(settings)
    store = open_inventory_store(settings)
    try:
        # plentiful stock: the benchmark measures reservations, not rejections
        store.seed({sku_name(i): 10_000_000 for i in range(1, skus + 1)})
    finally:
        store.close()

    # spawn, not fork: the parent already runs librdkafka threads
    ctx = multiprocessing.get_context("spawn")
    gate, stop = ctx.Event(), ctx.Event()
    owned = ctx.Array("i", instances)
    consumed = ctx.Array("q", instances)
    reports: Any = ctx.Queue()
    procs = [
        ctx.Process(
            target=_instance_main,
            args=(settings, slot, gate, stop, owned, consumed, reports),
            name=f"bench {label} instance {slot}",
            daemon=True,
        )
        for slot in range(instances)
    ]
    for proc in procs:
        proc.start()
    results: list[dict[str, Any]] = []
    try:
        partitions = MAX_INSTANCES
        _wait_for("settled group", JOIN_DEADLINE_S, procs, _settled(owned, instances, partitions))
        load = run_load(
            settings,
            count=orders,
            duration=None,
            rate=None,
            malformed_ratio=0.0,
            seed=1,
            skus=skus,
        )
        machine_before = _machine_busy_s()
        server_before = _tree_cpu_s(server_pid) if server_pid is not None else None
        gate.set()
        opened = time.monotonic()
        drain_s = max(120.0, orders / 500)
        _wait_for(
            "consumption of every order",
            drain_s,
            procs,
            lambda: sum(consumed[:]) >= load.acknowledged,
        )
        topics = [settings.topic(ORDERS)]
        _wait_for(
            "group lag 0",
            drain_s,
            procs,
            lambda: not any(group_lag(settings, "inventory", topics).values()),
        )
        lag_zero_s = time.monotonic() - opened
        machine_cpu_s = _cpu_since(machine_before, _machine_busy_s())
        server_cpu_s = _cpu_since(
            server_before, _tree_cpu_s(server_pid) if server_pid is not None else None
        )
    finally:
        stop.set()
        end = time.monotonic() + REPORT_DEADLINE_S
        while len(results) < instances and time.monotonic() < end:
            try:
                results.append(reports.get(timeout=0.5))
            except queue.Empty:
                if all(p.exitcode is not None for p in procs) and reports.empty():
                    break
        for proc in procs:
            proc.join(max(0.1, end - time.monotonic()))
            if proc.is_alive():
                proc.terminate()  # our own child, by its handle
                proc.join(5)
    failed = [r for r in results if "error" in r]
    if failed or len(results) < instances:
        why = failed[0]["error"] if failed else f"{instances - len(results)} instances silent"
        raise OrderMeshError(f"bench {label}: an instance failed: {why}")

    check = open_inventory_store(settings, readonly=True)
    try:
        decided = len(check.order_outcomes())
    finally:
        check.close()
    firsts = [r["first_batch_at"] for r in results if r["first_batch_at"] is not None]
    lasts = [r["last_commit_at"] for r in results if r["last_commit_at"] is not None]
    if not firsts or not lasts:
        raise OrderMeshError(f"bench {label}: nothing was processed")
    seconds = max(lasts) - min(firsts)
    per_instance = []
    for r in sorted(results, key=lambda r: int(r["slot"])):
        own_s = (r["last_commit_at"] or 0.0) - (r["first_batch_at"] or 0.0)
        r["seconds"] = round(own_s, 3)
        r["orders_per_s"] = round(r["records"] / own_s, 1) if own_s > 0 else 0.0
        r["mean_lock_hold_ms"] = (
            round(1000 * r["lock_hold_s"] / r["transactions"], 2) if r["transactions"] else 0.0
        )
        del r["first_batch_at"], r["last_commit_at"]
        per_instance.append(r)
    batches = sum(r["batches"] for r in results)
    records = sum(r["records"] for r in results)
    return {
        "db": "postgres" if database_url is not None else "sqlite",
        "instances": instances,
        "orders": load.acknowledged,
        "records_consumed": records,
        "decided_in_db": decided,
        "seconds": round(seconds, 3),
        "orders_per_s": round(load.acknowledged / seconds, 1),
        "gate_to_lag_zero_s": round(lag_zero_s, 3),
        "load_produce_rate": round(load.rate, 1),
        "batches": batches,
        "mean_batch": round(records / batches, 1) if batches else 0.0,
        "conflict_retries": sum(r["conflict_retries"] for r in results),
        # row locks held (summed over instances) per second of the run: near 1.0, the
        # instances' transactions took turns on shared rows
        "locks_held_per_s": round(sum(r["lock_hold_s"] for r in results) / seconds, 2),
        "lock_wait_s": round(sum(r["lock_wait_s"] for r in results), 3),
        # CPU seconds from the gate to lag 0 (the instances' up to their stop), next to
        # what the machine's cores could give in that time: the rest of the busy time is
        # the broker, this process and whatever else runs on the machine
        "cpu_s": {
            "instances": round(sum(r["cpu_s"] for r in results), 3),
            "postgres": server_cpu_s,
            "machine_busy": machine_cpu_s,
            "machine_capacity": round(lag_zero_s * _cpus(), 3),
        },
        "per_instance": per_instance,
    }


def parse_instances(text: str) -> list[int]:
    """``"1,3"`` -> ``[1, 3]``; ConfigError unless each is 1..MAX_INSTANCES."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"instances {text!r}: expected counts like 1,3") from None
    if not counts:
        raise ConfigError("instances: expected at least one count, like 1,3")
    for count in counts:
        if not 1 <= count <= MAX_INSTANCES:
            raise ConfigError(
                f"instances {count}: expected 1..{MAX_INSTANCES} (the partitions of"
                f" {ORDERS}; more instances would stand by)"
            )
    return counts


def _server_version(bin_dir: Path) -> str:
    """``15.18 (Debian 15.18-0+deb12u1)`` of ``postgres --version``."""
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.strip().removeprefix("postgres (PostgreSQL) ")


def bench_inventory_postgres(
    settings: Settings,
    *,
    orders: int = 200_000,
    skus: int = 1000,
    instances: Sequence[int] = (1, 3),
    command: str = "ordermesh bench inventory --db postgres",
    out_dir: Path = Path("bench-results"),
) -> dict[str, Any]:
    """SQLite with 1 instance, then PostgreSQL with each count of ``instances``, on the
    same order stream in one process run; returns (and writes) the numbers."""
    from ordermesh.postgres.local import LocalPostgres

    rows: list[dict[str, Any]] = []
    with (
        bench_cluster(settings) as bootstrap,
        tempfile.TemporaryDirectory(prefix="ordermesh-bench-") as tmp,
    ):
        base = settings.model_copy(update={"bootstrap_servers": bootstrap})
        workdir = Path(tmp)
        rows.append(
            _run_group(
                base,
                label="sqlite",
                database_url=None,
                sqlite_path=workdir / "sqlite.db",
                instances=1,
                orders=orders,
                skus=skus,
            )
        )
        version = "?"
        for count in instances:
            # a fresh server per configuration: the same order ids go to each
            server = LocalPostgres.from_settings(settings, root=workdir / f"postgres-{count}")
            state, _ = server.up()
            try:
                version = _server_version(server.bin_dir)
                rows.append(
                    _run_group(
                        base,
                        label=f"pg{count}",
                        database_url=state.url(),
                        sqlite_path=workdir / f"unused-{count}.db",
                        instances=count,
                        orders=orders,
                        skus=skus,
                        server_pid=state.pid,
                    )
                )
            finally:
                server.down()
                server.purge()
    sqlite_rate = rows[0]["orders_per_s"]
    pg_rates = {row["instances"]: row["orders_per_s"] for row in rows[1:]}
    ratios: dict[str, float] = {}
    if 1 in pg_rates:
        ratios["postgres_1_vs_sqlite_1"] = round(pg_rates[1] / sqlite_rate, 2)
        for count, rate in pg_rates.items():
            if count != 1:
                ratios[f"postgres_{count}_vs_postgres_1"] = round(rate / pg_rates[1], 2)
    result = {
        "benchmark": "inventory-postgres",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "machine": {
            "cpus": _cpus(),
            "python": platform.python_version(),
            "postgresql": version,
            "platform": platform.platform(),
        },
        "setup": {
            "orders": orders,
            "skus": skus,
            "sku_distribution": "Zipf (ordermesh load), seed 1, the same stream each run",
            "batch_max": settings.batch_max,
            "partitions": MAX_INSTANCES,
            "broker": "the configured cluster" if settings.bootstrap_servers else "local, 1 node",
            "postgresql": "local, durable (fsync on, synchronous_commit on)",
            "sqlite": "one file, WAL, synchronous=FULL",
            "time": "first batch of any instance to the last offset commit of any"
            " instance; instances joined and settled before the orders were produced",
        },
        "runs": rows,
        "ratios": ratios,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"inventory-postgres-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    result["file"] = str(path)
    return result
