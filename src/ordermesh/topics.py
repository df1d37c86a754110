"""Topic specs of ARCHITECTURE.md; ``kafka.admin.ensure_topics`` creates them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ORDERS = "orders"
COMMANDS = "order-commands"
EVENTS = "order-events"
DLQ = "orders-dlq"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int


SPECS: tuple[TopicSpec, ...] = (
    TopicSpec(ORDERS, 6),
    TopicSpec(COMMANDS, 6),
    TopicSpec(EVENTS, 6),
    TopicSpec(DLQ, 3),
)

EnsureOutcome = Literal["created", "exists"]


@dataclass(frozen=True)
class TopicReport:
    name: str
    partitions: int
    replication_factor: int
    outcome: EnsureOutcome


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of ``brokers``."""
    rf = min(3, brokers)
    return rf, (2 if rf == 3 else 1)
