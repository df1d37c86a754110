"""DLQ tools: list the dead-letter topic, replay entries to their source.

The decisions are in ``services/dlq.py`` (pure); reading and producing are
``kafka.reader.read_topic`` and ``kafka.producer.deliver``; this module runs them.

Replay safety: a replay produces with the idempotent producer, waits for every ack and
reports where each record landed. Running the same replay twice re-publishes the same
bytes and headers; consumers are idempotent per order_id (the inventory re-emits the
outcome it recorded and changes nothing), so the second run is a no-op for the state.
Nothing is recorded about a replay besides the records themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from ordermesh.config import Settings
from ordermesh.kafka.producer import deliver
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
    reports = deliver(
        settings,
        [item.record for item in plan.replays],
        **{"message.timeout.ms": REPLAY_TIMEOUT_MS},
    )
    for item, report in zip(plan.replays, reports, strict=True):
        if report is None:
            result.failed.append((item, "no delivery report"))
        elif report.error is not None:
            result.failed.append((item, report.error))
            log.warning("dlq replay: %s not acknowledged: %s", item.entry.where(), report.error)
        else:
            result.sent.append(Sent(item, report.topic, report.partition, report.offset))
    log.info(
        "dlq replay: %d sent, %d failed, %d refused",
        len(result.sent),
        len(result.failed),
        len(plan.refused),
    )
    return result
