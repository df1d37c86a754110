"""`ordermesh fulfilment run`: pick and pack paid orders, announce them ready to ship."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ordermesh.cli.common import (
    BootstrapServer,
    CommandConfig,
    DataDir,
    app,
    fail,
    make_settings,
)
from ordermesh.errors import OrderMeshError

fulfilment_app = typer.Typer(no_args_is_help=True, help="The fulfilment service.")
app.add_typer(fulfilment_app, name="fulfilment")


@fulfilment_app.command("run")
def fulfilment_run(
    db: Annotated[
        Path | None,
        typer.Option(
            "--db",
            help="Fulfilment database file (default: fulfilment.db in the data dir).",
            envvar="ORDERMESH_FULFILMENT_DB",
            show_envvar=True,
        ),
    ] = None,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(help="Exit after this many idle seconds (with no shipment scheduled)."),
    ] = None,
) -> None:
    """Run fulfilment: schedule a shipment per paid order, emit ShipmentReady when packed."""
    from ordermesh.apps.fulfilment import run_fulfilment

    settings = make_settings(
        fulfilment_db=db,
        data_dir=data_dir,
        bootstrap_servers=bootstrap_server,
        command_config=command_config,
    )
    try:
        run_fulfilment(settings, idle_exit_s=idle_exit)
    except OrderMeshError as exc:
        raise fail(exc) from None
