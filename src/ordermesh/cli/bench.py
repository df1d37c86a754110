"""`ordermesh bench ...`: throughput measurements (never asserted by tests)."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Annotated, Literal

import typer

from ordermesh.cli.common import app, console, fail, make_settings, status_line
from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; numbers go to bench-results/.")
app.add_typer(bench_app, name="bench")


@bench_app.command("inventory")
def bench_inventory_cmd(
    orders: Annotated[int, typer.Option(min=1000, help="Orders of the batched run.")] = 200_000,
    baseline_orders: Annotated[
        int, typer.Option(min=100, help="Orders of the one-commit-per-message baseline.")
    ] = 5_000,
    skus: Annotated[int, typer.Option(min=1, help="SKUs the orders draw from.")] = 1000,
    batch_max: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Records per poll batch at most.",
            envvar="ORDERMESH_BATCH_MAX",
            show_envvar=True,
        ),
    ] = None,
    db: Annotated[
        Literal["sqlite", "postgres"] | None,
        typer.Option(
            help="postgres: SQLite (1 instance) beside a local PostgreSQL shared by"
            " --instances inventory processes, instead of the baseline comparison."
        ),
    ] = None,
    instances: Annotated[
        str | None,
        typer.Option(help="With --db postgres: instance counts to measure, e.g. 1,3."),
    ] = None,
) -> None:
    """Inventory orders/s, batched vs one-commit-per-message stdlib-json baseline, or
    (--db postgres) SQLite vs PostgreSQL with 1..N instances."""
    from ordermesh.bench.inventory import bench_inventory, parse_instances

    if instances is not None and db != "postgres":
        raise typer.BadParameter("needs --db postgres", param_hint="--instances")
    settings = make_settings(batch_max=batch_max)
    if db == "postgres":
        try:
            counts = parse_instances(instances or "1,3")
        except OrderMeshError as exc:
            raise typer.BadParameter(str(exc), param_hint="--instances") from None
        _bench_postgres(settings, orders=orders, skus=skus, instances=counts)
        return
    try:
        with status_line(f"benchmarking the inventory ({orders:,} orders, local broker)"):
            result = bench_inventory(
                settings, orders=orders, baseline_orders=baseline_orders, skus=skus
            )
    except OrderMeshError as exc:
        raise fail(exc) from None
    console.print_json(json.dumps(result))
    console.print(
        f"batched {result['batched']['orders_per_s']:.0f} orders/s, "
        f"baseline {result['baseline']['orders_per_s']:.0f} orders/s, "
        f"speedup {result['speedup']}x"
    )


def _bench_postgres(settings: Settings, *, orders: int, skus: int, instances: list[int]) -> None:
    from rich.table import Table

    from ordermesh.bench.inventory import bench_inventory_postgres

    command = shlex.join(["ordermesh", *sys.argv[1:]])
    try:
        with status_line(
            f"benchmarking the inventory on SQLite and PostgreSQL ({orders:,} orders per run,"
            " local broker and database)"
        ):
            result = bench_inventory_postgres(
                settings, orders=orders, skus=skus, instances=instances, command=command
            )
    except OrderMeshError as exc:
        raise fail(exc) from None
    machine = result["machine"]
    table = Table(
        title=f"inventory, {orders:,} orders over {skus} skus"
        f" ({machine['cpus']} cpus, PostgreSQL {machine['postgresql']})"
    )
    for column in ("db", "instances", "orders/s", "seconds", "mean batch", "conflict retries"):
        table.add_column(column, justify="left" if column == "db" else "right")
    for run in result["runs"]:
        table.add_row(
            run["db"],
            str(run["instances"]),
            f"{run['orders_per_s']:,.0f}",
            f"{run['seconds']:.2f}",
            f"{run['mean_batch']:,.0f}",
            str(run["conflict_retries"]),
        )
    console.print(table)
    for name, ratio in result["ratios"].items():
        console.print(f"{name.replace('_', ' ')}: {ratio}x")
    console.print(f"numbers: {result['file']}")


@bench_app.command("decode")
def bench_decode_cmd(
    n: Annotated[int, typer.Option(min=1, help="Orders to decode per library.")] = 50_000,
) -> None:
    """Decode+validate throughput of msgspec, orjson, pydantic and stdlib json."""
    from ordermesh.bench.decode import bench_decode

    console.print_json(json.dumps(bench_decode(n)))
