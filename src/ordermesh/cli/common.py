"""Shared pieces of the command line: the app, consoles, settings, options and exits.

Exit codes of every command:

====  ==========================================================================
0     done; for checks (``verify``, ``simulate``, ``broker status``): all good
1     a check failed: an invariant is violated, the cluster is unhealthy
2     the command line is wrong (unknown option, bad value)
3     Kafka cannot be reached at the configured bootstrap servers
4     any other error (bad settings, a database or broker error), one line why
====  ==========================================================================
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_KAFKA_UNREACHABLE = 3
EXIT_ERROR = 4

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="OrderMesh: Kafka order processing with real stock, tracking and a replayable DLQ.",
)

console = Console()
err_console = Console(stderr=True)

# the settings the running command built last: the exit handler names its cluster
_current: dict[str, Settings] = {}


def setup_logging(verbose: bool = False) -> None:
    from ordermesh.kafka.client import LIBRDKAFKA_LOGGER

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # librdkafka repeats a connection failure many times a second; the command reports
    # it once in its own words, so the raw lines are shown only with -v
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def make_settings(**overrides: Any) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**clean)
    except ValueError as exc:  # pydantic's ValidationError: a bad ORDERMESH_* value
        first = str(exc).splitlines()
        raise fail(OrderMeshError(" ".join(first[:3]))) from None
    _current["settings"] = settings
    return settings


def fail(exc: OrderMeshError) -> typer.Exit:
    """Print ``exc`` as one error line; the exit to raise (code by error class)."""
    from ordermesh.errors import KafkaUnavailableError

    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    code = EXIT_KAFKA_UNREACHABLE if isinstance(exc, KafkaUnavailableError) else EXIT_ERROR
    return typer.Exit(code=code)


def local_cluster(settings: Settings) -> Any:
    """``LocalCluster.from_settings`` with a spinner while the jars may be fetched."""
    from ordermesh.broker.local import LocalCluster

    with status_line(f"fetching the Kafka {settings.kafka_version} jars with Maven (once)"):
        return LocalCluster.from_settings(settings)


class _NoStatus:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


def status_line(message: str, *, quiet: bool = False) -> Any:
    """A spinner with ``message`` on a terminal; nothing when piped or ``quiet`` (--json)."""
    if quiet or not err_console.is_terminal:
        return _NoStatus()
    return err_console.status(escape(message))


def print_verify(report: dict[str, Any]) -> None:
    """The report of ``ordermesh verify`` as a table plus its violations (order ids and
    SKUs are user data: printed as text, never read as markup)."""
    import json

    from rich.table import Table

    table = Table(title="final report (ordermesh verify)")
    table.add_column("check")
    table.add_column("value")
    for key, value in report.items():
        if key != "violations":
            shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
            table.add_row(escape(key), escape(shown))
    console.print(table)
    for line in report.get("violations", []):
        console.print(escape(str(line)), style="red", soft_wrap=True)
    console.print("[green]verify: OK[/green]" if report["ok"] else "[red]verify: FAILED[/red]")


# --- options shared by many commands ----------------------------------------------------

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data directory (databases, logs, local broker).",
        envvar="ORDERMESH_DATA_DIR",
        show_envvar=True,
    ),
]
BootstrapServer = Annotated[
    str | None,
    typer.Option(
        "--bootstrap-server",
        help="Kafka cluster to use, host:port[,host:port]; default: the local broker.",
        envvar="ORDERMESH_BOOTSTRAP_SERVERS",
        show_envvar=True,
    ),
]
CommandConfig = Annotated[
    Path | None,
    typer.Option(
        "--command-config",
        help="Extra Kafka client properties (key=value lines, as Kafka's tools read them).",
        envvar="ORDERMESH_COMMAND_CONFIG",
        show_envvar=True,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _version(value: bool) -> None:
    if value:
        print(f"ordermesh {version('ordermesh')}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logs, librdkafka's own included.")
    ] = False,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """OrderMesh: Kafka order processing with real stock, tracking and a replayable DLQ."""
    setup_logging(verbose)


def run() -> NoReturn:
    """The ``ordermesh`` entry point: the app, with errors turned into one line each."""
    from ordermesh.kafka.client import as_ordermesh_error

    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except OrderMeshError as exc:
        raise SystemExit(fail(exc).exit_code) from None
    except Exception as exc:
        known = as_ordermesh_error(_current.get("settings") or Settings(), exc)
        if known is None:
            raise
        raise SystemExit(fail(known).exit_code) from None
    sys.exit(0)
