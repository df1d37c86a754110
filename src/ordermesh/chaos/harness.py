"""The harness of the fault matrix: one scenario's mesh, its load, its brokers, and the
run that brings a fresh mesh up, applies the scenario's fault, drains and verifies it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from ordermesh.audit import DEFAULT_GRACE_S
from ordermesh.chaos.report import Row, row_from_verify
from ordermesh.config import Settings
from ordermesh.errors import BrokerError, OrderMeshError
from ordermesh.kafka.client import kafka_errors, make_admin
from ordermesh.kafka.lag import group_lag
from ordermesh.kafka.reader import end_offsets
from ordermesh.loadgen import LoadSummary, run_load
from ordermesh.mesh import GATEWAY, Mesh, MeshPlan
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS

log = logging.getLogger(__name__)

# Scarce stock, so that a double reservation or a redelivery decided twice shows up as
# broken conservation or a conflicting outcome instead of hiding in a large surplus.
SKUS: Final = 500
STOCK: Final = 200
RATE: Final = 1500.0
DRAIN_TIMEOUT_S: Final = 120.0
# after the drain, until a whole-life mesh's payments and sweeps are done (Trial.settle)
SETTLE_TIMEOUT_S: Final = 240.0
MID_STREAM_EVENTS: Final = 1500


# --- the running mesh of one scenario ---------------------------------------------------


@dataclass
class LoadRun:
    """``run_load`` in a thread of the chaos process: its acknowledged count is exact."""

    settings: Settings
    count: int
    rate: float
    seed: int
    malformed_ratio: float
    decline_ratio: float = 0.0
    cancel_ratio: float = 0.0
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
                decline_ratio=self.decline_ratio,
                cancel_ratio=self.cancel_ratio,
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
            seed=seed if seed is not None else new_seed(),
            malformed_ratio=(
                self.scenario.malformed_ratio if malformed_ratio is None else malformed_ratio
            ),
            decline_ratio=self.scenario.decline_ratio,
            cancel_ratio=self.scenario.cancel_ratio,
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

    # --- the whole life ----------------------------------------------------------------

    def settle(self, deadline_s: float = SETTLE_TIMEOUT_S) -> bool:
        """Wait, after the drain, until verify has nothing pending (whole-life meshes).

        Lag 0 is not the end of an order's life: payments retries its gateway calls and
        the sweep expires reservations past their offsets, and the audit counts an order
        whose last event is younger than its grace as pending. So first order-events
        stays still for that grace, then verify is asked (a full read) until it agrees.
        """
        from ordermesh.verify import verify

        started = time.monotonic()
        end = started + deadline_s
        quiet_s = DEFAULT_GRACE_S + 2.0
        last, since = -1, time.monotonic()
        while time.monotonic() < end:
            with contextlib.suppress(OrderMeshError), kafka_errors(self.settings):
                now_end = self.topic_end(EVENTS)
                if now_end != last:
                    last, since = now_end, time.monotonic()
                elif time.monotonic() - since >= quiet_s:
                    pending = verify(self.settings).pending
                    if pending == 0:
                        self.note(f"settled {time.monotonic() - started:.0f}s after the drain")
                        return True
                    log.info("chaos %s: %d checks pending", self.scenario.name, pending)
            self.wait(2.0)
        self.problem(f"verify still had pending checks {deadline_s:.0f}s after the drain")
        return False

    def stop_all_but_gateway(self) -> None:
        """SIGTERM every service but the gateway: idle stores, a ledger still answering."""
        self.mesh.stop_inputs()
        sup = self.mesh.supervisor
        for name in list(sup.services):
            if name != GATEWAY and sup.services[name].running():
                sup.stop(name)

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


def new_seed() -> int:
    # below 2**31 keeps order ids short; unique enough within one run
    return int.from_bytes(os.urandom(4), "big") >> 1


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
    # the whole life of an order (the gateway, payments, fulfilment; MeshPlan.lifecycle);
    # False: orders end at their reservation
    lifecycle: bool = False
    # the gateway's fault flags from its start (``ordermesh gateway --help``)
    gateway_faults: tuple[str, ...] = ()
    # the load's share of declining cards and of orders cancelled soon after placing
    decline_ratio: float = 0.0
    cancel_ratio: float = 0.0
    # settings of this scenario's mesh (e.g. a short reservation_ttl_s)
    settings: dict[str, Any] = field(default_factory=dict, hash=False)


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
    if scenario.lifecycle:
        # a free port: another mesh on this machine may hold the default one
        update["gateway_port"] = 0
    settings = base.model_copy(update={**scenario.settings, **update})
    plan = MeshPlan(
        skus=SKUS,
        stock=STOCK,
        api_port=0,
        analytics_port=0,
        lifecycle=scenario.lifecycle,
        gateway_faults=scenario.gateway_faults,
    )
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
        if drained and scenario.lifecycle:
            trial.settle()
        restarts = {n: s.restarts for n, s in mesh.supervisor.services.items() if s.restarts}
        if restarts:
            trial.note(f"restarts: {restarts}")
        if scenario.lifecycle:
            # verify reads the money from the gateway's ledger, over its HTTP API
            trial.stop_all_but_gateway()
        else:
            mesh.stop(stop_broker=False)
        for run in trial.loads:
            if run.error is not None:
                trial.problem(f"load seed {run.seed} failed: {run.error}")
            elif run.summary is not None and run.summary.failed:
                trial.note(f"load seed {run.seed}: {run.summary.failed} records not acknowledged")
        # the mesh's settings: the ports it started on (the gateway's) are in there
        report = verify(trial.settings).as_dict()
        row = row_from_verify(scenario.name, report, trial.acked, trial.expected_violations)
        if report.get("violation_counts"):
            trial.note(f"verify violations: {report['violation_counts']}")
        row.drain_s = drain_s
        row.lifecycle = scenario.lifecycle
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
            or (row.lifecycle and (row.double_charges or not row.money_ok))
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
