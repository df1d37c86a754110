"""Topic specs of ARCHITECTURE.md; ``kafka.admin.ensure_topics`` creates them.

The partition count is a setting (``ORDERMESH_TOPIC_PARTITIONS``, default 6) so that the
topics fit a cluster someone else runs; ``judge_topic`` says what of an existing topic's
shape is an error and what is only worth a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

ORDERS = "orders"
COMMANDS = "order-commands"
EVENTS = "order-events"
DLQ = "orders-dlq"

DEFAULT_PARTITIONS: Final = 6
DLQ_MAX_PARTITIONS: Final = 3


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int


def topic_specs(partitions: int = DEFAULT_PARTITIONS) -> tuple[TopicSpec, ...]:
    """The mesh's topics with ``partitions`` each, the DLQ with at most 3 (it is small).

    ``orders`` and ``order-commands`` always get the same count: with the range assignor
    an order and its cancel then meet in one consumer instance.
    """
    return (
        TopicSpec(ORDERS, partitions),
        TopicSpec(COMMANDS, partitions),
        TopicSpec(EVENTS, partitions),
        TopicSpec(DLQ, min(DLQ_MAX_PARTITIONS, partitions)),
    )


SPECS: tuple[TopicSpec, ...] = topic_specs()

EnsureOutcome = Literal["created", "exists"]


@dataclass(frozen=True)
class TopicReport:
    name: str
    partitions: int
    replication_factor: int
    outcome: EnsureOutcome
    # what differs from the spec but works (more partitions, another retention)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TopicJudgement:
    problems: list[str]
    warnings: list[str]


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of ``brokers``."""
    rf = min(3, brokers)
    return rf, (2 if rf == 3 else 1)


def judge_topic(
    name: str,
    spec: TopicSpec,
    *,
    partitions: int,
    replication_factor: int,
    expected_rf: int,
    retention_ms: str | None = None,
    expected_retention_ms: int | None = None,
) -> TopicJudgement:
    """What is wrong (``problems``) or merely different (``warnings``) about topic
    ``name`` as it exists, against ``spec``.

    Fewer partitions than the spec, or another replication factor, is a problem (the
    mesh's scaling and durability assume them). More partitions is not: keys still map to
    one partition each, and more instances can share the work; a topic someone else
    created bigger is used as it is. A retention other than the configured one is a
    warning: ``verify`` reports what retention deleted.
    """
    problems: list[str] = []
    warnings: list[str] = []
    if partitions < spec.partitions or replication_factor != expected_rf:
        problems.append(
            f"{name}: has {partitions} partitions and RF {replication_factor}, "
            f"expected {spec.partitions} partitions and RF {expected_rf}"
        )
    elif partitions > spec.partitions:
        warnings.append(
            f"{name}: has {partitions} partitions, more than the {spec.partitions}"
            " configured (ORDERMESH_TOPIC_PARTITIONS); used as it is"
        )
    if (
        expected_retention_ms is not None
        and retention_ms is not None
        and retention_ms != str(expected_retention_ms)
    ):
        warnings.append(
            f"{name}: retention.ms is {retention_ms}, not the {expected_retention_ms}"
            " configured (ORDERMESH_TOPIC_RETENTION_MS); left as it is"
        )
    return TopicJudgement(problems, warnings)


def copartition_warning(orders: tuple[str, int], commands: tuple[str, int]) -> str | None:
    """A warning when ``orders`` and ``order-commands`` ((name, partitions) each) differ
    in partition count: the range assignor no longer co-assigns them."""
    (orders_name, orders_count), (commands_name, commands_count) = orders, commands
    if orders_count == commands_count:
        return None
    return (
        f"{orders_name} has {orders_count} partitions but {commands_name} has"
        f" {commands_count}: an order and its cancel may go to different inventory"
        " instances"
    )
