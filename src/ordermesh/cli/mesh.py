"""`ordermesh up`, `ordermesh top` and `ordermesh simulate`: the whole mesh at once."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ordermesh.cli.common import (
    EXIT_CHECK_FAILED,
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
    print_verify,
    status_line,
)
from ordermesh.errors import OrderMeshError
from ordermesh.loadgen import DEFAULT_STOCK


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


def _cell(value: object) -> str:
    """A table cell for data the mesh does not control (reasons, names): never markup."""
    return escape(str(value))


def render(
    status: dict[str, Any] | None, rates: dict[str, float], header: str, note: str = ""
) -> Group:
    """The live terminal view: rates, totals, outcomes, DLQ, lag, services.

    ``status`` None: nothing measured yet (Kafka warming up); ``note`` says why numbers
    are missing or stale.
    """
    if status is None:
        body = Text(f"warming up: {note or 'waiting for Kafka'}", style="yellow")
        return Group(Panel(body, title=header, border_style="cyan"))
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
        outcomes.add_row(_cell(f"rejected {reason}"), f"{n:,}")
    for reason, n in sorted((totals.get("dlq_by_reason") or {}).items()):
        outcomes.add_row(_cell(f"dlq {reason}"), f"{n:,}")
    latency = ((snap.get("windows") or {}).get("10s") or {}).get("latency_ms") or {}
    if latency.get("p50") is not None:
        outcomes.add_row(
            "latency p50 / p99 (10s)",
            f"{latency.get('p50') or 0:.0f} / {latency.get('p99') or 0:.0f} ms",
        )
    lag = Table("consumer group", "lag", box=None)
    for group, value in status["lag"].items():
        lag.add_row(_cell(group), f"{value:,}")
    services = Table("service", "pid", "state", "restarts", box=None)
    for name, s in status.get("services", {}).items():
        services.add_row(
            _cell(name),
            str(s["pid"]),
            "[green]up[/green]" if s["running"] else "[red]down[/red]",
            str(s["restarts"]),
        )
    top_row = Table.grid(padding=(0, 4))
    top_row.add_row(t, outcomes)
    bottom_row = Table.grid(padding=(0, 4))
    bottom_row.add_row(lag, services)
    parts: list[Any] = [top_row, "", bottom_row]
    funnel = _funnel_line(snap)
    if funnel is not None:
        parts[1:1] = ["", funnel]
    if note:
        parts.append(Text(note, style="yellow"))
    return Group(Panel(Group(*parts), title=header, border_style="cyan"))


def _funnel_line(snap: dict[str, Any]) -> Text | None:
    """The order's life in one line: the funnel's steps, then its failure ends (the
    statuses come from analytics, which derives them from lifecycle.py)."""
    life = (snap.get("lifecycle") or {}).get("all")
    if not life:
        return None
    line = Text("funnel  ", style="bold")
    for i, (status, n) in enumerate(life["funnel"].items()):
        line.append(" / " if i else "")
        line.append(f"{status.lower()} ")
        line.append(f"{n:,}", style="green")
    line.append("   ends  ", style="bold")
    for i, (status, end) in enumerate(life["ends"].items()):
        line.append(" · " if i else "")
        line.append(f"{status.lower().replace('_', ' ')} ")
        line.append(f"{end['total']:,}", style="yellow" if end["total"] else "")
    return line


class LiveView:
    """Numbers for the live view that survive Kafka's transient errors.

    While the broker or a group coordinator warms up (NOT_COORDINATOR,
    COORDINATOR_LOAD_IN_PROGRESS, timeouts), ``read`` raises; the view then shows
    "warming up" or the last good numbers with the reason, and tries again next tick.
    """

    def __init__(self, read: Callable[[], dict[str, Any]], header: str) -> None:
        self.read = read
        self.header = header
        self.rates = _Rates()
        self.last: dict[str, Any] | None = None
        self.errors = 0

    def tick(self) -> Group:
        try:
            status = self.read()
        except OrderMeshError as exc:
            self.errors += 1
            if self.last is None:
                return render(None, {}, self.header, str(exc))
            age = time.time() - self.last["at"]
            note = f"numbers from {age:.0f}s ago; Kafka did not answer: {exc}"
            return render(self.last, {}, self.header, note)
        self.last = status
        return render(status, self.rates.update(status), self.header)


def _live_loop(mesh: Any, deadline: float | None, header: str) -> None:
    view = LiveView(mesh.status, header)
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        while deadline is None or time.monotonic() < deadline:
            mesh.supervisor.check()
            live.update(view.tick())
            mesh.write_state(live=_live_numbers(view.last))
            time.sleep(1.0)
            if deadline is not None and not mesh.load_running() and mesh.drained():
                break


def _live_numbers(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """The numbers ``mesh.json`` keeps for scripts: topic ends, lag, decided orders."""
    if status is None:
        return None
    totals = (status.get("analytics") or {}).get("totals") or {}
    rejected = sum((totals.get("rejected") or {}).values())
    return {
        "at": status["at"],
        "orders_placed": status["topics"]["orders"],
        "events": status["topics"]["order-events"],
        "dlq": status["topics"]["orders-dlq"],
        "decided": int(totals.get("reserved", 0)) + int(rejected),
        "lag": status["lag"],
    }


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP end ``up`` like Ctrl-C: everything it started is stopped.

    SIGINT too, explicitly: Python leaves it ignored when the parent ignored it (a shell
    without job control starts every background command so), and then Ctrl-C did nothing.
    """
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)


@app.command("up")
def up(
    rate: Annotated[
        float, typer.Option(help="Orders per second of the load (0: no load).")
    ] = 1000.0,
    duration: Annotated[
        float | None,
        typer.Option(help="Stop the load after S seconds, drain and verify (default: Ctrl-C)."),
    ] = None,
    instances: Annotated[
        str | None,
        typer.Option(
            help="Instances per scalable service, e.g. inventory=3,tracker=2,api=2; more than"
            " one needs --db postgres. With PostgreSQL each instance has a data dir of its own."
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            metavar="sqlite|postgres",
            help="Where the services keep their state: SQLite files in the data dir, or"
            " PostgreSQL (ORDERMESH_DATABASE_URL if set, else a local server started and"
            " stopped with the mesh). Default: postgres when ORDERMESH_DATABASE_URL names"
            " one, else sqlite.",
        ),
    ] = None,
    nodes: Annotated[
        int, typer.Option("--nodes", help="Kafka nodes of the local cluster: 1 or 3.")
    ] = 1,
    malformed_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of malformed messages in the load.")
    ] = 0.01,
    skus: Annotated[int, typer.Option(min=1, help="SKUs to seed: SKU-00001..SKU-N.")] = 1000,
    stock: Annotated[
        int, typer.Option(min=0, help="Units per new SKU (existing SKUs keep theirs).")
    ] = DEFAULT_STOCK,
    api_port: Annotated[
        int, typer.Option(min=0, max=65535, help="Orders API port (taken: any free one).")
    ] = 8080,
    dashboard_port: Annotated[
        int, typer.Option(min=0, max=65535, help="Dashboard port (taken: any free one).")
    ] = 8090,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    keep_broker: Annotated[bool, typer.Option(help="Leave the local broker running.")] = False,
    keep_db: Annotated[
        bool, typer.Option(help="Leave the local PostgreSQL running (--db postgres).")
    ] = False,
) -> None:
    """Run the whole mesh: broker, database, topics, stock, every service, a load, live
    numbers."""
    from ordermesh.mesh import Mesh, MeshPlan, check_plan, parse_instances
    from ordermesh.stores.factory import backend
    from ordermesh.verify import verify

    settings = make_settings(
        data_dir=data_dir, bootstrap_servers=bootstrap_server, command_config=command_config
    )
    if db not in (None, "sqlite", "postgres"):
        raise typer.BadParameter(f"--db must be sqlite or postgres, not {db!r}")
    try:
        plan = MeshPlan(
            instances=parse_instances(instances),
            skus=skus,
            stock=stock,
            api_port=api_port,
            analytics_port=dashboard_port,
            db="postgres" if (db or backend(settings)) == "postgres" else "sqlite",
            nodes=nodes,
        )
        check_plan(plan, settings)
    except OrderMeshError as exc:
        raise fail(exc) from None
    mesh = Mesh(settings, plan)
    _stop_on_signals()
    report = None
    try:
        try:
            with status_line("starting Kafka, the database, topics and services"):
                mesh.start()
            console.print(
                f"dashboard: [link]{mesh.dashboard_url}[/link]   API: {', '.join(mesh.api_urls)}"
                f"   logs: {escape(str(mesh.supervisor.log_dir))}"
            )
            if plan.db == "postgres":
                where = mesh.database.load_state() if mesh.database is not None else None
                shown = where.redacted_url() if where is not None else "ORDERMESH_DATABASE_URL"
                console.print(f"database: {escape(shown)}")
            if rate > 0:
                mesh.start_load(rate=rate, duration=duration, malformed_ratio=malformed_ratio)
            deadline = time.monotonic() + duration if duration is not None else None
            _live_loop(mesh, deadline, "OrderMesh — Ctrl-C to stop")
            if deadline is not None:
                console.print("load finished; waiting for the services to drain ...")
                mesh.wait_drained(120)
        except KeyboardInterrupt:
            console.print("stopping: load and API first ...")
            try:
                mesh.stop_inputs()
                console.print("letting the services drain (up to 30 s; Ctrl-C again to skip)")
                mesh.wait_drained(30)
            except KeyboardInterrupt:
                pass
        mesh.stop_for_verify()
        with status_line("verifying (reading every topic and the gateway's ledger)"):
            report = verify(mesh.settings)
    finally:
        # every exit path (an error, Ctrl-C, SIGTERM, SIGHUP) ends what up started
        mesh.stop(stop_broker=not keep_broker, stop_db=not keep_db)
    print_verify(report.as_dict())
    if not report.ok:
        raise typer.Exit(code=EXIT_CHECK_FAILED)


@app.command("top")
def top(data_dir: DataDir = None) -> None:
    """The live terminal view alone, against a running mesh (`ordermesh up`)."""
    from ordermesh.mesh import mesh_status

    settings = make_settings(data_dir=data_dir)
    state_file = settings.data_dir / "mesh.json"
    if not state_file.exists():
        err_console.print(
            f"no running mesh found ({escape(str(state_file))} missing); "
            "start one with `ordermesh up`"
        )
        raise typer.Exit(code=EXIT_ERROR)
    state = json.loads(state_file.read_text())
    settings = settings.model_copy(
        update={
            "bootstrap_servers": state["bootstrap_servers"],
            "topic_prefix": state.get("topic_prefix", ""),
        }
    )
    dashboard = state.get("dashboard_url", "")
    view = LiveView(lambda: mesh_status(settings, dashboard), "OrderMesh top — Ctrl-C to quit")
    try:
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                live.update(view.tick())
                time.sleep(1.0)
    except KeyboardInterrupt:
        return


@app.command("simulate")
def simulate_cmd(
    rate: Annotated[float, typer.Option(help="Orders per second.")] = 1000.0,
    duration: Annotated[float, typer.Option(help="Seconds of load.")] = 40.0,
    outage: Annotated[float, typer.Option(help="Seconds the inventory stays down.")] = 12.0,
    instances: Annotated[
        str | None, typer.Option(help="Instances per scalable service, e.g. inventory=2.")
    ] = None,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    as_json: AsJson = False,
) -> None:
    """Failure scenario: kill the inventory under load, restart it, verify nothing was lost."""
    from ordermesh.mesh import Mesh, MeshPlan, parse_instances, simulate

    if outage >= duration:
        raise typer.BadParameter("--outage must be shorter than --duration")
    settings = make_settings(
        data_dir=data_dir, bootstrap_servers=bootstrap_server, command_config=command_config
    )

    def show(entry: dict[str, Any]) -> None:
        if not as_json:
            numbers = "  ".join(f"{k}={v}" for k, v in entry.items() if k not in ("phase", "t"))
            console.print(
                f"[cyan]{entry['t']:>6}s[/cyan] [b]{escape(entry['phase'])}[/b]  {escape(numbers)}"
            )

    # the inventory's crash and its backlog are what is watched: orders end at their
    # reservation, so 1,000 orders/s leaves the 2 cores it was sized on for the inventory
    # (the whole life at that rate is `up`'s; its faults are `ordermesh chaos`'s rows)
    plan = MeshPlan(
        instances=parse_instances(instances), api_port=0, analytics_port=0, lifecycle=False
    )
    mesh = Mesh(settings, plan)
    _stop_on_signals()
    try:
        report = simulate(mesh, rate=rate, duration=duration, outage_s=outage, on_phase=show)
    except KeyboardInterrupt:
        err_console.print("interrupted; stopping what simulate started")
        raise typer.Exit(code=130) from None
    finally:
        mesh.stop()
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        console.print(
            f"accepted while inventory was down: {report.accepted_during_outage:,}; "
            f"lag {report.lag_at_outage_start:,} -> peak {report.lag_peak:,}; "
            f"drained in {report.drain_seconds}s; DLQ entries {report.dlq_entries:,}"
        )
        print_verify(report.verify)
        console.print("[green]simulate: OK[/green]" if report.ok else "[red]simulate: FAILED[/red]")
    if not report.ok:
        raise typer.Exit(code=EXIT_CHECK_FAILED)
