"""`ordermesh up`, `ordermesh top` and `ordermesh simulate`: the whole mesh at once."""

from __future__ import annotations

import json
import signal
import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from ordermesh.cli.common import DataDir, app, console, err_console, fail, make_settings
from ordermesh.errors import OrderMeshError


class _Rates:
    """Per-second rates derived from successive topic end offsets."""

    def __init__(self) -> None:
        self.prev: dict[str, Any] | None = None

    def update(self, status: dict[str, Any]) -> dict[str, float]:
        rates = {}
        if self.prev is not None:
            dt = max(1e-3, status["at"] - self.prev["at"])
            for topic, value in status["topics"].items():
                rates[topic] = (value - self.prev["topics"][topic]) / dt
        self.prev = status
        return rates


def render(status: dict[str, Any], rates: dict[str, float], header: str) -> Group:
    """The live terminal view: rates, totals, outcomes, DLQ, lag, services."""
    t = Table.grid(padding=(0, 3))
    t.add_row(
        "[b]orders placed[/b]",
        f"{status['topics']['orders']:,}",
        f"{rates.get('orders', 0):,.0f}/s",
    )
    t.add_row(
        "[b]events[/b]",
        f"{status['topics']['order-events']:,}",
        f"{rates.get('order-events', 0):,.0f}/s",
    )
    t.add_row(
        "[b]DLQ[/b]", f"{status['topics']['orders-dlq']:,}", f"{rates.get('orders-dlq', 0):,.1f}/s"
    )
    snap = status.get("analytics") or {}
    totals = snap.get("totals") or {}
    outcomes = Table("outcome", "count", box=None)
    for key in ("reserved", "cancelled"):
        if key in totals:
            outcomes.add_row(key, f"{totals[key]:,}")
    for reason, n in sorted((totals.get("rejected") or {}).items()):
        outcomes.add_row(f"rejected {reason}", f"{n:,}")
    for reason, n in sorted((totals.get("dlq_by_reason") or {}).items()):
        outcomes.add_row(f"dlq {reason}", f"{n:,}")
    latency = ((snap.get("windows") or {}).get("10s") or {}).get("latency_ms") or {}
    if latency.get("p50") is not None:
        outcomes.add_row(
            "latency p50 / p99 (10s)",
            f"{latency.get('p50') or 0:.0f} / {latency.get('p99') or 0:.0f} ms",
        )
    lag = Table("consumer group", "lag", box=None)
    for group, value in status["lag"].items():
        lag.add_row(group, f"{value:,}")
    services = Table("service", "pid", "state", "restarts", box=None)
    for name, s in status.get("services", {}).items():
        services.add_row(
            name,
            str(s["pid"]),
            "[green]up[/green]" if s["running"] else "[red]down[/red]",
            str(s["restarts"]),
        )
    top_row = Table.grid(padding=(0, 4))
    top_row.add_row(t, outcomes)
    bottom_row = Table.grid(padding=(0, 4))
    bottom_row.add_row(lag, services)
    return Group(Panel(Group(top_row, "", bottom_row), title=header, border_style="cyan"))


def _live_loop(mesh: Any, deadline: float | None, header: str) -> None:
    rates = _Rates()
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        while deadline is None or time.monotonic() < deadline:
            mesh.supervisor.check()
            status = mesh.status()
            live.update(render(status, rates.update(status), header))
            time.sleep(1.0)
            if deadline is not None and not mesh.load_running() and mesh.drained():
                break


@app.command("up")
def up(
    rate: Annotated[
        float, typer.Option(help="Orders per second of the load (0: no load).")
    ] = 1000.0,
    duration: Annotated[
        float | None, typer.Option(help="Stop after S seconds (default: Ctrl-C).")
    ] = None,
    instances: Annotated[str | None, typer.Option(help="e.g. inventory=2,tracker=1")] = None,
    malformed_ratio: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.01,
    skus: int = 1000,
    stock: int = 100_000,
    api_port: int = 8080,
    dashboard_port: int = 8090,
    data_dir: DataDir = None,
    keep_broker: Annotated[bool, typer.Option(help="Leave the local broker running.")] = False,
) -> None:
    """Run the whole mesh: broker, topics, stock, every service, a load, live numbers."""
    from ordermesh.mesh import Mesh, MeshPlan, parse_instances
    from ordermesh.verify import verify

    settings = make_settings(data_dir=data_dir)
    try:
        plan = MeshPlan(
            instances=parse_instances(instances),
            skus=skus,
            stock=stock,
            api_port=api_port,
            analytics_port=dashboard_port,
        )
        mesh = Mesh(settings, plan)
        # SIGTERM behaves like Ctrl-C: stop everything cleanly
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        mesh.start()
    except OrderMeshError as exc:
        raise fail(exc) from None
    console.print(
        f"dashboard: [link]{mesh.dashboard_url}[/link]   API: {mesh.api_url}   "
        f"logs: {mesh.supervisor.log_dir}"
    )
    if rate > 0:
        mesh.start_load(rate=rate, duration=duration, malformed_ratio=malformed_ratio)
    deadline = time.monotonic() + duration if duration is not None else None
    try:
        _live_loop(mesh, deadline, "OrderMesh — Ctrl-C to stop")
        if deadline is not None:
            console.print("load finished; waiting for the services to drain ...")
            mesh.wait_drained(120)
    except KeyboardInterrupt:
        console.print("stopping ...")
    mesh.stop(stop_broker=False)
    report = verify(mesh.settings)
    if not keep_broker:
        mesh.stop()
    _print_verify(report.as_dict())
    if not report.ok:
        raise typer.Exit(code=1)


def _print_verify(report: dict[str, Any]) -> None:
    table = Table(title="final report (ordermesh verify)")
    table.add_column("check")
    table.add_column("value")
    for key, value in report.items():
        if key != "violations":
            table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(table)
    for line in report.get("violations", []):
        console.print(f"[red]{line}[/red]")
    console.print("[green]verify: OK[/green]" if report["ok"] else "[red]verify: FAILED[/red]")


@app.command("top")
def top(data_dir: DataDir = None) -> None:
    """The live terminal view alone, against a running mesh (`ordermesh up`)."""
    from ordermesh.mesh import mesh_status

    settings = make_settings(data_dir=data_dir)
    state_file = settings.data_dir / "mesh.json"
    if not state_file.exists():
        err_console.print(
            f"no running mesh found ({state_file} missing); start one with `ordermesh up`"
        )
        raise typer.Exit(code=1)
    state = json.loads(state_file.read_text())
    settings = settings.model_copy(
        update={
            "bootstrap_servers": state["bootstrap_servers"],
            "topic_prefix": state.get("topic_prefix", ""),
        }
    )
    rates = _Rates()
    try:
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                status = mesh_status(settings, state.get("dashboard_url", ""))
                live.update(render(status, rates.update(status), "OrderMesh top — Ctrl-C to quit"))
                time.sleep(1.0)
    except KeyboardInterrupt:
        return
    except OrderMeshError as exc:
        raise fail(exc) from None


@app.command("simulate")
def simulate_cmd(
    rate: Annotated[float, typer.Option(help="Orders per second.")] = 1000.0,
    duration: Annotated[float, typer.Option(help="Seconds of load.")] = 40.0,
    outage: Annotated[float, typer.Option(help="Seconds the inventory stays down.")] = 12.0,
    instances: Annotated[str | None, typer.Option(help="e.g. inventory=2")] = None,
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Failure scenario: kill the inventory under load, restart it, verify nothing was lost."""
    from ordermesh.mesh import Mesh, MeshPlan, parse_instances, simulate

    if outage >= duration:
        raise typer.BadParameter("--outage must be shorter than --duration")
    settings = make_settings(data_dir=data_dir)

    def show(entry: dict[str, Any]) -> None:
        if not as_json:
            numbers = "  ".join(f"{k}={v}" for k, v in entry.items() if k not in ("phase", "t"))
            console.print(f"[cyan]{entry['t']:>6}s[/cyan] [b]{entry['phase']}[/b]  {numbers}")

    try:
        mesh = Mesh(
            settings, MeshPlan(instances=parse_instances(instances), api_port=0, analytics_port=0)
        )
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            report = simulate(mesh, rate=rate, duration=duration, outage_s=outage, on_phase=show)
        finally:
            mesh.stop()
    except OrderMeshError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        console.print(
            f"accepted while inventory was down: {report.accepted_during_outage:,}; "
            f"lag {report.lag_at_outage_start:,} -> peak {report.lag_peak:,}; "
            f"drained in {report.drain_seconds}s; DLQ entries {report.dlq_entries:,}"
        )
        _print_verify(report.verify)
        console.print("[green]simulate: OK[/green]" if report.ok else "[red]simulate: FAILED[/red]")
    if not report.ok:
        raise typer.Exit(code=1)
