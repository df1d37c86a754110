"""`ordermesh fulfilment run`: pick and pack paid orders, announce them ready to ship."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ordermesh.cli.common import BootstrapServer, CommandConfig, DataDir, app
from ordermesh.cli.services import db_option, run_app
from ordermesh.topology import service

fulfilment_app = typer.Typer(no_args_is_help=True, help="The fulfilment service.")
app.add_typer(fulfilment_app, name="fulfilment")


@fulfilment_app.command("run")
def fulfilment_run(
    db: Annotated[Path | None, db_option("fulfilment")] = None,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(help="Exit after this many idle seconds (with no shipment scheduled)."),
    ] = None,
) -> None:
    """Run fulfilment: schedule a shipment per paid order, emit ShipmentReady when packed."""
    run_app(
        service("fulfilment"),
        idle_exit,
        fulfilment_db=db,
        data_dir=data_dir,
        bootstrap_servers=bootstrap_server,
        command_config=command_config,
    )
