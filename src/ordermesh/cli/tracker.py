"""`ordermesh tracker ...`: run the order tracker and query order status."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
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
)
from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError

if TYPE_CHECKING:
    from ordermesh.stores.tracker import OrderQueries

tracker_app = typer.Typer(no_args_is_help=True, help="The order tracker and order status.")
app.add_typer(tracker_app, name="tracker")

DbPath = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="Tracker database file (default: tracker.db in the data dir).",
        envvar="ORDERMESH_TRACKER_DB",
        show_envvar=True,
    ),
]


def _reader(settings: Settings) -> OrderQueries:
    from ordermesh.stores.factory import open_order_queries

    path = settings.tracker_db_path()
    if not path.exists():
        err_console.print(
            f"no tracker database at {escape(str(path))} (is `ordermesh tracker run` up?)"
        )
        raise typer.Exit(code=EXIT_ERROR)
    return open_order_queries(settings)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


@tracker_app.command("run")
def tracker_run(
    db: DbPath = None,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many idle seconds.")
    ] = None,
) -> None:
    """Run the order tracker: follow orders and their events to a queryable status."""
    from ordermesh.apps.tracker import run_tracker

    settings = make_settings(
        tracker_db=db,
        data_dir=data_dir,
        bootstrap_servers=bootstrap_server,
        command_config=command_config,
    )
    try:
        run_tracker(settings, idle_exit_s=idle_exit)
    except OrderMeshError as exc:
        raise fail(exc) from None


@tracker_app.command("show")
def tracker_show(
    order_id: str,
    db: DbPath = None,
    data_dir: DataDir = None,
    as_json: AsJson = False,
) -> None:
    """Status, items, total, payment, shipment, transitions and history of one order."""
    store = _reader(make_settings(tracker_db=db, data_dir=data_dir))
    try:
        view = store.get_order(order_id)
    except OrderMeshError as exc:
        raise fail(exc) from None
    finally:
        store.close()
    if view is None:
        err_console.print(f"unknown order {escape(order_id)}")
        raise typer.Exit(code=EXIT_ERROR)
    if as_json:
        print(json.dumps(dataclasses.asdict(view)))
        return
    console.print(
        f"[bold]{escape(view.order_id)}[/bold]  {view.status}  customer {escape(view.customer_id)}"
    )
    if view.reason or view.detail:
        console.print(f"reason: {escape(view.reason or '-')}  detail: {escape(view.detail or '-')}")
    console.print(f"created {_when(view.created_at)}, updated {_when(view.updated_at)}")
    steps = (
        ("decided", view.decided_at),
        ("expires", view.expires_at),
        ("paid", view.paid_at),
        ("shipped", view.shipped_at),
        ("ended", view.ended_at),
    )
    console.print(", ".join(f"{name} {_when(at)}" for name, at in steps if at is not None) or "-")
    payment = view.payment
    if payment.authorization_id is not None:
        console.print(
            f"payment {escape(payment.authorization_id)}: authorized {payment.authorized:.2f},"
            f" captured {payment.captured:.2f}, voided {payment.voided:.2f},"
            f" refunded {payment.refunded:.2f}, net {payment.net:.2f}"
        )
    if view.shipment_id is not None:
        console.print(f"shipment {escape(view.shipment_id)}")
    items = Table(title="items")
    for col in ("sku", "quantity", "unit price"):
        items.add_column(col)
    for item in view.items:
        items.add_row(escape(item.sku), str(item.quantity), f"{item.unit_price:.2f}")
    console.print(items)
    console.print(f"total: {view.total:.2f} {escape(view.currency)}")
    history = Table(title="history")
    for col in ("at", "event", "moved", "detail"):
        history.add_column(col)
    for entry in view.history:
        if entry.event == "OrderPlaced":
            moved = "PLACED"
        elif entry.prior is not None:
            moved = f"{entry.prior} -> {entry.status}"
        elif entry.status is not None:
            moved = f"stale ({entry.status})"  # a status event that did not move it
        else:
            moved = ""  # a fact
        history.add_row(_when(entry.at), escape(entry.event), moved, escape(entry.detail))
    console.print(history)


@tracker_app.command("list")
def tracker_list(
    status: Annotated[
        str | None,
        typer.Option(help="One of the lifecycle's statuses (PLACED, RESERVED, PAID, ...)."),
    ] = None,
    customer: Annotated[str | None, typer.Option(help="Only this customer's orders.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Orders per page.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Continue after a previous page.")] = None,
    db: DbPath = None,
    data_dir: DataDir = None,
    as_json: AsJson = False,
) -> None:
    """Orders by order_id, optionally of one status or customer; pages via --cursor."""
    from ordermesh.stores.tracker import ORDER_STATUSES, OrderStatus

    wanted: OrderStatus | None = None
    if status is not None:
        matches = [s for s in ORDER_STATUSES if s == status.upper()]
        if not matches:
            raise typer.BadParameter(f"--status must be one of {', '.join(ORDER_STATUSES)}")
        wanted = matches[0]
    store = _reader(make_settings(tracker_db=db, data_dir=data_dir))
    try:
        page = store.list_orders(
            status=wanted,
            customer_id=customer,
            limit=limit,
            cursor=cursor,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    except OrderMeshError as exc:
        raise fail(exc) from None
    finally:
        store.close()
    if as_json:
        print(json.dumps(dataclasses.asdict(page)))
        return
    table = Table()
    for col in ("order_id", "customer", "status", "total", "items", "updated"):
        table.add_column(col, no_wrap=col in ("order_id", "customer", "status"))
    for view in page.orders:
        table.add_row(
            escape(view.order_id),
            escape(view.customer_id),
            view.status,
            f"{view.total:.2f} {escape(view.currency)}",
            str(len(view.items)),
            _when(view.updated_at)[:19],
        )
    console.print(table)
    if page.next_cursor:
        console.print(f"more: --cursor {escape(page.next_cursor)}")


@tracker_app.command("counts")
def tracker_counts(db: DbPath = None, data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """How many orders are in each status (every status of the lifecycle, zeros too)."""
    store = _reader(make_settings(tracker_db=db, data_dir=data_dir))
    try:
        counts = store.status_counts()
        pending = store.pending_count()
    except OrderMeshError as exc:
        raise fail(exc) from None
    finally:
        store.close()
    if as_json:
        print(json.dumps({"statuses": counts, "pending_events": pending}))
        return
    for status, count in counts.items():
        console.print(f"{status}: {count}")
    console.print(f"events waiting for their order: {pending}")
