"""`ordermesh bench ...`: throughput measurements (never asserted by tests)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ordermesh.cli.common import app, console, fail, make_settings, status_line
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
) -> None:
    """Inventory orders/s, batched vs one-commit-per-message stdlib-json baseline."""
    from ordermesh.bench import bench_inventory

    settings = make_settings(batch_max=batch_max)
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


@bench_app.command("decode")
def bench_decode_cmd(
    n: Annotated[int, typer.Option(min=1, help="Orders to decode per library.")] = 50_000,
) -> None:
    """Decode+validate throughput of msgspec, orjson, pydantic and stdlib json."""
    from ordermesh.bench_decode import bench_decode

    console.print_json(json.dumps(bench_decode(n)))
