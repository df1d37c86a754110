"""The whole mesh on one machine: broker, database, topics, stock, every service, a load.

Used by ``ordermesh up`` (run until Ctrl-C or a duration, then verify), ``ordermesh
simulate`` (the failure scenario) and ``ordermesh top`` (the live numbers alone).
"""

from __future__ import annotations

import json
import logging
import signal
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from ordermesh.broker.local import LocalCluster, free_ports, port_free
from ordermesh.config import Settings
from ordermesh.errors import ConfigError, OrderMeshError, StoreError
from ordermesh.kafka.admin import ensure_topics
from ordermesh.kafka.client import kafka_errors, make_admin
from ordermesh.kafka.lag import group_lag, offsets_snapshot
from ordermesh.kafka.reader import end_offsets
from ordermesh.loadgen import sku_name
from ordermesh.postgres.local import LocalPostgres
from ordermesh.stores.factory import backend, migrate, open_inventory_store
from ordermesh.supervisor import Supervisor
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS
from ordermesh.topology import SERVICES, group_topics, scalable
from ordermesh.verify import held_work

log = logging.getLogger(__name__)

SCALABLE = scalable()
# consumer group -> the topics it reads (names before the prefix)
GROUP_TOPICS = group_topics()
# the groups whose committed offsets mean "processed": drained means these caught up
STATEFUL_GROUP_TOPICS = group_topics(stateful_only=True)
# started by ``start_load`` with its own rate and limits, not with the services
LOAD = "load"
GATEWAY = "gateway"
# what carries an order past its reservation (MeshPlan.lifecycle)
LIFE_SERVICES = (GATEWAY, "payments", "fulfilment")
# How the gateway of `up` misbehaves, so every branch of a payment shows up: a card
# processor's latency, and now and then a call that hangs past the client's timeout
# (not applied) or whose reply is lost (applied), both resolved by looking the key up.
UP_GATEWAY_FAULTS: Final = (
    "--latency-p50-ms",
    "20",
    "--latency-p99-ms",
    "150",
    "--timeout-rate",
    "0.001",
    "--lost-response-rate",
    "0.001",
)
# what puts orders in: stopped first, so the consumers can finish what was accepted
INPUTS = (LOAD, "api")

Db = Literal["sqlite", "postgres"]


def parse_instances(text: str | None) -> dict[str, int]:
    """``inventory=2,tracker=1`` -> {"inventory": 2, "tracker": 1} (defaults: 1 each)."""
    counts = {name: 1 for name in SCALABLE}
    if not text:
        return counts
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name not in SCALABLE:
            raise ConfigError(f"--instances: unknown service {name!r} (scalable: {SCALABLE})")
        try:
            counts[name] = int(value)
        except ValueError:
            raise ConfigError(f"--instances: {part!r} is not name=N") from None
        if not 1 <= counts[name] <= 6:
            raise ConfigError(f"--instances: {name} must be 1..6 (topics have 6 partitions)")
    return counts


def port_or_free(preferred: int) -> int:
    """``preferred`` if it is free on loopback, else (or for 0) any free port."""
    if preferred and port_free(preferred):
        return preferred
    return free_ports(1)[0]


@dataclass
class MeshPlan:
    """What to run. ``db``: SQLite files in the data dir, or PostgreSQL (the configured
    ``database_url``, else a local server); with PostgreSQL every instance gets a data
    dir of its own (``<data_dir>/instances/<name>/``), as if it ran on its own host.
    ``nodes``: Kafka nodes of the local cluster (1 or 3)."""

    instances: dict[str, int] = field(default_factory=lambda: parse_instances(None))
    skus: int = 1000
    stock: int = 100_000
    api_port: int = 8080
    analytics_port: int = 8090
    db: Db = "sqlite"
    nodes: int = 1
    # the whole life of an order (the gateway, payments and fulfilment); False: orders end
    # at their reservation, as a mesh measuring the inventory alone wants
    lifecycle: bool = True
    # the gateway's fault options (``ordermesh gateway --help``)
    gateway_faults: tuple[str, ...] = UP_GATEWAY_FAULTS


def check_plan(plan: MeshPlan, settings: Settings) -> None:
    """ConfigError unless ``plan`` can run with ``settings`` (what ``up`` refuses)."""
    if plan.nodes not in (1, 3):
        raise ConfigError(f"--nodes must be 1 or 3, not {plan.nodes}")
    if plan.nodes != 1 and settings.bootstrap_servers:
        raise ConfigError(
            f"--nodes {plan.nodes} starts a local Kafka cluster, but"
            f" ORDERMESH_BOOTSTRAP_SERVERS={settings.bootstrap_servers} is set"
        )
    if plan.db == "postgres":
        return
    if backend(settings) == "postgres":
        raise ConfigError(
            "--db sqlite, but ORDERMESH_DATABASE_URL names a PostgreSQL database:"
            " pass --db postgres, or unset it"
        )
    # every scalable service keeps state (stock, orders, idempotency keys)
    shared = [f"{name}={n}" for name, n in plan.instances.items() if n > 1]
    if shared:
        raise ConfigError(
            f"--instances {','.join(shared)}: more than one instance of a service that keeps"
            " state needs --db postgres (SQLite files are not shared between hosts)"
        )


class Mesh:
    """Brings the mesh up and down; reports its numbers."""

    def __init__(self, settings: Settings, plan: MeshPlan) -> None:
        self.settings = settings
        self.plan = plan
        self.supervisor = Supervisor(settings)
        self.started_broker = False
        self.cluster: LocalCluster | None = None
        self.started_db = False
        self.database: LocalPostgres | None = None
        # service -> the names of its instances, in start order
        self.instances: dict[str, list[str]] = {}
        self.api_urls: list[str] = []
        self.dashboard_url = ""

    @property
    def api_url(self) -> str:
        """The first API instance's URL ("" before ``start``)."""
        return self.api_urls[0] if self.api_urls else ""

    def _use_settings(self, settings: Settings) -> None:
        # children must find exactly these (brokers, database) whatever their ports
        self.settings = settings
        self.supervisor.settings = settings

    # --- bring up ------------------------------------------------------------------------

    def start(self) -> None:
        """Broker (unless configured), database, topics, stock, and every service."""
        if not self.settings.bootstrap_servers:
            self._start_broker()
        # a configured PostgreSQL is used whatever the plan says (its schema migrated)
        if self.plan.db == "postgres" or backend(self.settings) == "postgres":
            self._start_database()
        settings = self.settings
        ensure_topics(make_admin(settings), settings)
        store = open_inventory_store(settings)
        try:
            store.seed({sku_name(i): self.plan.stock for i in range(1, self.plan.skus + 1)})
        finally:
            store.close()

        # the first instance of an HTTP service gets the planned port, the others free ones
        http_ports = {
            "analytics": self.plan.analytics_port,
            "api": self.plan.api_port,
            "gateway": settings.gateway_port,
        }
        sup = self.supervisor
        for spec in SERVICES:
            if spec.name == LOAD or (spec.name in LIFE_SERVICES and not self.plan.lifecycle):
                continue
            if spec.name == GATEWAY and settings.gateway_url:
                continue  # payments talks to the configured gateway (a real provider's)
            count = self.plan.instances.get(spec.name, 1) if spec.scalable else 1
            names = self.instances.setdefault(spec.name, [])
            for i in range(1, count + 1):
                name = f"{spec.name}-{i}" if spec.scalable else spec.name
                names.append(name)
                env = self._instance_env(name)
                if spec.http:
                    port = port_or_free(http_ports.get(spec.name, 0) if i == 1 else 0)
                    args = [*spec.command, "--port", str(port)]
                    if spec.name == GATEWAY:
                        args += self.plan.gateway_faults
                    sup.add(name, args, env=env)
                    if spec.name == GATEWAY:
                        # every child (payments, verify) reaches the gateway on this port
                        self._use_settings(self.settings.model_copy(update={"gateway_port": port}))
                    elif spec.name == "api":
                        self.api_urls.append(f"http://127.0.0.1:{port}")
                    elif spec.name == "analytics":
                        self.dashboard_url = f"http://127.0.0.1:{port}/"
                else:
                    # every runner serves Prometheus metrics on a port of its own
                    env["ORDERMESH_METRICS_PORT"] = str(port_or_free(0))
                    sup.add(name, list(spec.command), env=env)
        for name in sup.services:
            sup.start(name)
        self.write_state()

    def _start_broker(self) -> None:
        settings, nodes = self.settings, self.plan.nodes
        self.cluster = LocalCluster.from_settings(settings)
        existing = self.cluster.load_state()
        if existing is not None and len(existing.nodes) != nodes:
            raise ConfigError(
                f"a {len(existing.nodes)}-node local Kafka cluster exists in"
                f" {self.cluster.root}; for {nodes} node(s) remove it first"
                " (`ordermesh broker down --purge`)"
            )
        port = settings.broker_port
        last = port + 2 * nodes - 1
        taken = port and not all(port_free(p) for p in range(port, last + 1))
        if taken and existing is None:
            # a new cluster only: an existing one keeps the ports it was formatted with
            log.info("ports %d-%d are taken; the broker takes free ones", port, last)
            port = 0
        state, self.started_broker = self.cluster.up(nodes=nodes, port=port)
        update: dict[str, object] = {"bootstrap_servers": state.bootstrap_servers}
        if state.client_config is not None and settings.command_config is None:
            # a secured local cluster: instances with data dirs of their own would not
            # find its client properties under theirs
            update["command_config"] = Path(state.client_config)
        self._use_settings(settings.model_copy(update=update))

    def _start_database(self) -> None:
        """The configured PostgreSQL, else a local server; then its schema, migrated."""
        settings = self.settings
        if backend(settings) != "postgres":
            self.database = LocalPostgres.from_settings(settings)
            state, self.started_db = self.database.up(port=settings.postgres_port)
            settings = settings.model_copy(update={"database_url": state.url()})
            self._use_settings(settings)
        for line in migrate(settings):
            log.info("migrated %s", line)

    def _client_env(self, name: str) -> dict[str, str]:
        """The process's Kafka clients say which it is (``client.id``, as Kafka's
        ``kafka-consumer-groups --describe`` and the broker's logs show it), unless the
        user set one (a quota or an ACL may be bound to it)."""
        return {} if self.settings.client_id else {"ORDERMESH_CLIENT_ID": f"ordermesh-{name}"}

    def _instance_env(self, name: str) -> dict[str, str]:
        """The ``_client_env``; with PostgreSQL, each instance keeps its files apart, as
        on a host of its own; with SQLite they share the mesh's data dir (and so its
        database files)."""
        env = self._client_env(name)
        if backend(self.settings) != "postgres":
            return env
        data_dir = self.settings.data_dir / "instances" / name
        data_dir.mkdir(parents=True, exist_ok=True)
        return {**env, "ORDERMESH_DATA_DIR": str(data_dir)}

    def _inputs(self) -> list[str]:
        return [name for spec in INPUTS for name in self.instances.get(spec, [spec])]

    def start_load(
        self,
        *,
        rate: float | None,
        duration: float | None,
        count: int | None = None,
        malformed_ratio: float = 0.01,
    ) -> None:
        """Start the load generator: until ``duration``/``count``, or until stopped.

        No ``--seed``: each start (a restart after a crash too) draws a fresh one, so
        its order ids never collide with an earlier run's.
        """
        args = ["load", "--malformed-ratio", str(malformed_ratio), "--skus", str(self.plan.skus)]
        args += ["--rate", str(rate)] if rate else ["--max"]
        if duration is not None:
            args += ["--duration", str(duration)]
        if count is not None:
            args += ["--count", str(count)]
        # a load that ran its count exits 0 and stays done; a crashed one is restarted
        self.supervisor.add(LOAD, args, env=self._client_env(LOAD), restart="on-failure")
        self.supervisor.start(LOAD)
        self.write_state()

    def load_running(self) -> bool:
        load = self.supervisor.services.get("load")
        return load is not None and load.running()

    def write_state(self, live: dict[str, Any] | None = None) -> None:
        """``mesh.json``: where the mesh is, its services and (``live``) its last numbers."""
        self.supervisor.write_state(
            {
                "bootstrap_servers": self.settings.bootstrap_servers,
                "topic_prefix": self.settings.topic_prefix,
                "api_url": self.api_url,
                "api_urls": self.api_urls,
                "dashboard_url": self.dashboard_url,
                "live": live,
            }
        )

    # --- numbers -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The live numbers; raises OrderMeshError while Kafka is not answering (yet)."""
        return mesh_status(self.settings, self.dashboard_url, self.supervisor)

    def drained(self) -> bool:
        """Every stateful group has caught up (False while Kafka does not answer)."""
        groups = {
            g: [self.settings.topic(t) for t in of] for g, of in self.stateful_groups().items()
        }
        read = sorted({t for of in groups.values() for t in of})
        try:
            with kafka_errors(self.settings):
                lags = offsets_snapshot(self.settings, read, groups).lag.values()
        except OrderMeshError as exc:
            log.info("drain check: %s", exc)
            return False
        if not all(v == 0 for v in lags):
            return False
        # payments' and fulfilment's work outlives their offsets: calls due, parcels
        # being packed, events not yet published
        if not self.plan.lifecycle:
            return True
        try:
            return held_work(self.settings) == 0
        except StoreError as exc:
            log.info("drain check: %s", exc)
            return False

    def groups(self) -> dict[str, tuple[str, ...]]:
        """The consumer groups of the services this mesh runs, with their topics."""
        return groups_of(self.instances)

    def stateful_groups(self) -> dict[str, tuple[str, ...]]:
        """The stateful groups of the services this mesh runs, with their topics."""
        return {g: t for g, t in self.groups().items() if g in STATEFUL_GROUP_TOPICS}

    def wait_drained(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.supervisor.check()
            if self.drained():
                return True
            time.sleep(0.5)
        return False

    # --- bring down ------------------------------------------------------------------------

    def stop_inputs(self) -> None:
        """Stop what puts orders in (the load, the API); the consumers keep draining."""
        with _signals_held():
            for name in self._inputs():
                if name in self.supervisor.services:
                    self.supervisor.stop(name)

    def stop_for_verify(self) -> None:
        """Stop every service but the gateway (inputs first): the stores go idle for
        ``verify``, which still asks the gateway for its ledger."""
        with _signals_held():
            inputs = self._inputs()
            rest = [name for name in self.supervisor.services if name not in inputs]
            for name in [*inputs, *rest]:
                if name != GATEWAY and name in self.supervisor.services:
                    self.supervisor.stop(name)

    def stop(
        self, *, stop_broker: bool = True, stop_db: bool | None = None
    ) -> dict[str, int | None]:
        """Stop every service (producers first), then the broker and the database if this
        mesh started them (``stop_db`` None: as ``stop_broker`` says).

        Safe to call again, and on a mesh that started only partly.
        """
        with _signals_held():
            codes = self.supervisor.stop_all(order=self._inputs())
            try:
                if stop_broker and self.started_broker and self.cluster is not None:
                    self.cluster.down()
                    self.started_broker = False
            finally:
                stop_db = stop_broker if stop_db is None else stop_db
                if stop_db and self.started_db and self.database is not None:
                    self.database.down()
                    self.started_db = False
        return codes


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait while children are stopped: an impatient second
    Ctrl-C must not leave any of them behind."""
    held = {
        sig: signal.signal(sig, signal.SIG_IGN)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def _service_of(instance: str) -> str:
    """``inventory-2`` -> ``inventory``: the service an instance name belongs to."""
    base, _, number = instance.rpartition("-")
    return base if number.isdigit() and base else instance


def groups_of(services: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The consumer groups of ``services`` (service names; every group when empty)."""
    names = set(services)
    if not names:
        return dict(GROUP_TOPICS)
    running = {spec.group for spec in SERVICES if spec.name in names}
    return {g: t for g, t in GROUP_TOPICS.items() if g in running}


def fetch_json(url: str, timeout: float = 0.8) -> Any:
    """GET ``url`` as JSON, or None when it does not answer (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def mesh_status(
    settings: Settings, dashboard_url: str, supervisor: Supervisor | None = None
) -> dict[str, Any]:
    """Topic ends, group lag, the analytics snapshot and the services' state.

    Raises OrderMeshError (KafkaUnavailableError when nothing answers) for a Kafka error,
    which while the broker or a group coordinator warms up is transient.
    """
    names = (ORDERS, EVENTS, DLQ, COMMANDS)
    # a mesh's own services' groups: a mesh without payments has no payments lag
    running = [_service_of(name) for name in supervisor.services] if supervisor else []
    groups = {g: [settings.topic(t) for t in of] for g, of in groups_of(running).items()}
    with kafka_errors(settings):
        offsets = offsets_snapshot(settings, [settings.topic(n) for n in names], groups)
    topics = {name: offsets.ends(settings.topic(name)) for name in names}
    lag = offsets.lag
    snapshot = fetch_json(dashboard_url.rstrip("/") + "/snapshot") if dashboard_url else None
    services = {}
    if supervisor is not None:
        services = {
            s.name: {"pid": s.pid, "running": s.running(), "restarts": s.restarts}
            for s in supervisor.services.values()
        }
    return {
        "at": time.time(),
        "topics": topics,
        "lag": lag,
        "analytics": snapshot,
        "services": services,
    }


@dataclass
class SimulationReport:
    phases: list[dict[str, Any]] = field(default_factory=list)
    accepted_during_outage: int = 0
    lag_at_outage_start: int = 0
    lag_peak: int = 0
    drain_seconds: float | None = None
    dlq_entries: int = 0
    verify: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            bool(self.verify.get("ok"))
            and self.accepted_during_outage > 0
            and self.lag_peak > self.lag_at_outage_start
            and self.drain_seconds is not None
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "accepted_during_outage": self.accepted_during_outage,
            "lag_at_outage_start": self.lag_at_outage_start,
            "lag_peak": self.lag_peak,
            "drain_seconds": self.drain_seconds,
            "dlq_entries": self.dlq_entries,
            "phases": self.phases,
            "verify": self.verify,
        }


def simulate(
    mesh: Mesh,
    *,
    rate: float,
    duration: float,
    outage_s: float,
    warmup_s: float = 5.0,
    on_phase: Any = None,
    drain_timeout_s: float = 180.0,
) -> SimulationReport:
    """Crash the inventory under load, restart it, and verify nothing was lost."""
    from ordermesh.verify import verify

    report = SimulationReport()

    def phase(name: str, **numbers: Any) -> None:
        entry = {"phase": name, "t": round(time.monotonic() - t0, 1), **numbers}
        report.phases.append(entry)
        if on_phase is not None:
            on_phase(entry)

    def inventory_lag() -> int:
        topics = [mesh.settings.topic(t) for t in GROUP_TOPICS["inventory"]]
        return sum(group_lag(mesh.settings, "inventory", topics).values())

    def placed() -> int:
        ends = end_offsets(mesh.settings, mesh.settings.topic(ORDERS))
        return sum(high for _low, high in ends.values())

    t0 = time.monotonic()
    mesh.start()
    phase("mesh up", services=len(mesh.supervisor.services), dashboard=mesh.dashboard_url)
    mesh.start_load(rate=rate, duration=duration)
    _wait(mesh, warmup_s)
    phase("load running", placed=placed(), inventory_lag=inventory_lag())

    inventories = [n for n in mesh.supervisor.services if n.startswith("inventory-")]
    for name in inventories:
        mesh.supervisor.stop(name, sig=9)  # SIGKILL: a crash, not a clean stop
    before = placed()
    report.lag_at_outage_start = inventory_lag()
    phase(
        "inventory killed (SIGKILL)",
        instances=len(inventories),
        inventory_lag=report.lag_at_outage_start,
    )
    end = time.monotonic() + outage_s
    while time.monotonic() < end:
        _wait(mesh, min(2.0, max(0.0, end - time.monotonic())))
        lag = inventory_lag()
        report.lag_peak = max(report.lag_peak, lag)
        phase("outage", placed=placed(), inventory_lag=lag)
    report.accepted_during_outage = placed() - before

    for name in inventories:
        mesh.supervisor.start(name)
    restarted_at = time.monotonic()
    phase("inventory restarted", instances=len(inventories))
    while mesh.load_running() and time.monotonic() - restarted_at < drain_timeout_s:
        _wait(mesh, 2.0)
        phase("recovering", placed=placed(), inventory_lag=inventory_lag())
    if mesh.wait_drained(drain_timeout_s):
        report.drain_seconds = round(time.monotonic() - restarted_at, 1)
    phase(
        "drained" if report.drain_seconds is not None else "NOT drained",
        inventory_lag=inventory_lag(),
    )
    report.dlq_entries = sum(
        high for _low, high in end_offsets(mesh.settings, mesh.settings.topic(DLQ)).values()
    )
    mesh.stop_for_verify()
    result = verify(mesh.settings)
    report.verify = result.as_dict()
    phase("verified", ok=result.ok)
    return report


def _wait(mesh: Mesh, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        mesh.supervisor.check()
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
