"""`ordermesh inventory ...`, `ordermesh load` and `ordermesh verify`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ordermesh.cli.common import (
    DataDir,
    app,
    console,
    err_console,
    fail,
    make_settings,
)
from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError

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

    settings = make_settings(inventory_db=db, data_dir=data_dir)
    try:
        run_inventory(settings, idle_exit_s=idle_exit)
    except OrderMeshError as exc:
        raise fail(exc) from None


@inventory_app.command("seed")
def inventory_seed(
    skus: Annotated[int, typer.Option("--skus", min=1, help="SKU-00001 .. SKU-N.")] = 1000,
    stock: Annotated[int, typer.Option("--stock", min=0, help="Units per new SKU.")] = 10_000,
    db: DbPath = None,
    data_dir: DataDir = None,
) -> None:
    """Create SKUs with stock (existing SKUs are left as they are)."""
    from ordermesh.loadgen import sku_name

    store = _inventory_store(make_settings(inventory_db=db, data_dir=data_dir))
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
    store = _inventory_store(make_settings(inventory_db=db, data_dir=data_dir))
    try:
        row = store.restock(sku, quantity)
    except OrderMeshError as exc:
        raise fail(exc) from None
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
    store = _inventory_store(make_settings(inventory_db=db, data_dir=data_dir))
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
    settings = make_settings(data_dir=data_dir)
    show = console.is_terminal and not as_json
    with Progress(
        TextColumn("orders"),
        BarColumn(),
        TextColumn("{task.completed} sent"),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
    ) as progress:
        task = progress.add_task("load", total=count)
        try:
            summary = run_load(
                settings,
                count=count,
                duration=duration,
                rate=None if max_rate else rate,
                malformed_ratio=malformed_ratio,
                seed=seed,
                skus=skus,
                progress=lambda n: progress.update(task, completed=n),
            )
        except OrderMeshError as exc:
            raise fail(exc) from None
    if as_json:
        print(json.dumps(summary.as_dict()))
    else:
        d = summary.as_dict()
        console.print(
            ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
        )
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

    settings = make_settings(data_dir=data_dir, inventory_db=db)
    try:
        report = verify(settings)
    except OrderMeshError as exc:
        raise fail(exc) from None
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
