"""Which process reads and writes which topics, in which consumer group, scaled how.

The one declaration that the mesh (what ``up`` starts), the runners (group and topics),
analytics' and ``/health``'s group views, ``verify`` (which groups' offsets mean
"processed") and the README's "what runs" table (checked by a test) derive from. Adding a
consumer service is one ``ServiceSpec`` here, its core in ``services/`` and its process in
``apps/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One OrderMesh process kind.

    ``group``: its consumer group (None: it consumes nothing). ``consumes``/``produces``:
    topic names before the settings' prefix. ``scalable``: several instances run side by
    side (``up --instances``): a consumer's share the partitions of ``group``, an HTTP
    service's each serve their own port over the one shared database.
    ``per_partition_assignment``: it reads every partition itself (manual assignment, no
    group membership), so it cannot be scaled out.
    ``stateful``: its effects are durable, so its committed offsets mean "processed"
    (``verify`` and ``up`` wait for these groups to drain). ``command``: the CLI words
    that run it. ``http``: it serves its own HTTP surface (``/metrics`` included) on
    ``--port``, so the mesh gives it a port rather than a metrics port.
    """

    name: str
    command: tuple[str, ...]
    group: str | None
    consumes: tuple[str, ...]
    produces: tuple[str, ...]
    scalable: bool = False
    per_partition_assignment: bool = False
    stateful: bool = False
    http: bool = False
    owns: str = "-"


SERVICES: Final[tuple[ServiceSpec, ...]] = (
    ServiceSpec(
        "inventory",
        ("inventory", "run"),
        group="inventory",
        consumes=(ORDERS, COMMANDS),
        produces=(EVENTS, DLQ),
        scalable=True,
        stateful=True,
        owns="stock, reservations",
    ),
    ServiceSpec(
        "tracker",
        ("tracker", "run"),
        group="tracker",
        consumes=(ORDERS, EVENTS),
        produces=(DLQ,),
        scalable=True,
        stateful=True,
        owns="order status + history",
    ),
    ServiceSpec(
        "dlq-logger",
        ("dlq", "run"),
        group="dlq-logger",
        consumes=(DLQ,),
        produces=(),
        owns="-",
    ),
    ServiceSpec(
        "analytics",
        ("analytics", "run"),
        group="analytics",
        consumes=(ORDERS, EVENTS, DLQ),
        produces=(),
        per_partition_assignment=True,
        http=True,
        owns="windows in memory",
    ),
    ServiceSpec(
        "api",
        ("api",),
        group=None,
        consumes=(),
        produces=(ORDERS, COMMANDS),
        scalable=True,
        http=True,
        owns="idempotency keys",
    ),
    ServiceSpec(
        "load",
        ("load",),
        group=None,
        consumes=(),
        produces=(ORDERS,),
    ),
)

BY_NAME: Final[dict[str, ServiceSpec]] = {spec.name: spec for spec in SERVICES}


def service(name: str) -> ServiceSpec:
    return BY_NAME[name]


def consumers() -> tuple[ServiceSpec, ...]:
    """The services that consume, in the order the mesh starts them."""
    return tuple(s for s in SERVICES if s.group is not None)


def scalable() -> tuple[str, ...]:
    """The names of the services that run as several instances."""
    return tuple(s.name for s in SERVICES if s.scalable)


def group_topics(*, stateful_only: bool = False) -> dict[str, tuple[str, ...]]:
    """Consumer group -> the topics it reads (names before the prefix)."""
    return {
        s.group: s.consumes
        for s in SERVICES
        if s.group is not None and (s.stateful or not stateful_only)
    }
