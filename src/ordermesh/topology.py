"""Which process reads and writes which topics, in which consumer group, scaled how.

The one declaration that the mesh (what ``up`` starts), the runners (group and topics),
analytics' and ``/health``'s group views, ``verify`` (which groups' offsets mean
"processed") and the README's "what runs" table (checked by a test) derive from. Adding a
consumer service is one ``ServiceSpec`` here, its core in ``services/`` and its process in
``apps/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS


class Fetch(NamedTuple):
    """How long the broker may hold a consumer's fetch to fill it: it answers once
    ``min_bytes`` are there, or after ``max_wait_ms`` (librdkafka's ``fetch.min.bytes``
    and ``fetch.wait.max.ms``). Under a backlog every fetch is full at once either way."""

    min_bytes: int
    max_wait_ms: int


# A broker answering every fetch at its first byte answers each consumer about once per
# round trip: measured at 5,000 orders/s on 2 cores, the broker then used 80% of a core
# and the machine was 95% busy, so the services waited for a CPU and created -> decided
# had a p99 of 239 ms. With these two, the broker used 58%, the machine 79%, and the p99
# was 56 ms; at 1,000 orders/s the p50 went from 3.7 to 3.0 ms.
# On an order's path (the inventory deciding it, the tracker showing it): 2 ms at most.
ORDER_PATH: Final = Fetch(16_384, 2)
# Off it (analytics' windows, the DLQ logger): 100 ms at most, unseen on a dashboard.
OFF_PATH: Final = Fetch(1_048_576, 100)
# An order's later steps (payments and fulfilment acting on its events): 25 ms at most,
# next to a card processor's 150 ms and a parcel's half second.
LATER_STEPS: Final = Fetch(262_144, 25)


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
    ``--port``, so the mesh gives it a port rather than a metrics port. ``fetch``: how
    long the broker may hold its fetches (``Fetch``).
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
    fetch: Fetch = ORDER_PATH


SERVICES: Final[tuple[ServiceSpec, ...]] = (
    # first: payments reaches it from its start
    ServiceSpec(
        "gateway",
        ("gateway",),
        group=None,
        consumes=(),
        produces=(),
        http=True,
        owns="its ledger (the ground truth for money)",
    ),
    ServiceSpec(
        "inventory",
        ("inventory", "run"),
        group="inventory",
        # order-events: the payments' and fulfilment's facts it decides on; it produces
        # order-commands itself (its deadline sweep's expiries and due restocks)
        consumes=(ORDERS, COMMANDS, EVENTS),
        produces=(EVENTS, COMMANDS, DLQ),
        scalable=True,
        stateful=True,
        owns="stock, reservations, deadlines, restocks",
    ),
    ServiceSpec(
        "payments",
        ("payments", "run"),
        group="payments",
        consumes=(EVENTS,),
        produces=(EVENTS, DLQ),
        scalable=True,
        stateful=True,
        owns="one row per order and operation, with its idempotency key",
        fetch=LATER_STEPS,
    ),
    ServiceSpec(
        "fulfilment",
        ("fulfilment", "run"),
        group="fulfilment",
        consumes=(EVENTS,),
        produces=(EVENTS, DLQ),
        scalable=True,
        stateful=True,
        owns="shipments",
        fetch=LATER_STEPS,
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
        fetch=OFF_PATH,
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
        fetch=OFF_PATH,
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
        # its share of customers cancel (``ordermesh load --cancel-ratio``)
        produces=(ORDERS, COMMANDS),
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
