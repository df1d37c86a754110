"""The ``ordermesh`` command line: the only place that builds Settings and prints."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="OrderMesh: Kafka order processing with real stock, tracking and a replayable DLQ.",
)
broker_app = typer.Typer(no_args_is_help=True, help="The local Kafka (KRaft) cluster.")
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")

console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _settings(**overrides: Any) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)


def _fail(exc: OrderMeshError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=1)


def _cluster(settings: Settings) -> Any:
    from ordermesh.broker.jars import ensure_jars
    from ordermesh.broker.local import LocalCluster

    jar_dir = ensure_jars(settings.kafka_jar_dir(), settings.kafka_version)
    return LocalCluster(settings.broker_dir(), jar_dir, heap_mb=settings.broker_heap_mb)


DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory.")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """OrderMesh: Kafka order processing with real stock, tracking and a replayable DLQ."""
    _setup_logging(verbose)


# --- broker ----------------------------------------------------------------------------


@broker_app.command("fetch")
def broker_fetch() -> None:
    """Fetch the Kafka jars from Maven Central into the cache (once)."""
    settings = _settings()
    try:
        cluster = _cluster(settings)
    except OrderMeshError as exc:
        raise _fail(exc) from None
    console.print(f"Kafka {settings.kafka_version} jars ready in {cluster.jar_dir}")


@broker_app.command("up")
def broker_up(
    nodes: Annotated[int, typer.Option("--nodes", help="1 or 3 nodes.")] = 1,
    data_dir: DataDir = None,
    port: Annotated[int | None, typer.Option("--port", help="First port (default 9092).")] = None,
) -> None:
    """Start a local Kafka cluster in KRaft mode (idempotent)."""
    settings = _settings(data_dir=data_dir)
    if settings.bootstrap_servers:
        console.print(f"ORDERMESH_BOOTSTRAP_SERVERS is set ({settings.bootstrap_servers}): "
                      "using that cluster, starting nothing")  # fmt: skip
        return
    try:
        cluster = _cluster(settings)
        state, started = cluster.up(nodes=nodes, port=port or settings.broker_port)
    except OrderMeshError as exc:
        raise _fail(exc) from None
    if started:
        console.print(f"Kafka up: {len(state.nodes)} node(s) at {state.bootstrap_servers} "
                      f"(cluster {state.cluster_id}, data {cluster.root})")  # fmt: skip
    else:
        console.print(f"Kafka already up at {state.bootstrap_servers}; started nothing")


@broker_app.command("down")
def broker_down(
    data_dir: DataDir = None,
    purge: Annotated[bool, typer.Option("--purge", help="Also delete the cluster's data.")] = False,
) -> None:
    """Stop the local cluster (SIGTERM, then SIGKILL after a deadline)."""
    settings = _settings(data_dir=data_dir)
    from ordermesh.broker.local import LocalCluster

    cluster = LocalCluster(settings.broker_dir(), settings.kafka_jar_dir())
    try:
        stopped = cluster.down()
        if purge:
            cluster.purge()
    except OrderMeshError as exc:
        raise _fail(exc) from None
    console.print(f"stopped {len(stopped)} Kafka node(s)" if stopped else "no Kafka node running")


@broker_app.command("status")
def broker_status(
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Nodes, pids, ports, active controller, health. Exits 1 when not healthy."""
    settings = _settings(data_dir=data_dir)
    from ordermesh.broker.local import LocalCluster

    status = LocalCluster(settings.broker_dir(), settings.kafka_jar_dir()).status()
    if as_json:
        console.print_json(json.dumps(status))
    else:
        table = Table(title=f"Kafka cluster {status.get('cluster_id', '-')}")
        for col in ("node", "pid", "port", "controller port", "alive"):
            table.add_column(col)
        for n in status["nodes"]:  # type: ignore[attr-defined]
            table.add_row(str(n["node_id"]), str(n["pid"]), str(n["port"]),
                          str(n["controller_port"]), "yes" if n["alive"] else "no")  # fmt: skip
        console.print(table)
        console.print(f"active controller: {status.get('controller')}  "
                      f"healthy: {'yes' if status['healthy'] else 'no'}")  # fmt: skip
    if not status["healthy"]:
        raise typer.Exit(code=1)


# --- topics ----------------------------------------------------------------------------


@topics_app.command("ensure")
def topics_ensure(data_dir: DataDir = None) -> None:
    """Create the OrderMesh topics if missing; report any with another shape."""
    from ordermesh.kafka.client import make_admin
    from ordermesh.topics import ensure_topics

    settings = _settings(data_dir=data_dir)
    try:
        reports = ensure_topics(make_admin(settings), settings)
    except OrderMeshError as exc:
        raise _fail(exc) from None
    for r in reports:
        console.print(
            f"{r.name}: {r.partitions} partitions, RF {r.replication_factor} ({r.outcome})"
        )


# --- inventory -------------------------------------------------------------------------

inventory_app = typer.Typer(no_args_is_help=True, help="The inventory service and its stock.")
app.add_typer(inventory_app, name="inventory")

DbPath = Annotated[Path | None, typer.Option("--db", help="Inventory database file.")]


def _inventory_store(settings: Settings) -> Any:
    from ordermesh.stores.inventory import InventoryStore

    return InventoryStore(settings.inventory_db_path())


@inventory_app.command("run")
def inventory_run(
    db: DbPath = None,
    data_dir: DataDir = None,
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many idle seconds.")
    ] = None,
) -> None:
    """Run the inventory service: reserve stock for orders, emit outcomes, DLQ bad input."""
    from ordermesh.kafka.apps import run_inventory

    settings = _settings(inventory_db=db, data_dir=data_dir)
    try:
        run_inventory(settings, idle_exit_s=idle_exit)
    except OrderMeshError as exc:
        raise _fail(exc) from None


@inventory_app.command("seed")
def inventory_seed(
    skus: Annotated[int, typer.Option("--skus", min=1, help="SKU-00001 .. SKU-N.")] = 1000,
    stock: Annotated[int, typer.Option("--stock", min=0, help="Units per new SKU.")] = 10_000,
    db: DbPath = None,
    data_dir: DataDir = None,
) -> None:
    """Create SKUs with stock (existing SKUs are left as they are)."""
    from ordermesh.loadgen import sku_name

    store = _inventory_store(_settings(inventory_db=db, data_dir=data_dir))
    try:
        created = store.seed({sku_name(i): stock for i in range(1, skus + 1)})
    finally:
        store.close()
    console.print(f"seeded {created} new SKU(s) with {stock} units; {skus - created} existed")


@inventory_app.command("restock")
def inventory_restock(
    sku: str,
    quantity: Annotated[int, typer.Argument(min=1)],
    db: DbPath = None,
    data_dir: DataDir = None,
) -> None:
    """Add units of SKU to the available stock."""
    store = _inventory_store(_settings(inventory_db=db, data_dir=data_dir))
    try:
        row = store.restock(sku, quantity)
    except OrderMeshError as exc:
        raise _fail(exc) from None
    finally:
        store.close()
    console.print(f"{row.sku}: available {row.available}, reserved {row.reserved}")


@inventory_app.command("stock")
def inventory_stock(
    sku: Annotated[str | None, typer.Argument()] = None,
    db: DbPath = None,
    data_dir: DataDir = None,
    limit: int = 50,
) -> None:
    """Available and reserved stock, of one SKU or of all."""
    store = _inventory_store(_settings(inventory_db=db, data_dir=data_dir))
    try:
        rows = store.stock(sku)
    finally:
        store.close()
    if sku is not None and not rows:
        err_console.print(f"unknown SKU {sku}")
        raise typer.Exit(code=1)
    table = Table()
    for col in ("sku", "available", "reserved"):
        table.add_column(col)
    for row in rows[:limit]:
        table.add_row(row.sku, str(row.available), str(row.reserved))
    console.print(table)
    if len(rows) > limit:
        console.print(f"... {len(rows) - limit} more (use --limit)")


# --- load and verify -------------------------------------------------------------------


@app.command("load")
def load(
    rate: Annotated[float | None, typer.Option(help="Orders per second.")] = None,
    max_rate: Annotated[bool, typer.Option("--max", help="As fast as possible.")] = False,
    count: Annotated[int | None, typer.Option(help="Stop after N messages.")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after S seconds.")] = None,
    malformed_ratio: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.0,
    seed: int = 1,
    skus: int = 1000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    data_dir: DataDir = None,
) -> None:
    """Produce realistic orders (and malformed messages) to the orders topic."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ordermesh.loadgen import run_load

    if rate is not None and max_rate:
        raise typer.BadParameter("--rate and --max exclude each other")
    if count is None and duration is None:
        raise typer.BadParameter("give --count or --duration")
    settings = _settings(data_dir=data_dir)
    show = console.is_terminal and not as_json
    with Progress(TextColumn("orders"), BarColumn(), TextColumn("{task.completed} sent"),
                  TimeElapsedColumn(), console=console, disable=not show) as progress:  # fmt: skip
        task = progress.add_task("load", total=count)
        try:
            summary = run_load(
                settings, count=count, duration=duration, rate=None if max_rate else rate,
                malformed_ratio=malformed_ratio, seed=seed, skus=skus,
                progress=lambda n: progress.update(task, completed=n),
            )  # fmt: skip
        except OrderMeshError as exc:
            raise _fail(exc) from None
    if as_json:
        print(json.dumps(summary.as_dict()))
    else:
        d = summary.as_dict()
        console.print(", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in d.items()))  # fmt: skip
    if summary.failed:
        raise typer.Exit(code=1)


@app.command("verify")
def verify_cmd(
    data_dir: DataDir = None,
    db: DbPath = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check the invariants: nothing lost, no conflicting outcomes, stock conserved."""
    from ordermesh.verify import verify

    settings = _settings(data_dir=data_dir, inventory_db=db)
    try:
        report = verify(settings)
    except OrderMeshError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        d = report.as_dict()
        for key, value in d.items():
            if key != "violations":
                console.print(f"{key}: {value}")
        for line in report.violations:
            console.print(f"[red]{line}[/red]")
        console.print("[green]verify: OK[/green]" if report.ok else "[red]verify: FAILED[/red]")
    if not report.ok:
        raise typer.Exit(code=1)
