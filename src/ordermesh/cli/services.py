"""A ``run`` command for every consumer service of the topology that has none written.

A new consumer service is a ``ServiceSpec`` in ``topology.py``, its core in
``services/`` and its process in ``apps/<name>.py`` with ``run_<name>(settings, *,
idle_exit_s)``. Its command (the spec's ``command``, e.g. ``ordermesh fraud run``) is
registered here with the options every service takes; services that need more (the
dashboard's ``--port``, payments' ``--gateway-url``) write their own command instead,
with ``db_option`` and ``run_app`` from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer

from ordermesh.cli.common import (
    BootstrapServer,
    CommandConfig,
    DataDir,
    fail,
    make_settings,
)
from ordermesh.errors import OrderMeshError
from ordermesh.topology import ServiceSpec


def app_runner(spec: ServiceSpec) -> Callable[..., Any]:
    """``ordermesh.apps.<name>.run_<name>`` of a spec (dashes become underscores)."""
    name = spec.name.replace("-", "_")
    module = importlib.import_module(f"ordermesh.apps.{name}")
    return getattr(module, f"run_{name}")  # type: ignore[no-any-return]


def db_option(name: str) -> Any:
    """The ``--db`` option of a service keeping ``<name>.db`` (``ORDERMESH_<NAME>_DB``)."""
    return typer.Option(
        "--db",
        help=f"{name.capitalize()} database file (default: {name}.db in the data dir).",
        envvar=f"ORDERMESH_{name.upper()}_DB",
        show_envvar=True,
    )


def run_app(spec: ServiceSpec, idle_exit: float | None, **overrides: Any) -> None:
    """Run the service of ``spec`` with settings from ``overrides``."""
    settings = make_settings(**overrides)
    try:
        app_runner(spec)(settings, idle_exit_s=idle_exit)
    except OrderMeshError as exc:
        raise fail(exc) from None


def _command(spec: ServiceSpec) -> Callable[..., None]:
    def run_service(
        data_dir: DataDir = None,
        bootstrap_server: BootstrapServer = None,
        command_config: CommandConfig = None,
        idle_exit: Annotated[
            float | None, typer.Option(help="Exit after this many idle seconds.")
        ] = None,
    ) -> None:
        run_app(
            spec,
            idle_exit,
            data_dir=data_dir,
            bootstrap_servers=bootstrap_server,
            command_config=command_config,
        )

    run_service.__doc__ = (
        f"Run the {spec.name} service: consumes {', '.join(spec.consumes)} in group {spec.group}."
    )
    return run_service


def _has_command(group: Any, words: tuple[str, ...]) -> bool:
    """Whether the typer app ``group`` already has the command ``words``."""
    head, rest = words[0], words[1:]
    for info in group.registered_commands:
        name = info.name or (info.callback.__name__ if info.callback else "")
        if not rest and name == head:
            return True
    for info in group.registered_groups:
        if info.name == head and rest:
            return _has_command(info.typer_instance, rest)
    return False


def register_service_commands(app: typer.Typer, specs: Iterable[ServiceSpec]) -> list[str]:
    """Add the generic ``run`` command of every consumer spec that has none; their names."""
    added = []
    for spec in specs:
        if spec.group is None or _has_command(app, spec.command):
            continue
        target = app
        for word in spec.command[:-1]:
            sub = next((g for g in target.registered_groups if g.name == word), None)
            if sub is None or sub.typer_instance is None:
                new = typer.Typer(no_args_is_help=True, help=f"The {spec.name} service.")
                target.add_typer(new, name=word)
                target = new
            else:
                target = sub.typer_instance
        target.command(spec.command[-1])(_command(spec))
        added.append(" ".join(spec.command))
    return added
