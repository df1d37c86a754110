"""`ordermesh db ...`: the local PostgreSQL server and the schema of the services' stores."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ordermesh.cli.common import (
    EXIT_CHECK_FAILED,
    AsJson,
    DataDir,
    app,
    console,
    err_console,
    fail,
    make_settings,
    status_line,
)
from ordermesh.errors import OrderMeshError

db_app = typer.Typer(
    no_args_is_help=True, help="The PostgreSQL database of the services' state (shared by hosts)."
)
app.add_typer(db_app, name="db")

Port = Annotated[
    int | None,
    typer.Option(
        "--port",
        min=0,
        max=65535,
        help="Port of a new server (0: any free one); an existing server keeps its port.",
        envvar="ORDERMESH_POSTGRES_PORT",
        show_envvar=True,
    ),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="The database: postgresql://user:password@host:port/name, or sqlite:.",
        envvar="ORDERMESH_DATABASE_URL",
        show_envvar=True,
    ),
]


@db_app.command("up")
def db_up(port: Port = None, data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Start a local PostgreSQL (idempotent); prints the ORDERMESH_DATABASE_URL to use.

    Only that line goes to stdout: ``export "$(ordermesh db up)"`` sets it.
    """
    from ordermesh.postgres.local import LocalPostgres
    from ordermesh.stores.factory import backend

    settings = make_settings(data_dir=data_dir, postgres_port=port)
    server = LocalPostgres.from_settings(settings)
    try:
        known = server.load_state()
        configured = settings.database_url
        if backend(settings) == "postgres" and (known is None or configured != known.url()):
            # another database is configured: this is not the one to start
            if as_json:
                print(json.dumps({"started": False, "configured": True}))
            else:
                err_console.print(
                    "ORDERMESH_DATABASE_URL is set to another PostgreSQL: using that one,"
                    " starting nothing"
                )
            return
        with status_line("starting PostgreSQL", quiet=as_json):
            state, started = server.up(port=settings.postgres_port)
    except OrderMeshError as exc:
        raise fail(exc) from None
    if as_json:
        status = {"started": started, "url": state.url(), "pid": state.pid, "port": state.port}
        print(json.dumps({**status, "data_dir": str(server.data_dir(state))}))
        return
    where = f"127.0.0.1:{state.port} (pid {state.pid}, data {server.data_dir(state)})"
    err_console.print(
        escape(f"PostgreSQL up at {where}" if started else f"PostgreSQL already up at {where}"),
        soft_wrap=True,
    )
    print(f"ORDERMESH_DATABASE_URL={state.url()}")


@db_app.command("down")
def db_down(
    data_dir: DataDir = None,
    purge: Annotated[bool, typer.Option("--purge", help="Also delete the server's data.")] = False,
) -> None:
    """Stop the local PostgreSQL (pg_ctl stop -m fast)."""
    from ordermesh.postgres.local import LocalPostgres

    settings = make_settings(data_dir=data_dir)
    server = LocalPostgres.from_settings(settings)
    try:
        pid = server.down()
        if purge:
            server.purge()
    except OrderMeshError as exc:
        raise fail(exc) from None
    console.print(f"stopped PostgreSQL (pid {pid})" if pid else "no PostgreSQL running")


@db_app.command("status")
def db_status(data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """The local PostgreSQL: pid, port, data, health. Exits 1 when it is not healthy."""
    from ordermesh.postgres.local import LocalPostgres

    settings = make_settings(data_dir=data_dir)
    try:
        status = LocalPostgres.from_settings(settings).status()
    except OrderMeshError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(status))
    elif "port" not in status:
        console.print(f"no local PostgreSQL in {escape(str(settings.postgres_dir()))}")
    else:
        table = Table(title="local PostgreSQL", show_header=False)
        for key, value in status.items():
            table.add_row(key, escape(str(value)))
        console.print(table)
    if not status["healthy"]:
        raise typer.Exit(code=EXIT_CHECK_FAILED)


@db_app.command("migrate")
def db_migrate(
    database_url: DatabaseUrl = None, data_dir: DataDir = None, as_json: AsJson = False
) -> None:
    """Create or upgrade the stores' schema in the configured database (idempotent)."""
    from ordermesh.stores import factory

    settings = make_settings(data_dir=data_dir, database_url=database_url)
    try:
        with status_line("migrating the stores' schema", quiet=as_json):
            lines = factory.migrate(settings)
    except OrderMeshError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps({"migrated": lines}))
        return
    for line in lines:
        console.print(escape(line), soft_wrap=True)
