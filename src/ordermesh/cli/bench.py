"""`ordermesh bench ...`: throughput and latency measurements (never asserted by tests)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ordermesh.cli.common import (
    AsJson,
    app,
    console,
    err_console,
    fail,
    make_settings,
    status_line,
)
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


@bench_app.command("mesh")
def bench_mesh_cmd(
    orders: Annotated[
        int, typer.Option(min=1000, help="Orders of each drain; records of Kafka's tools.")
    ] = 200_000,
    rates: Annotated[
        str,
        typer.Option(
            help="Fixed loads of the latency runs, orders/s; 'half': half the first drain's rate."
        ),
    ] = "1000,5000,half",
    inventory: Annotated[
        str,
        typer.Option(help="Inventory instance counts to drain with, e.g. 1,3 (>1: --db postgres)."),
    ] = "1",
    db: Annotated[
        Literal["sqlite", "postgres"],
        typer.Option(help="The mesh's stores: SQLite files, or a fresh local PostgreSQL."),
    ] = "sqlite",
    skip: Annotated[
        str | None,
        typer.Option(help="Parts to leave out: kafka,python,drain,latency,api."),
    ] = None,
    only: Annotated[str | None, typer.Option(help="The only parts to run (as --skip).")] = None,
    window: Annotated[
        float, typer.Option(min=1.0, help="Seconds of load measured per latency run.")
    ] = 20.0,
    api_orders: Annotated[
        int, typer.Option(min=10, help="Orders of the API sample (POST, then GET ?wait=).")
    ] = 300,
    warm_orders: Annotated[
        int,
        typer.Option(
            min=0,
            help="Orders the mesh drains once, untimed, before anything is measured: a new"
            " broker spends its first minutes compiling (0: measure it cold).",
        ),
    ] = 200_000,
    lifecycle: Annotated[
        bool,
        typer.Option(
            "--lifecycle/--no-lifecycle",
            help="Also measure the whole life of an order (gateway, payments, fulfilment):"
            " drains to SHIPPED (with drain) and created -> RESERVED/SHIPPED (with latency).",
        ),
    ] = True,
    life_orders: Annotated[
        int | None,
        typer.Option(min=100, help="Orders of the lifecycle drain (unset: --orders)."),
    ] = 20_000,
    realistic_orders: Annotated[
        int,
        typer.Option(
            min=0,
            help="Orders of the lifecycle drain with a card processor's latency at the"
            " gateway (p50 150 ms, p99 800 ms); 0: none.",
        ),
    ] = 5_000,
    life_rate: Annotated[
        float, typer.Option(min=1.0, help="Orders/s of the lifecycle latency run.")
    ] = 1000.0,
    docs: Annotated[
        bool | None,
        typer.Option(
            "--docs/--no-docs",
            help="Rewrite docs/performance.md and its chart (default: when every part ran).",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """The whole mesh against Kafka's own tools: ProducerPerformance/ConsumerPerformance,
    a bare Python consume loop, the mesh draining a backlog (then verify), and latency at
    fixed rates, on a throwaway local broker; numbers to bench-results/mesh-<time>.json."""
    from ordermesh.bench.inventory import parse_instances
    from ordermesh.bench.mesh import (
        PARTS,
        ApiSample,
        MeshBenchPlan,
        bench_mesh,
        parse_parts,
        parse_rates,
    )
    from ordermesh.bench.performance_doc import write_docs

    try:
        parts = parse_parts(skip, only)
    except OrderMeshError as exc:
        raise typer.BadParameter(str(exc), param_hint="--skip/--only") from None
    try:
        rate_list = parse_rates(rates)
    except OrderMeshError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rates") from None
    try:
        counts = parse_instances(inventory)
    except OrderMeshError as exc:
        raise typer.BadParameter(str(exc), param_hint="--inventory") from None
    if db == "sqlite" and any(count > 1 for count in counts):
        raise typer.BadParameter(
            "more than one inventory instance needs --db postgres (SQLite files are not"
            " shared between hosts)",
            param_hint="--inventory",
        )
    plan = MeshBenchPlan(
        orders=orders,
        rates=tuple(rate_list),
        inventory=tuple(counts),
        db=db,
        parts=parts,
        window_s=window,
        warm_orders=warm_orders,
        api_sample=ApiSample(orders=api_orders),
        lifecycle=lifecycle,
        life_orders=life_orders,
        realistic_orders=realistic_orders,
        life_rate=life_rate,
    )
    settings = make_settings()
    command = shlex.join(["ordermesh", *sys.argv[1:]])

    def step(message: str) -> None:
        err_console.print(f"[dim]bench mesh:[/dim] {message}", highlight=False)

    try:
        result = bench_mesh(settings, plan, command=command, on_step=step)
    except OrderMeshError as exc:
        raise fail(exc) from None
    if docs is None:
        docs = parts == frozenset(PARTS)
    if docs:
        result["docs"] = [str(path) for path in write_docs(result, Path("docs"))]
    if as_json:
        print(json.dumps(result))
        return
    _print_mesh(result)


def _print_mesh(result: dict[str, Any]) -> None:
    from rich.table import Table

    from ordermesh.bench.performance_doc import PERCENTILES, by_rate

    def ms(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"

    if result["rows"]:
        table = Table(title="throughput")
        for column in ("what", "rate", "% of ProducerPerformance"):
            table.add_column(column, justify="left" if column == "what" else "right")
        for row in result["rows"]:
            pct = row["pct_of_producer"]
            table.add_row(
                row["what"],
                f"{row['rate']:,.0f} {row['unit']}",
                "-" if pct is None else f"{pct:.1f}%",
            )
        console.print(table)
    for run in result.get("drain", []):
        verdict = "OK" if run["verify"]["ok"] else f"FAILED {run['verify']['violation_counts']}"
        console.print(
            f"drain {run['db']}, {run['inventory_instances']} inventory: verify {verdict}",
            highlight=False,
        )
    if result.get("latency"):
        table = Table(title="created -> decided latency (ms)")
        for column in ("load/s", "orders", *PERCENTILES, "max", "backlog", "verify"):
            table.add_column(column, justify="right")
        for run in by_rate(result["latency"]):
            lat = run["created_to_event_ms"]
            table.add_row(
                f"{run['rate']:,.0f}",
                f"{run['orders']:,}",
                *(ms(lat[p]) for p in (*PERCENTILES, "max")),
                f"{run['backlog_at_load_end']:,}",
                "OK" if run["verify"]["ok"] else "FAILED",
            )
        console.print(table)
    api = result.get("api")
    if api:
        reserved = api["post_to_reserved_ms"]
        console.print(
            f"API POST -> RESERVED at {api['background_rate']:,.0f} orders/s background,"
            f" {api['orders']} orders: "
            + ", ".join(f"{p} {ms(reserved[p])} ms" for p in PERCENTILES),
            highlight=False,
        )
    _print_lifecycle(result.get("lifecycle") or {})
    for note in result.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    console.print(f"numbers: {result['file']}", highlight=False)
    for path in result.get("docs", []):
        console.print(f"wrote {path}", highlight=False)


def _print_lifecycle(life: dict[str, Any]) -> None:
    for key, what in (("drain", "no gateway faults"), ("realistic", "realistic gateway")):
        run = life.get(key)
        if not run:
            continue
        pct = run.get("pct_of_reservation_only")
        console.print(
            f"lifecycle drain ({what}): {run['orders']:,} orders, {run['shipped']:,} SHIPPED,"
            f" {run['orders_per_s']:,.0f} orders/s"
            + (f" ({pct:.1f}% of the reservation-only drain)" if pct is not None else "")
            + f"; verify {'OK' if run['verify']['ok'] else 'FAILED'}",
            highlight=False,
        )
    latency = life.get("latency")
    if latency:
        reserved, shipped = latency["created_to_reserved_ms"], latency["created_to_shipped_ms"]
        console.print(
            f"lifecycle mesh at {latency['rate']:,.0f} orders/s: created -> RESERVED p50"
            f" {reserved['p50']} ms, p99 {reserved['p99']} ms; created -> SHIPPED p50"
            f" {shipped['p50']} ms, p99 {shipped['p99']} ms ({latency['shipped']:,} shipped)",
            highlight=False,
        )
