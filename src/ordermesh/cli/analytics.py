"""`ordermesh analytics run`: rolling analytics of the topics and the live dashboard."""

from __future__ import annotations

from typing import Annotated

import typer

from ordermesh.cli.common import (
    BootstrapServer,
    CommandConfig,
    DataDir,
    app,
    console,
    fail,
    make_settings,
)
from ordermesh.errors import OrderMeshError

analytics_app = typer.Typer(no_args_is_help=True, help="Analytics and the live dashboard.")
app.add_typer(analytics_app, name="analytics")


@analytics_app.command("run")
def analytics_run(
    host: Annotated[str, typer.Option(help="Address of the dashboard and /metrics.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8090,
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many idle seconds.")
    ] = None,
    dlq_alert_ratio: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Alert when the last 60 s's dead letters exceed this share of its orders"
            " records (0: on any dead letter). Default 0.05.",
            envvar="ORDERMESH_ANALYTICS_DLQ_ALERT_RATIO",
            show_envvar=True,
        ),
    ] = None,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
) -> None:
    """Consume orders, events and the DLQ from the beginning; serve the dashboard.

    GET / (dashboard), /snapshot (JSON), /lifecycle (the order's funnel, its ends, times
    and money, and the DLQ alert), /groups (consumer groups and lag), /metrics.
    """
    from ordermesh.apps.analytics import run_analytics

    settings = make_settings(
        data_dir=data_dir,
        bootstrap_servers=bootstrap_server,
        command_config=command_config,
        analytics_dlq_alert_ratio=dlq_alert_ratio,
    )
    try:
        stats = run_analytics(settings, host=host, port=port, idle_exit_s=idle_exit)
    except OrderMeshError as exc:
        raise fail(exc) from None
    if console.is_terminal:
        console.print(f"analytics: stopped after {stats.records_in} records")
