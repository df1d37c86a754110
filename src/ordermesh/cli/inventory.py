"""`ordermesh inventory ...`, `ordermesh load` and `ordermesh verify`."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ordermesh.cli.common import (
    EXIT_ERROR,
    AsJson,
    BootstrapServer,
    CommandConfig,
    DataDir,
    app,
    console,
    err_console,
    fail,
    make_settings,
    status_line,
)
from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError
from ordermesh.loadgen import (
    DEFAULT_CANCEL_RATIO,
    DEFAULT_DECLINE_RATIO,
    DEFAULT_SKUS,
    DEFAULT_STOCK,
    sku_name,
)

if TYPE_CHECKING:
    from ordermesh.stores.inventory import InventoryStore

# --- inventory -------------------------------------------------------------------------

inventory_app = typer.Typer(no_args_is_help=True, help="The inventory service and its stock.")
app.add_typer(inventory_app, name="inventory")

DbPath = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="Inventory database file (default: inventory.db in the data dir).",
        envvar="ORDERMESH_INVENTORY_DB",
        show_envvar=True,
    ),
]


def _inventory_store(settings: Settings) -> InventoryStore:
    from ordermesh.stores.factory import open_inventory_store

    return open_inventory_store(settings)


@inventory_app.command("run")
def inventory_run(
    db: DbPath = None,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many idle seconds.")
    ] = None,
) -> None:
    """Run the inventory service: reserve stock for orders, emit outcomes, DLQ bad input."""
    from ordermesh.apps.inventory import run_inventory

    settings = make_settings(
        inventory_db=db,
        data_dir=data_dir,
        bootstrap_servers=bootstrap_server,
        command_config=command_config,
    )
    try:
        run_inventory(settings, idle_exit_s=idle_exit)
    except OrderMeshError as exc:
        raise fail(exc) from None


@inventory_app.command("seed")
def inventory_seed(
    skus: Annotated[int, typer.Option("--skus", min=1, help="SKU-00001 .. SKU-N.")] = DEFAULT_SKUS,
    stock: Annotated[
        int, typer.Option("--stock", min=0, help="Units per new SKU.")
    ] = DEFAULT_STOCK,
    db: DbPath = None,
    data_dir: DataDir = None,
) -> None:
    """Create SKUs with stock (existing SKUs are left as they are)."""

    store = _inventory_store(make_settings(inventory_db=db, data_dir=data_dir))
    try:
        created = store.seed({sku_name(i): stock for i in range(1, skus + 1)})
    finally:
        store.close()
    console.print(f"seeded {created} new SKU(s) with {stock} units; {skus - created} existed")


@inventory_app.command("restock")
def inventory_restock(
    sku: str,
    quantity: Annotated[
        int, typer.Argument(min=1, help="Units to add; the SKU may hold 10^12 at most.")
    ],
    db: DbPath = None,
    data_dir: DataDir = None,
) -> None:
    """Add units of SKU to the available stock."""
    from ordermesh.stores.inventory import MAX_STOCK

    if quantity > MAX_STOCK:
        raise typer.BadParameter(f"{quantity} is over the maximum stock {MAX_STOCK}")
    store = _inventory_store(make_settings(inventory_db=db, data_dir=data_dir))
    try:
        row = store.restock(sku, quantity)
    except ValueError as exc:  # the SKU's stock would pass MAX_STOCK; nothing changed
        raise typer.BadParameter(str(exc), param_hint="QUANTITY") from None
    except OrderMeshError as exc:
        raise fail(exc) from None
    finally:
        store.close()
    console.print(f"{escape(row.sku)}: available {row.available}, reserved {row.reserved}")


@inventory_app.command("stock")
def inventory_stock(
    sku: Annotated[str | None, typer.Argument(help="One SKU (default: all).")] = None,
    db: DbPath = None,
    data_dir: DataDir = None,
    limit: Annotated[int, typer.Option(min=1, help="Rows of the table at most.")] = 50,
    as_json: AsJson = False,
) -> None:
    """Where the units of one SKU or of all are: available, reserved (RESERVED orders),
    committed (PAID orders), shipped, and what entered them (seeded, restocked)."""
    store = _inventory_store(make_settings(inventory_db=db, data_dir=data_dir))
    try:
        rows = store.stock_levels(sku)
    finally:
        store.close()
    if sku is not None and not rows:
        err_console.print(f"unknown SKU {escape(sku)}")
        raise typer.Exit(code=EXIT_ERROR)
    if as_json:
        print(json.dumps([row._asdict() for row in rows]))
        return
    columns = ("available", "reserved", "committed", "shipped", "entered", "restocked")
    table = Table()
    table.add_column("sku")
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows[:limit]:
        table.add_row(escape(row.sku), *(str(getattr(row, col)) for col in columns))
    console.print(table)
    if len(rows) > limit:
        console.print(f"... {len(rows) - limit} more (use --limit)")
    unbalanced = [row.sku for row in rows if not row.conserved]
    if unbalanced:
        # entered + restocked must equal the four places units are: a bug if not
        err_console.print(f"stock not conserved: {escape(', '.join(unbalanced[:10]))}")
        raise typer.Exit(code=EXIT_ERROR)


# --- load and verify -------------------------------------------------------------------


@app.command("load")
def load(
    rate: Annotated[float | None, typer.Option(help="Orders per second.")] = None,
    max_rate: Annotated[bool, typer.Option("--max", help="As fast as possible.")] = False,
    count: Annotated[int | None, typer.Option(help="Stop after N messages.")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after S seconds.")] = None,
    malformed_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of malformed messages (0..1).")
    ] = 0.0,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the order sequence; order ids are ord-SEED-N, so a rerun with the"
            " same seed resends the same orders (default: a random seed, printed).",
        ),
    ] = None,
    skus: Annotated[
        int, typer.Option(min=1, help="Orders draw from SKU-00001..SKU-N.")
    ] = DEFAULT_SKUS,
    decline_ratio: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of orders paid with a declining test card."),
    ] = DEFAULT_DECLINE_RATIO,
    cancel_ratio: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of orders their customer cancels within a few seconds (before"
            " payment, after it, or too late: after shipment).",
        ),
    ] = DEFAULT_CANCEL_RATIO,
    as_json: AsJson = False,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
) -> None:
    """Produce realistic orders (and malformed messages) to the orders topic."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ordermesh.loadgen import random_seed, run_load

    if rate is not None and max_rate:
        raise typer.BadParameter("--rate and --max exclude each other")
    if seed is None:
        # a fixed default made every plain second run a replay of the first: all
        # duplicates, no stock moved, and verify passed anyway
        seed = random_seed()
    # stderr under --json, so stdout stays one JSON document
    (err_console if as_json else console).print(
        f"seed {seed} (rerun with --seed {seed})", highlight=False
    )
    # SIGTERM (a supervisor's stop) and Ctrl-C end the load between two produce calls:
    # what was sent is flushed and summarised. A flag, not an exception: an exception
    # raised inside the client's poll() would surface as a SystemError.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    settings = make_settings(
        data_dir=data_dir, bootstrap_servers=bootstrap_server, command_config=command_config
    )
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
                stop=stop,
                decline_ratio=decline_ratio,
                cancel_ratio=cancel_ratio,
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
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    wait_drained: Annotated[
        float | None,
        typer.Option(
            "--wait-drained",
            min=0.0,
            metavar="S",
            help="First wait up to S seconds for the consumer groups to catch up; "
            "anything still pending then fails the check.",
        ),
    ] = None,
    tracker: Annotated[
        bool,
        typer.Option(
            "--tracker/--no-tracker",
            help="Check the tracker too (--no-tracker: this deployment runs none).",
        ),
    ] = True,
    as_json: AsJson = False,
) -> None:
    """Check the invariants: nothing lost, no conflicting outcomes, stock conserved."""
    from ordermesh.cli.common import EXIT_CHECK_FAILED, print_verify
    from ordermesh.verify import consuming_groups, verify
    from ordermesh.verify import wait_drained as wait_for_groups

    settings = make_settings(
        data_dir=data_dir,
        inventory_db=db,
        bootstrap_servers=bootstrap_server,
        command_config=command_config,
    )
    drained: bool | None = None
    try:
        if wait_drained is not None:
            groups = consuming_groups(check_tracker=tracker)
            with status_line(f"waiting up to {wait_drained:g} s for the groups", quiet=as_json):
                drained = wait_for_groups(settings, groups, wait_drained)
        with status_line("verifying: reading every topic and store", quiet=as_json):
            report = verify(settings, check_tracker=tracker)
    except OrderMeshError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps({**report.as_dict(), "drained": drained}))
    else:
        if drained is False:
            err_console.print(f"the consumer groups did not drain within {wait_drained} s")
        print_verify(report.as_dict())
        if report.pending:
            console.print(
                f"not final: {report.pending} checks wait on records the services have not"
                " processed yet (pending, not lost); run verify again later or with"
                " --wait-drained S",
                style="yellow",
                markup=False,
            )
    # asked to wait: an answer that is still not final fails
    if not report.ok or (wait_drained is not None and report.pending):
        raise typer.Exit(code=EXIT_CHECK_FAILED)
