"""Start, stop and inspect a local 1- or 3-node Kafka cluster in KRaft mode.

Each node is a combined broker+controller JVM process started from the cached jars. A
cluster lives in one directory::

    <root>/cluster.json          nodes, ports, pids, cluster id, bootstrap servers, security
    <root>/node-<i>/server.properties, log4j2.properties, kafka.log, data/
    <root>/client.properties     with ``--security scram-tls``: how clients connect
    <root>/tls/                  with ``--security scram-tls``: CA (PEM), broker keystore

With ``scram-tls`` the clients' listener is SASL_SSL (SCRAM-SHA-512 users created when the
nodes are formatted, a certificate signed by a CA made for this cluster), and so is the
traffic between brokers, which uses the same listener: no port of the cluster serves
records without a password. The KRaft controller listener stays PLAINTEXT on loopback; it
carries the quorum's metadata only.

Only PIDs recorded in ``cluster.json`` are ever signalled, and only after checking that
the process is still the Kafka node we started (PIDs get reused).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ordermesh.broker.jars import ensure_jars
from ordermesh.broker.tls import Security, SecurityFiles, make_security, write_private
from ordermesh.config import Settings, read_client_properties
from ordermesh.errors import BrokerError

log = logging.getLogger(__name__)

START_DEADLINE_S = 90.0
STOP_DEADLINE_S = 30.0

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.controller.name = org.apache.kafka.controller
logger.controller.level = INFO
"""


@dataclass
class NodeState:
    node_id: int
    port: int
    controller_port: int
    pid: int | None = None


@dataclass
class ClusterState:
    cluster_id: str
    nodes: list[NodeState] = field(default_factory=list)
    security: Security = "none"
    # the properties file clients need (``scram-tls``); None: plaintext
    client_config: str | None = None

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client_conf(self) -> dict[str, Any]:
        """librdkafka settings that reach this cluster (bootstrap and, when secured, the
        properties of ``client_config``)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        if self.client_config is not None:
            conf.update(read_client_properties(Path(self.client_config)))
        return conf


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on loopback right now."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    """True if ``port`` can be bound on loopback right now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_run(count: int, attempts: int = 100) -> int:
    """The first of ``count`` consecutive ports free on loopback right now: what
    ``broker up --port`` takes (each node its port and the next, for its controller)."""
    for _ in range(attempts):
        first = free_ports(1)[0]
        if first + count - 1 <= 65535 and all(
            port_free(p) for p in range(first + 1, first + count)
        ):
            return first
    raise BrokerError(f"found no {count} consecutive free ports on loopback")


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's own ``Uuid.randomUuid()``, never one that starts with ``-``: command
    line tools would read it as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); treat it as dead
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class LocalCluster:
    """A local KRaft cluster rooted at ``root``, run from the jars in ``jar_dir``."""

    def __init__(self, root: Path, jar_dir: Path, *, heap_mb: int = 1024) -> None:
        self.root = root
        self.jar_dir = jar_dir
        self.heap_mb = heap_mb
        # Popen objects of the nodes this object started: kept so they are reaped, not leaked
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, root: Path | None = None) -> LocalCluster:
        """The local cluster of ``settings`` (rooted at ``root``, default its broker dir),
        its jars fetched with Maven first if they are not cached yet."""
        jar_dir = ensure_jars(settings.kafka_jar_dir(), settings.kafka_version)
        return cls(root or settings.broker_dir(), jar_dir, heap_mb=settings.broker_heap_mb)

    # --- state -----------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.root / "cluster.json"

    def node_dir(self, node_id: int) -> Path:
        return self.root / f"node-{node_id}"

    def load_state(self) -> ClusterState | None:
        if not self.state_file.exists():
            return None
        try:
            raw = json.loads(self.state_file.read_text())
            nodes = [NodeState(**n) for n in raw["nodes"]]
            return ClusterState(
                cluster_id=raw["cluster_id"],
                nodes=nodes,
                security=raw.get("security", "none"),
                client_config=raw.get("client_config"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BrokerError(f"unreadable cluster state {self.state_file}: {exc}") from exc

    def _save_state(self, state: ClusterState) -> None:
        payload = {
            "cluster_id": state.cluster_id,
            "bootstrap_servers": state.bootstrap_servers,
            "security": state.security,
            "client_config": state.client_config,
            "nodes": [asdict(n) for n in state.nodes],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(self.state_file)

    def _is_our_process(self, node: NodeState) -> bool:
        if node.pid is None or not pid_alive(node.pid):
            return False
        try:
            cmdline = Path(f"/proc/{node.pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        return "kafka.Kafka" in cmdline and str(self.node_dir(node.node_id)) in cmdline

    def running_nodes(self) -> list[NodeState]:
        state = self.load_state()
        if state is None:
            return []
        return [n for n in state.nodes if self._is_our_process(n)]

    # --- start -----------------------------------------------------------------------

    def up(
        self, nodes: int = 1, port: int | None = None, security: Security | None = None
    ) -> tuple[ClusterState, bool]:
        """Format and start a cluster; returns (state, started). Idempotent.

        ``security``: ``none`` (plaintext) or ``scram-tls`` for a new cluster; an existing
        one keeps what it was formatted with (None: whatever that is).
        """
        if nodes not in (1, 3):
            raise BrokerError(f"--nodes must be 1 or 3, not {nodes}")
        state = self.load_state()
        if state is not None and security is not None and security != state.security:
            raise BrokerError(
                f"the local cluster in {self.root} was formatted with security"
                f" {state.security}, not {security}; remove it first"
                " (`ordermesh broker down --purge`)"
            )
        if state is not None:
            alive = [n for n in state.nodes if self._is_our_process(n)]
            if len(alive) == len(state.nodes):
                return state, False
            # restart the nodes that are not running on their existing data (a stale
            # pid is simply replaced); the cluster id and every topic survive
            for node in state.nodes:
                if node not in alive:
                    if node.pid is not None:
                        log.info("node %d: pid %d is gone (stale)", node.node_id, node.pid)
                    self._start_node(state, node)
            self._save_state(state)
            self.wait_ready(state)
            return state, True
        # port None or 0: any free ports
        ports = [port + i for i in range(2 * nodes)] if port else free_ports(2 * nodes)
        taken = [p for p in ports if not port_free(p)] if port else []
        if taken:
            # said before the JVM starts, rather than as its bind error
            raise BrokerError(
                f"port {taken[0]} on 127.0.0.1 is in use: a {nodes}-node cluster from port"
                f" {port} takes ports {port}-{ports[-1]} (each node's port and the next, for"
                " its controller); choose another --port"
            )
        state = ClusterState(
            cluster_id=new_cluster_id(),
            nodes=[NodeState(i + 1, ports[2 * i], ports[2 * i + 1]) for i in range(nodes)],
            security=security or "none",
        )
        self.root.mkdir(parents=True, exist_ok=True)
        secured: SecurityFiles | None = None
        if state.security == "scram-tls":
            secured = make_security(self.root / "tls")
            state.client_config = str(secured.client_config)
        for node in state.nodes:
            self._format_node(state, node, secured)
        try:
            for node in state.nodes:
                self._start_node(state, node)
            self._save_state(state)
            self.wait_ready(state)
        except BrokerError:
            self.down()
            raise
        return state, True

    def purge(self) -> None:
        """Delete the cluster's data; only when no node of it runs."""
        if self.running_nodes():
            raise BrokerError("cluster is running; stop it before purging its data")
        self._clean()

    def _clean(self) -> None:
        for child in self.root.glob("node-*"):
            shutil.rmtree(child, ignore_errors=True)
        shutil.rmtree(self.root / "tls", ignore_errors=True)
        (self.root / "client.properties").unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)

    def _properties(
        self, state: ClusterState, node: NodeState, secured: SecurityFiles | None = None
    ) -> str:
        n = len(state.nodes)
        rf = min(3, n)
        voters = ",".join(f"{x.node_id}@127.0.0.1:{x.controller_port}" for x in state.nodes)
        data = self.node_dir(node.node_id) / "data"
        # clients and brokers share one listener, named after its protocol
        listener = "SASL_SSL" if secured is not None else "PLAINTEXT"
        props: dict[str, object] = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"{listener}://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"{listener}://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": f"{listener}:{listener},CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": listener,
            "log.dirs": data,
            "num.partitions": 6,
            "default.replication.factor": rf,
            "min.insync.replicas": 1,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": 12,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": min(2, n),
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": min(2, n),
            "auto.create.topics.enable": "false",
            "unclean.leader.election.enable": "false",
            # tests start many groups; no point waiting for late joiners on a laptop
            "group.initial.rebalance.delay.ms": 0,
            # KIP-848 groups keep a crashed member's partitions for the session timeout
            # (default 45 s): a restarted service would sit idle that long. 10 s bounds the
            # recovery after a kill -9; heartbeats every 2 s keep live members well inside.
            "group.consumer.min.session.timeout.ms": 6000,
            "group.consumer.session.timeout.ms": 10000,
            "group.consumer.min.heartbeat.interval.ms": 1000,
            "group.consumer.heartbeat.interval.ms": 2000,
            "num.network.threads": 3,
            "num.io.threads": 4,
            "log.segment.bytes": 256 * 1024 * 1024,
            "log.retention.hours": 168,
        }
        if secured is not None:
            props.update(secured.broker_properties())
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _format_node(
        self, state: ClusterState, node: NodeState, secured: SecurityFiles | None = None
    ) -> None:
        ndir = self.node_dir(node.node_id)
        (ndir / "data").mkdir(parents=True, exist_ok=True)
        text = self._properties(state, node, secured)
        if secured is not None:
            write_private(ndir / "server.properties", text)  # it holds the broker's password
        else:
            (ndir / "server.properties").write_text(text)
        (ndir / "log4j2.properties").write_text(_LOG4J2.format(log_file=ndir / "server.log"))
        cmd = [
            *self._java(ndir, heap_mb=256),
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            # one token, so no id (even a hand-made one starting with "-") reads as an option
            f"--cluster-id={state.cluster_id}",
            "-c",
            str(ndir / "server.properties"),
            # the SCRAM users exist from the first start: brokers authenticate to each other
            *(secured.scram_arguments() if secured is not None else []),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BrokerError(
                f"formatting node {node.node_id} failed (exit {proc.returncode}):\n"
                + (proc.stdout + proc.stderr)[-3000:]
            )

    def _java(self, ndir: Path, heap_mb: int) -> list[str]:
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else "java"
        return [
            java,
            f"-Xms{min(heap_mb, 512)}m",
            f"-Xmx{heap_mb}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={ndir / 'log4j2.properties'}",
            "-cp",
            str(self.jar_dir / "*"),
        ]

    def _start_node(self, state: ClusterState, node: NodeState) -> None:
        ndir = self.node_dir(node.node_id)
        heap = self.heap_mb if len(state.nodes) == 1 else max(512, self.heap_mb * 3 // 4)
        cmd = [*self._java(ndir, heap), "kafka.Kafka", str(ndir / "server.properties")]
        with open(ndir / "kafka.log", "ab") as out:
            # own session: a Ctrl-C in the terminal must not kill the broker under the services
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        node.pid = proc.pid
        self._procs[proc.pid] = proc
        (ndir / "kafka.pid").write_text(str(proc.pid))
        log.info("started Kafka node %d pid %d on 127.0.0.1:%d", node.node_id, proc.pid, node.port)

    def start_node(self, node_id: int) -> None:
        """(Re)start one node of an existing cluster on its existing data, then wait."""
        state = self._require_state()
        node = self._node(state, node_id)
        if self._is_our_process(node):
            return
        self._start_node(state, node)
        self._save_state(state)
        self.wait_ready(state)

    def wait_ready(self, state: ClusterState, deadline_s: float = START_DEADLINE_S) -> None:
        """Block until every broker is registered and answers metadata, or raise."""
        from confluent_kafka.admin import AdminClient

        conf = state.client_conf()
        conf["logger"] = log
        admin = AdminClient(conf)
        want = {n.node_id for n in state.nodes}
        end = time.monotonic() + deadline_s
        last_error = ""
        registered: set[int] = set()
        while time.monotonic() < end:
            for node in state.nodes:
                if node.pid is not None and not pid_alive(node.pid):
                    raise BrokerError(
                        f"Kafka node {node.node_id} (pid {node.pid}) exited during startup:\n"
                        + self.log_tail(node.node_id)
                    )
            try:
                md = admin.list_topics(timeout=2)
                registered = set(md.brokers)
                if registered >= want and md.controller_id != -1:
                    return
                last_error = f"brokers registered: {sorted(md.brokers)}"
            except Exception as exc:  # noqa: BLE001 - not up yet: keep polling until the deadline
                last_error = str(exc)
            time.sleep(0.3)
        worst = next((n for n in state.nodes if n.node_id not in registered), state.nodes[0])
        raise BrokerError(
            f"Kafka cluster not ready after {deadline_s:.0f}s ({last_error}); "
            f"log of node {worst.node_id}:\n{self.log_tail(worst.node_id)}"
        )

    def log_tail(self, node_id: int, lines: int = 30) -> str:
        chunks = []
        for name in ("kafka.log", "server.log"):
            path = self.node_dir(node_id) / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(chunks) or "(no log)"

    # --- stop ------------------------------------------------------------------------

    def kill_node(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        """Signal one node (fault injection); waits for it to exit on SIGKILL."""
        state = self._require_state()
        node = self._node(state, node_id)
        if not self._is_our_process(node) or node.pid is None:
            raise BrokerError(f"node {node_id} is not running")
        os.kill(node.pid, sig)
        self._wait_exit(node.pid, STOP_DEADLINE_S)

    def down(self) -> list[int]:
        """SIGTERM every recorded node, SIGKILL after a deadline; returns stopped pids."""
        state = self.load_state()
        if state is None:
            return []
        stopped = []
        ours = [n for n in state.nodes if self._is_our_process(n)]
        for node in ours:
            assert node.pid is not None
            os.kill(node.pid, signal.SIGTERM)
        for node in ours:
            assert node.pid is not None
            if not self._wait_exit(node.pid, STOP_DEADLINE_S):
                log.warning(
                    "node %d pid %d ignored SIGTERM; sending SIGKILL", node.node_id, node.pid
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGKILL)
                self._wait_exit(node.pid, 10)
            stopped.append(node.pid)
        for node in state.nodes:
            (self.node_dir(node.node_id) / "kafka.pid").unlink(missing_ok=True)
            node.pid = None
        self._save_state(state)
        return stopped

    def _wait_exit(self, pid: int, deadline_s: float) -> bool:
        end = time.monotonic() + deadline_s
        proc = self._procs.get(pid)
        while time.monotonic() < end:
            # reap it if it is our child, so it does not linger as a zombie
            if proc is not None:
                if proc.poll() is not None:
                    del self._procs[pid]
                    return True
            elif not pid_alive(pid):
                return True
            time.sleep(0.1)
        return False

    def _require_state(self) -> ClusterState:
        state = self.load_state()
        if state is None:
            raise BrokerError(f"no local cluster in {self.root}; run `ordermesh broker up`")
        return state

    @staticmethod
    def _node(state: ClusterState, node_id: int) -> NodeState:
        for node in state.nodes:
            if node.node_id == node_id:
                return node
        raise BrokerError(f"no node {node_id} in this cluster")

    def status(self) -> dict[str, object]:
        """Nodes, pids, ports, active controller and health, for `broker status`."""
        state = self.load_state()
        if state is None:
            return {"running": False, "healthy": False, "nodes": []}
        nodes = [
            {
                "node_id": n.node_id,
                "pid": n.pid,
                "port": n.port,
                "controller_port": n.controller_port,
                "alive": self._is_our_process(n),
            }
            for n in state.nodes
        ]
        controller: int | None = None
        registered: list[int] = []
        if any(n["alive"] for n in nodes):
            from confluent_kafka.admin import AdminClient

            try:
                admin = AdminClient({**state.client_conf(), "log_level": 0})
                md = admin.list_topics(timeout=5)
                controller = md.controller_id
                registered = sorted(md.brokers)
            except Exception:  # noqa: BLE001 - status reports unhealthy instead of failing
                controller = None
        healthy = all(n["alive"] for n in nodes) and len(registered) == len(nodes)
        return {
            "running": any(n["alive"] for n in nodes),
            "healthy": healthy,
            "cluster_id": state.cluster_id,
            "bootstrap_servers": state.bootstrap_servers,
            "security": state.security,
            "client_config": state.client_config,
            "controller": controller,
            "registered_brokers": registered,
            "nodes": nodes,
        }
