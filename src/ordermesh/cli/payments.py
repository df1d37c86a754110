"""`ordermesh payments run`: authorize, capture, void and refund at the payment gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ordermesh.cli.common import BootstrapServer, CommandConfig, DataDir, app
from ordermesh.cli.services import db_option, run_app
from ordermesh.topology import service

payments_app = typer.Typer(no_args_is_help=True, help="The payments service.")
app.add_typer(payments_app, name="payments")


@payments_app.command("run")
def payments_run(
    db: Annotated[Path | None, db_option("payments")] = None,
    gateway_url: Annotated[
        str | None,
        typer.Option(
            help="The payment gateway (default: the local one on ORDERMESH_GATEWAY_PORT).",
            envvar="ORDERMESH_GATEWAY_URL",
            show_envvar=True,
        ),
    ] = None,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(help="Exit after this many idle seconds (with no gateway work left)."),
    ] = None,
) -> None:
    """Run payments: authorize reserved orders, capture shipped ones, void or refund the rest."""
    run_app(
        service("payments"),
        idle_exit,
        payments_db=db,
        gateway_url=gateway_url,
        data_dir=data_dir,
        bootstrap_servers=bootstrap_server,
        command_config=command_config,
    )
