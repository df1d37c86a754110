"""`ordermesh broker ...` and `ordermesh topics ...`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ordermesh.cli.common import (
    DataDir,
    app,
    console,
    fail,
    local_cluster,
    make_settings,
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
    port: Annotated[int | None, typer.Option("--port", help="First port (default 9092).")] = None,
) -> None:
    """Start a local Kafka cluster in KRaft mode (idempotent)."""
    settings = make_settings(data_dir=data_dir)
    if settings.bootstrap_servers:
        console.print(
            f"ORDERMESH_BOOTSTRAP_SERVERS is set ({settings.bootstrap_servers}): "
            "using that cluster, starting nothing"
        )
        return
    try:
        cluster = local_cluster(settings)
        state, started = cluster.up(nodes=nodes, port=port or settings.broker_port)
    except OrderMeshError as exc:
        raise fail(exc) from None
    if started:
        console.print(
            f"Kafka up: {len(state.nodes)} node(s) at {state.bootstrap_servers} "
            f"(cluster {state.cluster_id}, data {cluster.root})"
        )
    else:
        console.print(f"Kafka already up at {state.bootstrap_servers}; started nothing")


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
def broker_status(
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Nodes, pids, ports, active controller, health. Exits 1 when not healthy."""
    settings = make_settings(data_dir=data_dir)
    from ordermesh.broker.local import LocalCluster

    status = LocalCluster(settings.broker_dir(), settings.kafka_jar_dir()).status()
    if as_json:
        console.print_json(json.dumps(status))
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
            f"healthy: {'yes' if status['healthy'] else 'no'}"
        )
    if not status["healthy"]:
        raise typer.Exit(code=1)


# --- topics ----------------------------------------------------------------------------


@topics_app.command("ensure")
def topics_ensure(data_dir: DataDir = None) -> None:
    """Create the OrderMesh topics if missing; report any with another shape."""
    from ordermesh.kafka.client import make_admin
    from ordermesh.topics import ensure_topics

    settings = make_settings(data_dir=data_dir)
    try:
        reports = ensure_topics(make_admin(settings), settings)
    except OrderMeshError as exc:
        raise fail(exc) from None
    for r in reports:
        console.print(
            f"{r.name}: {r.partitions} partitions, RF {r.replication_factor} ({r.outcome})"
        )
