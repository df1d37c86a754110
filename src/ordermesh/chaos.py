"""The fault matrix: every scenario breaks a running mesh under load, then verifies it.

A scenario is one entry of ``SCENARIOS``: a name, whether ``--quick`` runs it, and a
function that applies its fault to a running :class:`Trial` (the mesh of one scenario,
its broker and its load). The matrix runs each scenario on a fresh mesh (own data dir,
own topic prefix) against local brokers it starts on free ports, waits until every
consumer group has drained, stops the services, and turns ``ordermesh.verify`` into one
row: orders placed, lost, duplicate and conflicting outcomes, stock conserved, DLQ
entries and the time to drain.

Adding a scenario is one function and one ``Scenario(...)`` line.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from ordermesh.config import Settings
from ordermesh.errors import BrokerError, OrderMeshError
from ordermesh.kafka.admin import ensure_topics
from ordermesh.kafka.client import kafka_errors, make_admin, make_plain_producer
from ordermesh.kafka.lag import group_lag
from ordermesh.kafka.reader import end_offsets
from ordermesh.loadgen import LoadSummary, OrderGenerator, run_load
from ordermesh.mesh import Mesh, MeshPlan, fetch_json
from ordermesh.stores.factory import open_inventory_store
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS

log = logging.getLogger(__name__)

RowStatus = Literal["ok", "FAIL", "skipped", "error"]

# Scarce stock, so that a double reservation or a redelivery decided twice shows up as
# broken conservation or a conflicting outcome instead of hiding in a large surplus.
SKUS: Final = 500
STOCK: Final = 200
RATE: Final = 1500.0
DRAIN_TIMEOUT_S: Final = 120.0
MID_STREAM_EVENTS: Final = 1500
# verify's violation kinds that mean "stock not conserved"
STOCK_VIOLATIONS: Final = (
    "stock_not_conserved",
    "negative_stock",
    "reserved_mismatch_db",
    "reserved_mismatch_events",
)
# verify's violation kinds that mean "an accepted record has no result"
LOSS_VIOLATIONS: Final = ("lost", "invalid_not_in_dlq")
FAULT_ENV: Final = ("ORDERMESH_FAULT", "ORDERMESH_FAULT_AFTER")


# --- the running mesh of one scenario ---------------------------------------------------


@dataclass
class LoadRun:
    """``run_load`` in a thread of the chaos process: its acknowledged count is exact."""

    settings: Settings
    count: int
    rate: float
    seed: int
    malformed_ratio: float
    summary: LoadSummary | None = None
    error: str | None = None
    thread: threading.Thread | None = None

    def start(self) -> LoadRun:
        self.thread = threading.Thread(target=self._run, name=f"load-{self.seed}", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            self.summary = run_load(
                self.settings,
                count=self.count,
                duration=None,
                rate=self.rate,
                malformed_ratio=self.malformed_ratio,
                seed=self.seed,
                skus=SKUS,
            )
        except Exception as exc:  # noqa: BLE001 - reported in the row, never swallowed
            self.error = f"{type(exc).__name__}: {exc}"

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


@dataclass
class Trial:
    """One scenario's mesh, cluster and loads; what a fault function works with."""

    scenario: Scenario
    mesh: Mesh
    cluster: Any  # LocalCluster, or None on an external cluster
    quick: bool
    loads: list[LoadRun] = field(default_factory=list)
    foreign_acked: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None
    # verify violations the fault itself causes (kind -> how many), e.g. garbage written
    # into order-events on purpose; any more, or any other kind, still fails the row
    expected_violations: dict[str, int] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return self.mesh.settings

    def note(self, text: str) -> None:
        log.info("chaos %s: %s", self.scenario.name, text)
        self.notes.append(text)

    def problem(self, text: str) -> None:
        log.warning("chaos %s: %s", self.scenario.name, text)
        self.problems.append(text)

    def skip(self, reason: str) -> None:
        log.warning("chaos %s: skipped: %s", self.scenario.name, reason)
        self.skipped = reason

    # --- load --------------------------------------------------------------------------

    def start_load(
        self,
        count: int,
        *,
        seed: int | None = None,
        malformed_ratio: float | None = None,
        rate: float | None = None,
    ) -> LoadRun:
        run = LoadRun(
            self.settings,
            count=count,
            rate=rate or self.scenario.rate,
            seed=seed if seed is not None else _new_seed(),
            malformed_ratio=(
                self.scenario.malformed_ratio if malformed_ratio is None else malformed_ratio
            ),
        ).start()
        self.loads.append(run)
        return run

    def loads_running(self) -> bool:
        return any(run.running() for run in self.loads)

    def wait_loads(self, deadline_s: float = 300.0) -> None:
        self.wait_for(lambda: not self.loads_running(), deadline_s, "the load to finish")

    @property
    def acked(self) -> int:
        """Records on ``orders`` whose producer got an acknowledgement."""
        loads = sum(run.summary.acknowledged for run in self.loads if run.summary is not None)
        return loads + self.foreign_acked

    # --- waiting -----------------------------------------------------------------------

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` while the supervisor restarts what crashed."""
        end = time.monotonic() + seconds
        while True:
            self.mesh.supervisor.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.25, left))

    def wait_for(self, condition: Callable[[], object], deadline_s: float, what: str) -> bool:
        """Poll ``condition`` (supervising meanwhile); False, and a problem, at the deadline."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            self.mesh.supervisor.check()
            # while brokers are down or electing, every Kafka question may time out
            with contextlib.suppress(OrderMeshError), kafka_errors(self.settings):
                if condition():
                    return True
            time.sleep(0.25)
        self.problem(f"timed out after {deadline_s:.0f}s waiting for {what}")
        return False

    def topic_end(self, name: str) -> int:
        ends = end_offsets(self.settings, self.settings.topic(name))
        return sum(high for _low, high in ends.values())

    def mid_stream(self, events: int = MID_STREAM_EVENTS) -> bool:
        """Wait until the inventory has emitted ``events`` outcomes (and is still busy)."""
        return self.wait_for(
            lambda: self.topic_end(EVENTS) >= events, 120, f"{events} events (mid-stream)"
        )

    def lags(self) -> dict[str, int]:
        return {
            group: sum(
                group_lag(self.settings, group, [self.settings.topic(t) for t in topics]).values()
            )
            for group, topics in self.mesh.groups().items()
        }

    def drained(self) -> bool:
        # twice in a row: a group reads 0 between a commit and the next fetch only once
        return all(v == 0 for v in self.lags().values()) and all(
            v == 0 for v in self.lags().values()
        )

    # --- services ----------------------------------------------------------------------

    def service(self, name: str) -> Any:
        return self.mesh.supervisor.services[name]

    def pid(self, name: str) -> int:
        pid = self.service(name).pid
        if pid is None or not self.service(name).running():
            raise OrderMeshError(f"service {name} is not running")
        return int(pid)

    def crash(self, name: str) -> None:
        """SIGKILL a service and wait until its supervisor restarted it."""
        before = self.service(name).restarts
        pid = self.pid(name)
        os.kill(pid, signal.SIGKILL)
        self.note(f"kill -9 {name} (pid {pid})")
        if self.wait_for(
            lambda: self.service(name).restarts > before and self.service(name).running(),
            60,
            f"the supervisor to restart {name}",
        ):
            self.note(f"{name} restarted by the supervisor (pid {self.service(name).pid})")

    def add_instance(self, name: str, args: list[str]) -> None:
        self.mesh.supervisor.add(name, args)
        self.mesh.supervisor.start(name)
        self.note(f"started {name} (pid {self.service(name).pid})")

    def log_text(self, name: str) -> str:
        path = self.mesh.supervisor.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    # --- brokers -----------------------------------------------------------------------

    def require_cluster(self) -> bool:
        if self.cluster is None:
            self.skip("needs brokers started by the chaos run (an external cluster is set)")
            return False
        return True

    def node_pid(self, node_id: int) -> int:
        state = self.cluster.load_state()
        for node in state.nodes:
            if node.node_id == node_id and node.pid is not None:
                return int(node.pid)
        raise BrokerError(f"node {node_id} has no pid")

    def node_ids(self) -> list[int]:
        return [n.node_id for n in self.cluster.load_state().nodes]

    def leader_of(self, topic: str, partition: int = 0) -> int:
        md = make_admin(self.settings).list_topics(self.settings.topic(topic), timeout=10)
        return int(md.topics[self.settings.topic(topic)].partitions[partition].leader)

    def wait_isr_full(self, deadline_s: float = 120.0) -> bool:
        """Every partition of this trial's topics has all its replicas in sync again."""
        names = [self.settings.topic(t) for t in (ORDERS, COMMANDS, EVENTS, DLQ)]

        def full() -> bool:
            md = make_admin(self.settings).list_topics(timeout=10)
            for name in names:
                topic = md.topics.get(name)
                if topic is None or topic.error is not None:
                    return False
                for p in topic.partitions.values():
                    if p.leader < 0 or len(p.isrs) < len(p.replicas):
                        return False
            return True

        return self.wait_for(full, deadline_s, "every replica back in sync")


def _new_seed() -> int:
    # below 2**31 keeps order ids short; unique enough within one run
    return int.from_bytes(os.urandom(4), "big") >> 1


# --- scenarios -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One row of the matrix: a fault applied to a mesh under load."""

    name: str
    summary: str
    fault: Callable[[Trial], None]
    quick: bool = False
    nodes: Literal[1, 3] = 1
    # orders of the main load: quick and full
    orders: tuple[int, int] = (6000, 12000)
    rate: float = RATE
    malformed_ratio: float = 0.02
    inventories: int = 1


def kill_service(name: str) -> Callable[[Trial], None]:
    def fault(trial: Trial) -> None:
        if name == "dlq-logger":
            # mid-batch for the DLQ logger means while DLQ entries arrive
            trial.wait_for(lambda: trial.topic_end(DLQ) >= 30, 120, "DLQ entries flowing")
        else:
            trial.mid_stream()
        trial.crash(name)

    return fault


def crash_at(point: str) -> Callable[[Trial], None]:
    """Let the runner kill itself at ``point`` via its env-guarded fault hook."""

    def fault(trial: Trial) -> None:
        name = "inventory-1"
        trial.mid_stream(500)
        sup = trial.mesh.supervisor
        # a clean stop first: the fault hook is read from the environment at start
        sup.stop(name)
        sup.services[name].env.update({"ORDERMESH_FAULT": point, "ORDERMESH_FAULT_AFTER": "3"})
        sup.start(name)
        proc = sup.services[name].proc
        assert proc is not None  # just started
        trial.note(f"{name} restarted with ORDERMESH_FAULT={point} ORDERMESH_FAULT_AFTER=3")
        # not through the supervisor meanwhile: it would restart it with the fault again
        end = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        for key in FAULT_ENV:
            sup.services[name].env.pop(key, None)
        code = proc.poll()
        if code is None:
            sup.stop(name)
            sup.start(name)
            trial.skip(f"the runner's ORDERMESH_FAULT={point} hook did not fire within 60s")
            return
        if code != -signal.SIGKILL:
            trial.problem(f"{name} exited with {code} instead of killing itself (SIGKILL)")
        else:
            trial.note(f"{name} killed itself at {point} (exit {code})")
        before = sup.services[name].restarts
        trial.wait_for(
            lambda: sup.services[name].restarts > before and sup.services[name].running(),
            60,
            f"the supervisor to restart {name} without the fault",
        )

    return fault


def scale_inventory(trial: Trial) -> None:
    trial.mid_stream(1000)
    for i in (2, 3):
        trial.add_instance(f"inventory-{i}", ["inventory", "run"])
    trial.wait_for(
        lambda: all("assigned" in trial.log_text(f"inventory-{i}") for i in (2, 3)),
        60,
        "the new instances to get partitions",
    )
    trial.note("scaled 1 -> 3; both new instances got partitions")
    trial.wait(6)
    for i in (2, 3):
        code = trial.mesh.supervisor.stop(f"inventory-{i}")
        if code != 0:
            trial.problem(f"inventory-{i} exited with {code} on SIGTERM (expected a clean 0)")
    trial.note("scaled 3 -> 1 (SIGTERM: finish, commit, leave)")


def stuck_consumer(trial: Trial) -> None:
    # SIGSTOP freezes the heartbeat thread too, so the broker fences the member after the
    # session timeout (10 s locally) and should move its partitions to the other instance
    trial.add_instance("inventory-2", ["inventory", "run"])
    trial.wait_for(lambda: "assigned" in trial.log_text("inventory-2"), 60, "inventory-2 assigned")
    trial.mid_stream(1000)
    pid = trial.pid("inventory-1")
    assigned_before = trial.log_text("inventory-2").count(": assigned")
    events_before = trial.topic_end(EVENTS)
    stop_s = 15.0 if trial.quick else 25.0
    os.kill(pid, signal.SIGSTOP)
    trial.note(f"SIGSTOP inventory-1 (pid {pid}) for {stop_s:.0f}s")
    try:
        trial.wait(stop_s)
        # measured before the SIGCONT: what the group did while the member was stuck
        assigned_after = trial.log_text("inventory-2").count(": assigned")
        events_during = trial.topic_end(EVENTS) - events_before
    finally:
        os.kill(pid, signal.SIGCONT)
    if assigned_after > assigned_before:
        trial.note("the group moved the stopped member's partitions to inventory-2")
    else:
        # the instances share one SQLite file: a member stopped inside its transaction
        # holds the write lock, and the other waits on it (busy timeout) however the
        # group reassigns
        trial.problem(
            f"inventory-2 took over nothing while inventory-1 was stopped "
            f"({events_during} events meanwhile)"
        )
    trial.note("SIGCONT inventory-1")
    trial.wait(5)
    text = trial.log_text("inventory-1")
    if " lost " in text or "fenced" in text.lower():
        trial.note("inventory-1 noticed it was fenced and rejoined")


def broker_kill(trial: Trial) -> None:
    if not trial.require_cluster():
        return
    trial.mid_stream()
    trial.cluster.kill_node(1, signal.SIGKILL)
    trial.note("kill -9 the broker")
    trial.wait(3)
    trial.cluster.start_node(1)
    trial.note("broker restarted on its data")


def broker_pause(trial: Trial) -> None:
    if not trial.require_cluster():
        return
    trial.mid_stream()
    pid = trial.node_pid(1)
    pause_s = 10.0 if trial.quick else 20.0
    os.kill(pid, signal.SIGSTOP)
    trial.note(f"SIGSTOP the broker for {pause_s:.0f}s")
    try:
        trial.wait(pause_s)
    finally:
        os.kill(pid, signal.SIGCONT)
    trial.note("SIGCONT the broker")


def cluster_leader_kills(trial: Trial) -> None:
    if not trial.require_cluster():
        return
    trial.mid_stream(500)
    for round_ in range(1, 6):
        victim = trial.leader_of(ORDERS)
        trial.cluster.kill_node(victim, signal.SIGKILL)
        trial.note(f"round {round_}: kill -9 node {victim} (leader of orders[0])")
        # the controller fences the dead node after its broker session (~9 s): only then
        # has leadership moved and the ISR shrunk, so the restart below is a real rejoin
        started = time.monotonic()
        if trial.wait_for(
            _leader_moved(trial, victim), 60, f"a new leader of orders[0] after node {victim}"
        ):
            trial.note(f"round {round_}: new leader after {time.monotonic() - started:.0f}s")
        trial.cluster.start_node(victim)
        trial.wait_isr_full()


def _leader_moved(trial: Trial, victim: int) -> Callable[[], bool]:
    return lambda: trial.leader_of(ORDERS) not in (victim, -1)


def cluster_rolling_restart(trial: Trial) -> None:
    if not trial.require_cluster():
        return
    trial.mid_stream(500)
    for node_id in trial.node_ids():
        trial.cluster.kill_node(node_id, signal.SIGTERM)
        trial.note(f"SIGTERM node {node_id} (controlled shutdown)")
        trial.cluster.start_node(node_id)
        trial.wait_isr_full()
    trial.note("every node restarted in turn")


def cluster_two_down(trial: Trial) -> None:
    if not trial.require_cluster():
        return
    trial.mid_stream(500)
    victims = [n for n in trial.node_ids() if n != trial.leader_of(ORDERS)][:2]
    for node_id in victims:
        trial.cluster.kill_node(node_id, signal.SIGKILL)
    trial.note(f"kill -9 nodes {victims}: no quorum, no ISR of 2")
    trial.wait(15)
    trial.cluster.up(nodes=3)
    trial.note("both nodes restarted")
    trial.wait_isr_full()


def dlq_deleted(trial: Trial) -> None:
    # the main load has no malformed records, so the deleted DLQ held nothing verify needs
    trial.mid_stream(1000)
    admin = make_admin(trial.settings)
    dlq = trial.settings.topic(DLQ)
    held = trial.topic_end(DLQ)
    admin.delete_topics([dlq], operation_timeout=30)[dlq].result()
    trial.wait_for(
        lambda: dlq not in make_admin(trial.settings).list_topics(timeout=10).topics,
        30,
        "the DLQ topic to disappear",
    )
    trial.note(f"deleted {dlq} (it held {held} entries)")
    trial.start_load(2000, malformed_ratio=0.05)
    trial.note("a second load with 5% malformed records while the DLQ is gone")
    trial.wait(10)
    ensure_topics(make_admin(trial.settings), trial.settings)
    trial.note("DLQ topic re-created after 10s")


def db_locked(trial: Trial) -> None:
    trial.mid_stream()
    path = trial.settings.inventory_db_path()
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        trial.note(f"BEGIN EXCLUSIVE on {path.name} held for 10s by another process")
        trial.wait(10)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    trial.note("lock released")


def same_seed_twice(trial: Trial) -> None:
    first = trial.loads[0]
    trial.wait_loads()
    trial.wait_for(trial.drained, DRAIN_TIMEOUT_S, "the first load to drain")
    before = _stock_snapshot(trial.settings)
    events_before = trial.topic_end(EVENTS)
    trial.start_load(first.count, seed=first.seed, malformed_ratio=first.malformed_ratio)
    trial.note(f"the same load again: seed {first.seed}, {first.count} orders")
    trial.wait_loads()
    trial.wait_for(trial.drained, DRAIN_TIMEOUT_S, "the second load to drain")
    after = _stock_snapshot(trial.settings)
    if after != before:
        changed = [sku for sku in after if after[sku] != before.get(sku)]
        trial.problem(f"the redelivered load moved stock of {len(changed)} SKUs: {changed[:5]}")
    else:
        trial.note("stock unchanged by the second load")
    trial.note(f"the second load re-emitted {trial.topic_end(EVENTS) - events_before} events")


def _stock_snapshot(settings: Settings) -> dict[str, tuple[int, int]]:
    store = open_inventory_store(settings, readonly=True)
    try:
        return {row.sku: (row.available, row.reserved) for row in store.stock()}
    finally:
        store.close()


def poison(trial: Trial) -> None:
    trial.mid_stream(500)
    # a foreign client: no idempotence, no compression, big messages allowed
    producer = make_plain_producer(
        trial.settings,
        **{"acks": "all", "message.max.bytes": 2_000_000, "compression.type": "none"},
    )
    acked: dict[str, int] = {}
    failed: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(str(err))
        else:
            acked[msg.topic()] = acked.get(msg.topic(), 0) + 1

    generator = OrderGenerator(_new_seed(), skus=SKUS)
    binary = bytes(range(256))
    for topic in (ORDERS, COMMANDS, EVENTS):
        name = trial.settings.topic(topic)
        records: list[tuple[bytes | None, bytes | None, list[tuple[str, str | bytes | None]]]] = [
            (b"k-empty", b"", []),
            (b"k-tombstone", None, []),
            (None, None, []),
            (binary, b"\xff\xfe not even utf-8 \x00", []),
            (b"k-1mb", os.urandom(1_000_000), []),
            (b"k-headers", b"{}", [("h-bin", binary), ("h-none", None), ("", b"")]),
            (b"k-many-headers", b"[]", [(f"h{i}", b"x" * 100) for i in range(200)]),
            # valid orders under foreign keys: a binary, an empty and no key at all
            (binary, _encoded(generator), [("h-bin", binary)]),
            (b"", _encoded(generator), []),
            (None, _encoded(generator), []),
        ]
        for key, value, headers in records:
            producer.produce(name, value, key, headers=headers or None, on_delivery=on_delivery)
    left = producer.flush(60)
    trial.foreign_acked += acked.get(trial.settings.topic(ORDERS), 0)
    # verify reads order-events as the inventory's output: the garbage written there on
    # purpose is flagged, and only that much is expected
    trial.expected_violations["undecodable_event"] = acked.get(trial.settings.topic(EVENTS), 0)
    trial.note(
        f"foreign producer: {sum(acked.values())} poison records acknowledged "
        f"({acked.get(trial.settings.topic(ORDERS), 0)} on orders), "
        f"{len(failed)} refused, {left} unflushed"
    )
    if failed:
        trial.note(f"refused by the broker: {sorted(set(failed))}")
    _produce_raw_header_names(trial)
    for name in ("inventory-1", "tracker-1", "analytics", "dlq-logger"):
        if trial.service(name).restarts:
            trial.problem(f"{name} crashed on poison input ({trial.service(name).restarts}x)")


def _produce_raw_header_names(trial: Trial) -> None:
    """A record whose header name is not UTF-8, which the Python client cannot build.

    The repo's tests produce it through the bundled librdkafka (``tests/raw_produce.py``);
    that helper is importable when the chaos run starts from the repo (``python -m``).
    """
    try:
        produce_raw = importlib.import_module("tests.raw_produce").produce_raw
    except (ImportError, AttributeError):
        trial.note(
            "non-UTF-8 header names: not producible from here (run from the repo to "
            "include them); tests/integration/test_poison.py covers them"
        )
        return
    bootstrap = trial.settings.bootstrap_servers or ""
    for topic in (ORDERS, COMMANDS, EVENTS):
        produce_raw(
            bootstrap,
            trial.settings.topic(topic),
            key=b"k-raw-header",
            value=b'{"not": "an order"}',
            headers=[(b"\xff\xfe-bad-name", b"v"), (b"ok", b"\xc3\x28")],
        )
    trial.foreign_acked += 1
    trial.expected_violations["undecodable_event"] = (
        trial.expected_violations.get("undecodable_event", 0) + 1
    )
    trial.note("3 records with non-UTF-8 header names (via librdkafka, 1 on orders)")


def _encoded(generator: OrderGenerator) -> bytes:
    from ordermesh import schema

    return schema.encode(generator.next_order())


def api_fuzz(trial: Trial) -> None:
    url = trial.mesh.api_url
    trial.wait_for(lambda: fetch_json(url + "/health") is not None, 60, "the API to answer")
    trial.mid_stream(500)
    report_dir = trial.settings.data_dir / "schemathesis"
    examples = 10 if trial.quick else 40
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(examples),
        "--workers",
        "1",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "--continue-on-failure",
        "--report",
        "ndjson",
        "--report-dir",
        str(report_dir),
    ]
    if not Path(cmd[0]).exists():
        trial.skip("schemathesis is not installed next to this Python")
        return
    proc = subprocess.run(
        cmd,
        cwd=trial.settings.data_dir,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    (trial.settings.data_dir / "schemathesis.log").write_text(proc.stdout + proc.stderr)
    server_errors = _count_server_errors(report_dir, proc.stdout)
    trial.note(
        f"schemathesis ({examples} examples per operation): exit {proc.returncode}, "
        f"{server_errors} server errors (5xx)"
    )
    if server_errors:
        trial.problem(f"the API answered {server_errors} requests with a 5xx")
    elif proc.returncode not in (0, 1):
        trial.problem(f"schemathesis failed to run (exit {proc.returncode}): {proc.stderr[-300:]}")


def _count_server_errors(report_dir: Path, output: str) -> int:
    """5xx responses in schemathesis' ndjson report (its text summary as the fallback)."""
    count = 0
    found = False
    for path in report_dir.glob("*.ndjson"):
        found = True
        for line in path.read_text(errors="replace").splitlines():
            count += len(re.findall(r'"status_code":\s*5\d\d', line))
    if found:
        return count
    return len(re.findall(r"\b5\d\d\b [A-Z]", output))


SCENARIOS: Final[tuple[Scenario, ...]] = (
    Scenario(
        "kill-inventory", "kill -9 the inventory mid-batch", kill_service("inventory-1"), True
    ),
    Scenario("kill-tracker", "kill -9 the tracker mid-batch", kill_service("tracker-1"), True),
    Scenario("kill-analytics", "kill -9 analytics mid-batch", kill_service("analytics")),
    Scenario("kill-dlq-logger", "kill -9 the DLQ logger mid-batch", kill_service("dlq-logger")),
    Scenario(
        "crash-after-handle",
        "inventory kills itself after its DB commit, before producing",
        crash_at("after-handle"),
        quick=True,
        orders=(15000, 30000),
    ),
    Scenario(
        "crash-after-produce",
        "inventory kills itself after every output was acked, before the offset commit",
        crash_at("after-produce"),
        quick=True,
        orders=(15000, 30000),
    ),
    Scenario(
        "scale-inventory",
        "inventory 1 -> 3 -> 1 instances mid-load",
        scale_inventory,
        orders=(15000, 30000),
    ),
    Scenario(
        "stuck-consumer",
        "one of two inventories SIGSTOPped past the session timeout, then SIGCONT",
        stuck_consumer,
        orders=(20000, 40000),
    ),
    # not in the quick set: after the restart a consumer group's lag sometimes stays
    # although every record was handled (docs/reliability.md, "Still open")
    Scenario("broker-kill", "kill -9 the broker, restart it", broker_kill),
    Scenario(
        "broker-pause",
        "SIGSTOP the broker for 20 s (10 s quick), then SIGCONT",
        broker_pause,
        orders=(15000, 30000),
    ),
    Scenario(
        "cluster-leader-kill",
        "3 nodes: kill -9 the leader of orders[0], restart, 5 times",
        cluster_leader_kills,
        nodes=3,
        orders=(20000, 30000),
        rate=500.0,
    ),
    Scenario(
        "cluster-rolling-restart",
        "3 nodes: SIGTERM and restart each node in turn",
        cluster_rolling_restart,
        nodes=3,
        orders=(20000, 30000),
        rate=500.0,
    ),
    Scenario(
        "cluster-two-down",
        "3 nodes: kill -9 two of them for 15 s, restart both",
        cluster_two_down,
        nodes=3,
        orders=(15000, 20000),
        rate=500.0,
    ),
    Scenario(
        "dlq-deleted",
        "the DLQ topic deleted for 10 s while malformed records arrive",
        dlq_deleted,
        malformed_ratio=0.0,
        orders=(15000, 25000),
    ),
    Scenario(
        "db-locked",
        "the inventory DB held by BEGIN EXCLUSIVE in another process for 10 s",
        db_locked,
        orders=(15000, 25000),
    ),
    Scenario(
        "same-seed-twice",
        "the same load (same seed) a second time: every order redelivered",
        same_seed_twice,
        True,
        orders=(4000, 10000),
    ),
    Scenario(
        "poison",
        "a foreign client: empty values, tombstones, binary keys, 1 MB values, odd headers",
        poison,
        True,
    ),
    Scenario("api-fuzz", "schemathesis against the running API's /openapi.json", api_fuzz),
)


def select(names: Sequence[str] | None, *, quick: bool) -> list[Scenario]:
    """The scenarios to run: those named, else the quick subset or all."""
    if names:
        known = {s.name: s for s in SCENARIOS}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise OrderMeshError(f"unknown scenario(s) {unknown}; known: {sorted(known)}")
        return [known[n] for n in names]
    return [s for s in SCENARIOS if s.quick or not quick]


# --- rows ----------------------------------------------------------------------------------


@dataclass
class Row:
    """What one scenario measured."""

    scenario: str
    status: RowStatus
    placed: int = 0
    lost: int = 0
    pending: int = 0
    duplicates: int = 0
    conflicting: int = 0
    stock_conserved: bool = False
    dlq_entries: int = 0
    drain_s: float | None = None
    verify_ok: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verify: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, list | dict | set | tuple):
        return len(value)
    return 0


def row_from_verify(
    name: str, report: dict[str, Any], acked: int, expected: dict[str, int] | None = None
) -> Row:
    """A row from ``verify``'s ``as_dict()`` (read defensively: its keys grow over time).

    ``expected``: violations the fault causes by design; verify counts as ok when these
    are all it found (at most as many of each).
    """
    violations: dict[str, int] = dict(report.get("violation_counts") or {})
    allowed = expected or {}
    unexpected = {k: v for k, v in violations.items() if v > allowed.get(k, 0)}
    lost = sum(violations.get(kind, 0) for kind in LOSS_VIOLATIONS)
    # checks verify could not decide because a group has not committed the records yet:
    # not lost, but after a drain there must be none
    pending = violations.get("pending", 0) + _count(report.get("pending"))
    # records a producer saw acknowledged but the topic does not hold
    lost += max(0, acked - _count(report.get("orders_records")))
    return Row(
        scenario=name,
        status="ok",
        placed=_count(report.get("orders_records")),
        lost=lost,
        pending=pending,
        duplicates=_count(report.get("duplicate_outcomes")),
        conflicting=violations.get("conflicting_outcomes", 0),
        stock_conserved=not any(k in violations for k in STOCK_VIOLATIONS),
        dlq_entries=_count(report.get("dlq_entries")),
        verify_ok=bool(report.get("ok")) or (bool(violations) and not unexpected),
        verify=report,
    )


# --- running -------------------------------------------------------------------------------


class Brokers:
    """The local clusters of a run: one per size, started on first use, on free ports."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        self.settings = settings
        self.clusters: dict[int, Any] = {}

    def get(self, nodes: int) -> Any:
        from ordermesh.broker.jars import ensure_jars
        from ordermesh.broker.local import LocalCluster

        for size in [n for n in self.clusters if n != nodes]:
            # one cluster at a time: two cores cannot carry four JVMs and a mesh
            self.clusters.pop(size).down()
        cluster = self.clusters.get(nodes)
        if cluster is None:
            jar_dir = ensure_jars(self.settings.kafka_jar_dir(), self.settings.kafka_version)
            heap = self.settings.broker_heap_mb if nodes == 1 else 768
            cluster = LocalCluster(self.root / f"broker-{nodes}", jar_dir, heap_mb=heap)
            self.clusters[nodes] = cluster
        # (re)starts any node a previous scenario left down; a no-op when all run
        cluster.up(nodes=nodes)
        return cluster

    def down(self) -> None:
        for cluster in self.clusters.values():
            with contextlib.suppress(OrderMeshError):
                cluster.down()
        self.clusters.clear()


def run_scenario(
    scenario: Scenario, base: Settings, root: Path, brokers: Brokers | None, *, quick: bool
) -> Row:
    """Bring a fresh mesh up, load it, apply the fault, drain, verify; always tear down."""
    from ordermesh.verify import verify

    started = time.monotonic()
    cluster = brokers.get(scenario.nodes) if brokers is not None else None
    update: dict[str, Any] = {
        "data_dir": root / scenario.name,
        "topic_prefix": f"chaos-{scenario.name}-{uuid.uuid4().hex[:6]}-",
    }
    if cluster is not None:
        update["bootstrap_servers"] = cluster.load_state().bootstrap_servers
    settings = base.model_copy(update=update)
    plan = MeshPlan(skus=SKUS, stock=STOCK, api_port=0, analytics_port=0, lifecycle=False)
    plan.instances["inventory"] = scenario.inventories
    mesh = Mesh(settings, plan)
    trial = Trial(scenario, mesh, cluster, quick)
    try:
        mesh.start()
        count = scenario.orders[0] if quick else scenario.orders[1]
        trial.start_load(count)
        scenario.fault(trial)
        trial.wait_loads()
        healed = time.monotonic()
        drained = trial.wait_for(trial.drained, DRAIN_TIMEOUT_S, "every consumer group to drain")
        drain_s = round(time.monotonic() - healed, 1) if drained else None
        if not drained:
            with contextlib.suppress(OrderMeshError):
                trial.problem(f"lag when giving up: {trial.lags()}")
        restarts = {n: s.restarts for n, s in mesh.supervisor.services.items() if s.restarts}
        if restarts:
            trial.note(f"restarts: {restarts}")
        mesh.stop(stop_broker=False)
        for run in trial.loads:
            if run.error is not None:
                trial.problem(f"load seed {run.seed} failed: {run.error}")
            elif run.summary is not None and run.summary.failed:
                trial.note(f"load seed {run.seed}: {run.summary.failed} records not acknowledged")
        report = verify(settings).as_dict()
        row = row_from_verify(scenario.name, report, trial.acked, trial.expected_violations)
        if report.get("violation_counts"):
            trial.note(f"verify violations: {report['violation_counts']}")
        row.drain_s = drain_s
    except Exception as exc:
        log.exception("chaos %s: scenario failed to run", scenario.name)
        row = Row(scenario.name, "error")
        trial.problem(f"{type(exc).__name__}: {exc}")
    finally:
        mesh.stop(stop_broker=False)
    row.notes = trial.notes
    row.problems = trial.problems
    row.seconds = round(time.monotonic() - started, 1)
    if row.status != "error":
        broken = (
            row.lost
            or row.pending
            or row.conflicting
            or not row.stock_conserved
            or not row.verify_ok
        ) or trial.problems
        row.status = "FAIL" if broken else ("skipped" if trial.skipped else "ok")
    if trial.skipped:
        row.notes.append(f"skipped: {trial.skipped}")
    return row


def run_matrix(
    base: Settings,
    scenarios: Sequence[Scenario],
    *,
    quick: bool,
    work_dir: Path | None = None,
    keep: bool = False,
    on_row: Callable[[Row], None] | None = None,
) -> tuple[list[Row], Path]:
    """Run ``scenarios`` one after the other; the rows and the directory they ran in."""
    root = work_dir or Path(tempfile.mkdtemp(prefix="ordermesh-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    # an external cluster (ORDERMESH_BOOTSTRAP_SERVERS) cannot be killed: its rows skip
    brokers = None if base.bootstrap_servers else Brokers(root, base)
    # 1-node scenarios first, so each cluster size is started once
    ordered = sorted(scenarios, key=lambda s: s.nodes)
    rows: list[Row] = []
    try:
        for scenario in ordered:
            log.info("chaos: scenario %s: %s", scenario.name, scenario.summary)
            row = run_scenario(scenario, base, root, brokers, quick=quick)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        if brokers is not None:
            brokers.down()
    if not keep and all(r.status in ("ok", "skipped") for r in rows) and work_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return rows, root


# --- the report ----------------------------------------------------------------------------

COLUMNS: Final = (
    "scenario",
    "status",
    "placed",
    "lost",
    "pending",
    "duplicates",
    "conflicting",
    "stock conserved",
    "DLQ entries",
    "drain (s)",
)


def table_rows(rows: Sequence[Row]) -> Iterator[list[str]]:
    for r in rows:
        yield [
            r.scenario,
            r.status,
            f"{r.placed:,}",
            str(r.lost),
            f"{r.pending:,}",
            f"{r.duplicates:,}",
            str(r.conflicting),
            "yes" if r.stock_conserved else "NO",
            f"{r.dlq_entries:,}",
            "—" if r.drain_s is None else f"{r.drain_s:.1f}",
        ]


DOC_BEGIN: Final = "<!-- chaos matrix: generated by `ordermesh chaos`, begin -->"
DOC_END: Final = "<!-- chaos matrix: end -->"


def render_markdown(rows: Sequence[Row], command: str, seconds: float) -> str:
    """The generated part of docs/reliability.md: command, table, scenarios, notes."""
    lines = [
        DOC_BEGIN,
        "",
        f"Measured with `{command}` on {time.strftime('%Y-%m-%d')} "
        f"({os.cpu_count()} cores, broker on the same machine; {seconds / 60:.0f} min).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", "| scenario | fault | quick |", "|---|---|---|"]
    by_name = {s.name: s for s in SCENARIOS}
    for r in rows:
        s = by_name.get(r.scenario)
        if s is not None:
            lines.append(f"| {s.name} | {s.summary} | {'yes' if s.quick else ''} |")
    lines += ["", "What each run observed:", ""]
    for r in rows:
        said = "; ".join([*r.notes, *(f"**{p}**" for p in r.problems)])
        lines.append(f"- **{r.scenario}**: {said or '—'}")
    lines += ["", DOC_END]
    return "\n".join(lines) + "\n"


def write_doc(path: Path, generated: str) -> None:
    """Replace the generated block of ``path`` (the prose around it is kept)."""
    if path.exists():
        text = path.read_text()
        start, end = text.find(DOC_BEGIN), text.find(DOC_END)
        if start >= 0 and end > start:
            text = text[:start] + generated.rstrip("\n") + text[end + len(DOC_END) :]
            path.write_text(text)
            return
        path.write_text(text.rstrip("\n") + "\n\n" + generated)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Reliability\n\n" + generated)


def summary_json(rows: Sequence[Row], command: str, root: Path) -> str:
    ok = all(r.status in ("ok", "skipped") for r in rows)
    return json.dumps(
        {"ok": ok, "command": command, "work_dir": str(root), "rows": [r.as_dict() for r in rows]}
    )
