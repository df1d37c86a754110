"""Shared pieces of the command line: the app, consoles, settings and error exits."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="OrderMesh: Kafka order processing with real stock, tracking and a replayable DLQ.",
)

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def make_settings(**overrides: Any) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)


def fail(exc: OrderMeshError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=1)


def local_cluster(settings: Settings) -> Any:
    from ordermesh.broker.jars import ensure_jars
    from ordermesh.broker.local import LocalCluster

    jar_dir = ensure_jars(settings.kafka_jar_dir(), settings.kafka_version)
    return LocalCluster(settings.broker_dir(), jar_dir, heap_mb=settings.broker_heap_mb)


DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory.")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """OrderMesh: Kafka order processing with real stock, tracking and a replayable DLQ."""
    setup_logging(verbose)
