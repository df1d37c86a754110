"""`ordermesh broker ...` and `ordermesh topics ...`."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer
from rich.table import Table

from ordermesh.cli.common import (
    EXIT_CHECK_FAILED,
    AsJson,
    BootstrapServer,
    CommandConfig,
    DataDir,
    app,
    console,
    fail,
    local_cluster,
    make_settings,
    status_line,
)
from ordermesh.errors import OrderMeshError

broker_app = typer.Typer(no_args_is_help=True, help="The local Kafka (KRaft) cluster.")
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")


# --- broker ----------------------------------------------------------------------------


@broker_app.command("fetch")
def broker_fetch() -> None:
    """Fetch the Kafka jars from Maven Central into the cache (once)."""
    settings = make_settings()
    try:
        cluster = local_cluster(settings)
    except OrderMeshError as exc:
        raise fail(exc) from None
    console.print(f"Kafka {settings.kafka_version} jars ready in {cluster.jar_dir}")


@broker_app.command("up")
def broker_up(
    nodes: Annotated[int, typer.Option("--nodes", help="1 or 3 nodes.")] = 1,
    data_dir: DataDir = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            help="First port (default 9092).",
            envvar="ORDERMESH_BROKER_PORT",
            show_envvar=True,
        ),
    ] = None,
    security: Annotated[
        str | None,
        typer.Option(
            "--security",
            help="none (plaintext) or scram-tls (a SASL_SSL listener, SCRAM-SHA-512 users,"
            " a CA of its own; writes client.properties). Default: none, or what an"
            " existing cluster was formatted with.",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Start a local Kafka cluster in KRaft mode (idempotent)."""
    from ordermesh.broker.tls import SECURITY_MODES

    if nodes not in (1, 3):
        raise typer.BadParameter("--nodes must be 1 or 3")
    if security is not None and security not in SECURITY_MODES:
        raise typer.BadParameter(f"--security must be one of {', '.join(SECURITY_MODES)}")
    settings = make_settings(data_dir=data_dir)
    if settings.bootstrap_servers:
        if as_json:
            print(json.dumps({"started": False, "bootstrap_servers": settings.bootstrap_servers}))
            return
        console.print(
            f"ORDERMESH_BOOTSTRAP_SERVERS is set ({settings.bootstrap_servers}): "
            "using that cluster, starting nothing"
        )
        return
    try:
        cluster = local_cluster(settings)
        with status_line(f"starting {nodes} Kafka node(s) (KRaft)", quiet=as_json):
            state, started = cluster.up(
                nodes=nodes,
                port=port or settings.broker_port,
                security=security,  # narrowed to a Security by the check above
            )
    except OrderMeshError as exc:
        raise fail(exc) from None
    if as_json:
        print(
            json.dumps(
                {
                    "started": started,
                    "bootstrap_servers": state.bootstrap_servers,
                    "cluster_id": state.cluster_id,
                    "nodes": len(state.nodes),
                    "data_dir": str(cluster.root),
                    "security": state.security,
                    "client_config": state.client_config,
                    "ca_location": str(cluster.root / "tls" / "ca.pem")
                    if state.client_config
                    else None,
                }
            )
        )
        return
    if started:
        console.print(
            f"Kafka up: {len(state.nodes)} node(s) at {state.bootstrap_servers} "
            f"(cluster {state.cluster_id}, data {cluster.root})"
        )
    else:
        console.print(f"Kafka already up at {state.bootstrap_servers}; started nothing")
    if state.client_config:
        console.print(
            f"SASL_SSL (SCRAM-SHA-512, user ordermesh): the password and the CA are in"
            f" {state.client_config} (mode 0600). Commands of this data dir use it by"
            " themselves; elsewhere pass it:\n"
            f"  ordermesh topics ensure --bootstrap-server {state.bootstrap_servers}"
            f" --command-config {state.client_config}\n"
            f"  (or ORDERMESH_COMMAND_CONFIG={state.client_config})",
            soft_wrap=True,
            highlight=False,
        )


@broker_app.command("down")
def broker_down(
    data_dir: DataDir = None,
    purge: Annotated[bool, typer.Option("--purge", help="Also delete the cluster's data.")] = False,
) -> None:
    """Stop the local cluster (SIGTERM, then SIGKILL after a deadline)."""
    settings = make_settings(data_dir=data_dir)
    from ordermesh.broker.local import LocalCluster

    cluster = LocalCluster(settings.broker_dir(), settings.kafka_jar_dir())
    try:
        stopped = cluster.down()
        if purge:
            cluster.purge()
    except OrderMeshError as exc:
        raise fail(exc) from None
    console.print(f"stopped {len(stopped)} Kafka node(s)" if stopped else "no Kafka node running")


@broker_app.command("status")
def broker_status(data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Nodes, pids, ports, active controller, health. Exits 1 when not healthy."""
    settings = make_settings(data_dir=data_dir)
    from ordermesh.broker.local import LocalCluster

    status = LocalCluster(settings.broker_dir(), settings.kafka_jar_dir()).status()
    if as_json:
        print(json.dumps(status))
    else:
        table = Table(title=f"Kafka cluster {status.get('cluster_id', '-')}")
        for col in ("node", "pid", "port", "controller port", "alive"):
            table.add_column(col)
        for n in status["nodes"]:  # type: ignore[attr-defined]
            table.add_row(
                str(n["node_id"]),
                str(n["pid"]),
                str(n["port"]),
                str(n["controller_port"]),
                "yes" if n["alive"] else "no",
            )
        console.print(table)
        console.print(
            f"active controller: {status.get('controller')}  "
            f"healthy: {'yes' if status['healthy'] else 'no'}  "
            f"security: {status.get('security', 'none')}"
        )
    if not status["healthy"]:
        raise typer.Exit(code=EXIT_CHECK_FAILED)


# --- topics ----------------------------------------------------------------------------


@topics_app.command("ensure")
def topics_ensure(
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    as_json: AsJson = False,
) -> None:
    """Create the OrderMesh topics if missing; fail on any with a shape the mesh cannot
    use (fewer partitions, another replication factor), warn on the ones that only differ
    (more partitions, another retention)."""
    from ordermesh.kafka.admin import ensure_topics
    from ordermesh.kafka.client import kafka_errors, make_admin

    settings = make_settings(
        data_dir=data_dir, bootstrap_servers=bootstrap_server, command_config=command_config
    )
    try:
        with kafka_errors(settings):
            reports = ensure_topics(make_admin(settings), settings)
    except OrderMeshError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in reports]))
        return
    for r in reports:
        console.print(
            f"{r.name}: {r.partitions} partitions, RF {r.replication_factor} ({r.outcome})"
        )
    # the warnings (``r.warnings``) were logged by ensure_topics, on stderr
