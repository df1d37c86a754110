"""The ``ordermesh`` command line: the only place that builds Settings and prints.

Each module registers its commands on the one typer ``app`` in ``common``.
"""

from ordermesh.cli import (  # noqa: F401 - registers commands
    analytics,
    api,
    asyncapi,
    bench,
    broker,
    chaos,
    db,
    dlq,
    fulfilment,
    gateway,
    health,
    inventory,
    mesh,
    payments,
    tracker,
)
from ordermesh.cli.common import app, run
from ordermesh.cli.services import register_service_commands
from ordermesh.topology import SERVICES

# consumer services of the topology without a command of their own get a generic one
register_service_commands(app, SERVICES)

__all__ = ["app", "run"]
