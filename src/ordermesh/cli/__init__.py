"""The ``ordermesh`` command line: the only place that builds Settings and prints.

Each module registers its commands on the one typer ``app`` in ``common``.
"""

from ordermesh.cli import (  # noqa: F401 - registers commands
    analytics,
    api,
    bench,
    broker,
    chaos,
    dlq,
    inventory,
    mesh,
    tracker,
)
from ordermesh.cli.common import app, run

__all__ = ["app", "run"]
