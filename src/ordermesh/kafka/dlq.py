"""DLQ tools against Kafka: read the dead-letter topic, replay entries to their source.

The decisions are in ``services/dlq.py`` (pure); this module only reads and produces.

Replay safety: a replay produces with the idempotent producer, waits for every ack and
reports where each record landed. Running the same replay twice re-publishes the same
bytes and headers; consumers are idempotent per order_id (the inventory re-emits the
outcome it recorded and changes nothing), so the second run is a no-op for the state.
Nothing is recorded about a replay besides the records themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from ordermesh.config import Settings
from ordermesh.kafka.client import make_producer
from ordermesh.kafka.reader import read_topic
from ordermesh.services.dlq import (
    DlqEntry,
    DlqOffset,
    Replay,
    ReplayPlan,
    matches_reason,
    parse_entry,
    plan_replay,
)
from ordermesh.topics import DLQ

log = logging.getLogger(__name__)

# a replay is an operator command: fail within a minute rather than retry for 5 minutes
REPLAY_TIMEOUT_MS = 60_000


def read_entries(settings: Settings) -> list[DlqEntry]:
    """Every record of the DLQ topic, up to its current end, in (partition, offset) order."""
    entries = [parse_entry(rec) for rec in read_topic(settings, settings.topic(DLQ))]
    entries.sort(key=lambda e: (e.partition, e.offset))
    return entries


def list_entries(
    settings: Settings, *, reasons: Collection[str] = (), limit: int | None = None
) -> tuple[list[DlqEntry], int]:
    """The newest ``limit`` entries matching ``reasons`` (oldest first) and how many matched."""
    entries = [e for e in read_entries(settings) if not reasons or matches_reason(e, reasons)]
    entries.sort(key=lambda e: (e.timestamp_ms, e.partition, e.offset))
    total = len(entries)
    if limit is not None:
        entries = entries[-limit:] if limit > 0 else []
    return entries, total


@dataclass(frozen=True, slots=True)
class Sent:
    """A replayed record, acknowledged at ``topic[partition]@offset``."""

    replay: Replay
    topic: str
    partition: int
    offset: int

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass
class ReplayResult:
    plan: ReplayPlan
    dry_run: bool
    sent: list[Sent] = field(default_factory=list)
    failed: list[tuple[Replay, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def replay(
    settings: Settings,
    *,
    reasons: Collection[str] = (),
    offsets: Collection[DlqOffset] = (),
    max_replays: int | None = None,
    dry_run: bool = False,
) -> ReplayResult:
    """Plan a replay over the whole DLQ and, unless ``dry_run``, produce it and wait for acks.

    Raises ValueError for an empty selection. Delivery failures are reported in the
    result, not raised: what was acknowledged stays acknowledged, and a rerun is safe.
    """
    limit = settings.dlq_max_replays if max_replays is None else max_replays
    plan = plan_replay(read_entries(settings), reasons=reasons, offsets=offsets, max_replays=limit)
    result = ReplayResult(plan, dry_run)
    if dry_run or not plan.replays:
        return result
    producer = make_producer(settings, **{"message.timeout.ms": REPLAY_TIMEOUT_MS})
    reported: set[int] = set()
    for index, item in enumerate(plan.replays):
        _produce(producer, item, _on_delivery(result, item, index, reported))
    # flush() without a timeout returns once every record is acknowledged or failed
    # (message.timeout.ms bounds that)
    producer.flush()
    for index, item in enumerate(plan.replays):
        if index not in reported:
            result.failed.append((item, "no delivery report"))
    order = {id(item): index for index, item in enumerate(plan.replays)}
    result.sent.sort(key=lambda sent: order[id(sent.replay)])
    log.info(
        "dlq replay: %d sent, %d failed, %d refused",
        len(result.sent),
        len(result.failed),
        len(plan.refused),
    )
    return result


def _on_delivery(
    result: ReplayResult, item: Replay, index: int, reported: set[int]
) -> Callable[[Any, Any], None]:
    def on_delivery(err: Any, msg: Any) -> None:
        reported.add(index)
        if err is not None:
            result.failed.append((item, str(err)))
            log.warning("dlq replay: %s not acknowledged: %s", item.entry.where(), err)
        else:
            result.sent.append(Sent(item, msg.topic(), msg.partition(), msg.offset()))

    return on_delivery


def _produce(producer: Any, item: Replay, on_delivery: Callable[[Any, Any], None]) -> None:
    out = item.record
    while True:
        try:
            producer.produce(
                out.topic, out.value, out.key, headers=out.headers, on_delivery=on_delivery
            )
            return
        except BufferError:
            producer.poll(0.05)  # local queue full: serve delivery reports to make room
