"""Dead-letter queue core: read DLQ records, alert on them, plan their replay.

Pure: no Kafka inside. ``DlqLogger.handle(batch)`` is the service the DLQ logger runs
(one alert line per record, counts by reason); ``plan_replay`` decides which DLQ entries
go back to their source topic and builds the records to produce. ``ordermesh/dlq.py`` reads
the topic and produces.

Choices worth knowing:

- ``order_id`` comes from the key when it looks like one (every topic is keyed by
  order_id), else from a lenient peek into the value: a JSON decode, then a regex over
  the raw bytes so truncated or non-UTF-8 payloads still name their order. It never
  raises; ``None`` means "not known".
- Selection: ``reasons`` match an error class exactly or as a dotted prefix
  (``DecodeError`` selects every ``DecodeError.<kind>``); ``offsets`` are DLQ-topic
  offsets, ``P:O`` (or ``P@O``, as ``dlq list`` prints them) for one partition, or a plain
  ``O`` for that offset in any partition -- refused as ambiguous if it hits more than one
  entry. Several reasons (or offsets) are alternatives; reasons and offsets together must
  both match. Giving neither is an error: a replay tool never selects everything by
  default.
- Refused, with why: a replay count at or above ``max_replays``, an unreadable count, a
  missing source topic, an entry *superseded* by a later DLQ entry (its replay failed
  again: that later entry carries ``ordermesh.replay.from`` pointing at it and is the one
  to replay, so old entries, which stay in the topic forever, never fan out again), and a
  second DLQ entry of the same source record (at-least-once can dead-letter a record
  twice; one copy is enough).
- Skipped, with why: an entry whose ``ordermesh.error.topic`` names a topic OrderMesh does
  not consume (``REPLAY_TOPICS`` under the deployment's topic prefix). The header is just
  bytes in a record anyone able to write to the DLQ could have made; a replay must never
  become a way to publish arbitrary bytes to an arbitrary topic (the DLQ itself included).
- A replayed record keeps the original key, value and headers, with
  ``ordermesh.replay.count`` = count + 1 and ``ordermesh.replay.from`` = the DLQ entry
  (``topic[p]@o``); error headers are dropped. When it fails again, the service's
  ``dead_letter`` keeps those headers, so the count survives the round trip.
- Replaying the same entry twice re-publishes the same bytes and headers. That is safe
  because effects are idempotent per order_id downstream (the inventory re-emits the
  outcome it recorded); no replay log is kept on purpose.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import msgspec

from ordermesh.records import (
    ERROR_HEADER_PREFIX,
    REPLAY_COUNT_HEADER,
    TRUNCATED_HEADER,
    Headers,
    InRecord,
    OutRecord,
    header,
)
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS

logger = logging.getLogger(__name__)

REPLAY_FROM_HEADER: Final = "ordermesh.replay.from"
UNKNOWN_REASON: Final = "unknown"
MAX_ORDER_ID: Final = 64
# The topics OrderMesh services consume, and so the only ones a replay may write to
# (unprefixed names; see replay_topics).
REPLAY_TOPICS: Final = (ORDERS, COMMANDS, EVENTS)

# `"order_id": "..."` anywhere in the bytes: finds the id in truncated or non-UTF-8 JSON
_ORDER_ID_RE: Final = re.compile(rb'"order_id"\s*:\s*"([^"\\]{1,64})"')
_PLAIN_VALUE_RE: Final = re.compile(r"[\w.:@\[\]/+\-]+")


@dataclass(frozen=True, slots=True)
class DlqEntry:
    """One DLQ record, decoded leniently; never fails to build."""

    dlq_topic: str
    partition: int
    offset: int
    timestamp_ms: int  # of the DLQ record
    key: bytes | None
    value: bytes | None
    headers: Headers  # the original headers, error headers removed
    error_headers: dict[str, str]  # ``<name>`` of ``ordermesh.error.<name>`` -> text
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    source_timestamp_ms: int | None
    service: str
    stage: str
    error_class: str
    message: str
    replay_count: int | None  # 0 when never replayed; None when the header is unreadable
    replayed_from: str | None  # the DLQ entry this record was replayed from, if any
    order_id: str | None

    def where(self) -> str:
        """This entry in the DLQ topic: ``orders-dlq[p]@o``."""
        return f"{self.dlq_topic}[{self.partition}]@{self.offset}"

    def position(self) -> str:
        """Short DLQ position, as ``dlq list`` shows it and ``--offset`` accepts: ``p@o``."""
        return f"{self.partition}@{self.offset}"

    def source(self) -> str:
        """Where the record was consumed from: ``topic[p]@o`` (``?`` for unknown parts)."""
        topic = self.source_topic or "?"
        part = "?" if self.source_partition is None else str(self.source_partition)
        off = "?" if self.source_offset is None else str(self.source_offset)
        return f"{topic}[{part}]@{off}"

    def source_id(self) -> tuple[str, int, int] | None:
        if self.source_topic is None or self.source_partition is None:
            return None
        if self.source_offset is None:
            return None
        return (self.source_topic, self.source_partition, self.source_offset)


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", "replace")


def _int(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None


def _plausible_id(text: str) -> str | None:
    return text if 0 < len(text) <= MAX_ORDER_ID and text.isprintable() else None


def peek_order_id(value: bytes | None) -> str | None:
    """The ``order_id`` a payload names, however broken it is; None if none is found."""
    if not value:
        return None
    try:
        decoded: Any = msgspec.json.decode(value)
    except Exception:  # noqa: BLE001 - any garbage: fall back to the regex
        decoded = None
    if isinstance(decoded, dict):
        found = decoded.get("order_id")
        if isinstance(found, str):
            return _plausible_id(found)
    match = _ORDER_ID_RE.search(value)
    if match is None:
        return None
    return _plausible_id(match.group(1).decode("utf-8", "replace"))


def order_id_of(key: bytes | None, value: bytes | None) -> str | None:
    """The order a record is about: its key if that looks like an id, else a value peek."""
    if key:
        try:
            from_key = _plausible_id(key.decode("utf-8"))
        except UnicodeDecodeError:
            from_key = None
        if from_key is not None:
            return from_key
    return peek_order_id(value)


def parse_entry(rec: InRecord) -> DlqEntry:
    """A ``DlqEntry`` of one consumed DLQ record; missing or bad headers become None/""."""
    original: Headers = []
    errors: dict[str, str] = {}
    for name, raw in rec.headers:
        if name.startswith(ERROR_HEADER_PREFIX):
            errors[name[len(ERROR_HEADER_PREFIX) :]] = _text(raw)
        else:
            original.append((name, raw))

    def err(name: str) -> bytes | None:
        return header(rec.headers, ERROR_HEADER_PREFIX + name)

    count_raw = header(original, REPLAY_COUNT_HEADER)
    replay_count = 0 if count_raw is None else _int(count_raw)
    if replay_count is not None and replay_count < 0:
        replay_count = None
    from_raw = header(original, REPLAY_FROM_HEADER)
    source_topic = _text(err("topic")) or None
    return DlqEntry(
        dlq_topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        timestamp_ms=rec.timestamp_ms,
        key=rec.key,
        value=rec.value,
        headers=original,
        error_headers=errors,
        source_topic=source_topic,
        source_partition=_int(err("partition")),
        source_offset=_int(err("offset")),
        source_timestamp_ms=_int(err("timestamp")),
        service=_text(err("service")),
        stage=_text(err("stage")),
        error_class=_text(err("class")),
        message=_text(err("message")),
        replay_count=replay_count,
        replayed_from=None if from_raw is None else _text(from_raw),
        order_id=order_id_of(rec.key, rec.value),
    )


def reason(entry: DlqEntry) -> str:
    """Why the record is in the DLQ: its error class (``DecodeError.json``, ...)."""
    return entry.error_class or UNKNOWN_REASON


def matches_reason(entry: DlqEntry, reasons: Collection[str]) -> bool:
    """True if ``entry``'s reason equals one of ``reasons`` or has one as dotted prefix."""
    r = reason(entry)
    return any(r == want or r.startswith(want + ".") for want in reasons)


# --- alerts -------------------------------------------------------------------------------


def _kv(value: str) -> str:
    """A log value that keeps the line one line and parseable: quoted unless plain."""
    if value and _PLAIN_VALUE_RE.fullmatch(value):
        return value
    return json.dumps(value)  # ASCII-only: escapes newlines and every other control


def alert_line(entry: DlqEntry) -> str:
    """The one structured line logged for a DLQ record."""
    count = "?" if entry.replay_count is None else str(entry.replay_count)
    return (
        f"DLQ ALERT reason={_kv(reason(entry))} source={_kv(entry.source())}"
        f" order_id={_kv(entry.order_id or '-')} service={_kv(entry.service or '-')}"
        f" stage={_kv(entry.stage or '-')} replays={count} dlq={_kv(entry.where())}"
        f" message={_kv(entry.message)}"
    )


class DlqLogger:
    """The DLQ logger service: one WARNING alert line per record, counts by reason.

    Produces nothing. A summary line (INFO) follows every ``summary_every_records``
    records or ``summary_every_s`` seconds, whichever comes first; it is checked when a
    batch arrives, so an idle DLQ stays quiet.
    """

    def __init__(
        self,
        *,
        summary_every_s: float = 60.0,
        summary_every_records: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts: Counter[str] = Counter()
        self.total = 0
        self.summary_every_s = summary_every_s
        self.summary_every_records = summary_every_records
        self._clock = clock
        self._last_summary = clock()
        self._since_summary = 0

    def handle(self, batch: Sequence[InRecord]) -> list[OutRecord]:
        for rec in batch:
            entry = parse_entry(rec)
            self.counts[reason(entry)] += 1
            # one line per record on purpose: each DLQ record is an operator alert
            logger.warning("%s", alert_line(entry))
        self.total += len(batch)
        self._since_summary += len(batch)
        now = self._clock()
        if self._since_summary and (
            self._since_summary >= self.summary_every_records
            or now - self._last_summary >= self.summary_every_s
        ):
            self.log_summary()
        return []

    def summary(self) -> str:
        by_reason = ", ".join(f"{r}={n}" for r, n in self.counts.most_common()) or "none"
        return f"DLQ summary: {self.total} entries ({self._since_summary} new): {by_reason}"

    def log_summary(self) -> None:
        logger.info("%s", self.summary())
        self._since_summary = 0
        self._last_summary = self._clock()


# --- replay -------------------------------------------------------------------------------


class DlqOffset(NamedTuple):
    """An ``--offset`` selector: a DLQ-topic offset, in one partition or in any (None)."""

    partition: int | None
    offset: int

    def __str__(self) -> str:
        return str(self.offset) if self.partition is None else f"{self.partition}:{self.offset}"


def parse_offset(text: str) -> DlqOffset:
    """``"P:O"``, ``"P@O"`` or ``"O"``; raises ValueError on anything else."""
    parts = re.split(r"[:@]", text.strip())
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"bad DLQ offset {text!r}: expected P:O, P@O or O") from None
    if len(numbers) > 2 or any(n < 0 for n in numbers):
        raise ValueError(f"bad DLQ offset {text!r}: expected P:O, P@O or O")
    if len(numbers) == 2:
        return DlqOffset(numbers[0], numbers[1])
    return DlqOffset(None, numbers[0])


@dataclass(frozen=True, slots=True)
class Replay:
    """One entry to replay and the record that replays it."""

    entry: DlqEntry
    record: OutRecord


@dataclass(frozen=True, slots=True)
class Refusal:
    entry: DlqEntry
    why: str


@dataclass
class ReplayPlan:
    """What a replay would do; ``unmatched`` lists selectors that matched no entry.

    ``skipped`` holds entries whose source topic is not one a replay may write to.
    """

    replays: list[Replay] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    skipped: list[Refusal] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return len(self.replays) + len(self.refused) + len(self.skipped)


def replay_topics(dlq_topic: str) -> frozenset[str]:
    """The topics entries of ``dlq_topic`` may go back to: ``REPLAY_TOPICS``, same prefix.

    The prefix is read off the DLQ topic's own name (``<prefix>orders-dlq``, as
    ``Settings.topic`` builds both); a DLQ topic not named so allows none.
    """
    if not dlq_topic.endswith(DLQ):
        return frozenset()
    prefix = dlq_topic[: -len(DLQ)]
    return frozenset(prefix + name for name in REPLAY_TOPICS)


def replay_record(entry: DlqEntry) -> OutRecord:
    """The record that puts ``entry`` back on its source topic (count + 1, error headers off)."""
    if entry.source_topic is None or entry.replay_count is None:
        raise ValueError(f"{entry.where()} cannot be replayed: source or replay count unknown")
    kept = [(k, v) for k, v in entry.headers if k not in (REPLAY_COUNT_HEADER, REPLAY_FROM_HEADER)]
    headers = [
        *kept,
        (REPLAY_COUNT_HEADER, str(entry.replay_count + 1).encode()),
        (REPLAY_FROM_HEADER, entry.where().encode()),
    ]
    return OutRecord(entry.source_topic, entry.key, entry.value, headers)


def _matches_offset(entry: DlqEntry, sel: DlqOffset) -> bool:
    return entry.offset == sel.offset and sel.partition in (None, entry.partition)


Position = tuple[str, int, int]


def _pos(entry: DlqEntry) -> Position:
    return (entry.dlq_topic, entry.partition, entry.offset)


def plan_replay(
    entries: Iterable[DlqEntry],
    *,
    reasons: Collection[str] = (),
    offsets: Collection[DlqOffset] = (),
    max_replays: int,
    allowed_topics: Collection[str] | None = None,
) -> ReplayPlan:
    """Select entries (see the module docstring), refuse what must not go, build the rest.

    ``entries`` should be the whole DLQ: superseded entries and duplicates are found
    through the other entries, selected or not. Replays come in DLQ (partition, offset)
    order, which keeps the original order of each key. ``allowed_topics`` are the topics
    a replay may write to; by default ``replay_topics`` of each entry's DLQ topic.
    """
    if not reasons and not offsets:
        raise ValueError("select entries by reason and/or DLQ offset")
    if max_replays < 0:
        raise ValueError(f"max_replays must be >= 0, got {max_replays}")
    everything = sorted(entries, key=_pos)
    superseded: dict[str, DlqEntry] = {}
    first_of_source: dict[tuple[str, int, int], DlqEntry] = {}
    for entry in everything:
        if entry.replayed_from is not None:
            superseded.setdefault(entry.replayed_from, entry)
        source = entry.source_id()
        if source is not None:
            first_of_source.setdefault(source, entry)

    plan = ReplayPlan()
    for r in reasons:
        if not any(matches_reason(e, [r]) for e in everything):
            plan.unmatched.append(f"--reason {r}")
    selected = [e for e in everything if not reasons or matches_reason(e, reasons)]
    # offset selectors apply to what the reasons selected (both must match)
    ambiguous: dict[Position, str] = {}
    if offsets:
        chosen: set[Position] = set()
        exact: set[Position] = set()
        for sel in offsets:
            found = [e for e in selected if _matches_offset(e, sel)]
            if not found:
                plan.unmatched.append(f"--offset {sel}")
            chosen.update(_pos(e) for e in found)
            if sel.partition is not None:
                exact.update(_pos(e) for e in found)
            elif len(found) > 1:
                parts = ", ".join(str(e.partition) for e in found)
                unclear = f"--offset {sel} is ambiguous (DLQ partitions {parts}); give P:O"
                for e in found:
                    ambiguous.setdefault(_pos(e), unclear)
        selected = [e for e in selected if _pos(e) in chosen]
        for pos in exact:
            ambiguous.pop(pos, None)  # also named exactly: not ambiguous

    for entry in selected:
        allowed = replay_topics(entry.dlq_topic) if allowed_topics is None else allowed_topics
        if entry.source_topic is not None and entry.source_topic not in allowed:
            shown = ", ".join(sorted(allowed)) or "none"
            plan.skipped.append(
                Refusal(
                    entry,
                    f"source topic {entry.source_topic!r} is not one OrderMesh consumes"
                    f" ({shown}); not replayed",
                )
            )
            continue
        why = ambiguous.get(_pos(entry)) or _refusal(
            entry, superseded, first_of_source, max_replays
        )
        if why is not None:
            plan.refused.append(Refusal(entry, why))
        else:
            plan.replays.append(Replay(entry, replay_record(entry)))
    return plan


def _refusal(
    entry: DlqEntry,
    superseded: dict[str, DlqEntry],
    first_of_source: dict[tuple[str, int, int], DlqEntry],
    max_replays: int,
) -> str | None:
    """Why ``entry`` must not be replayed, or None."""
    later = superseded.get(entry.where())
    if later is not None:
        return f"superseded by {later.where()} (its replay failed again)"
    source = entry.source_id()
    first = None if source is None else first_of_source.get(source)
    if first is not None and first is not entry:
        return f"duplicate of {first.where()} (same source record {entry.source()})"
    if entry.source_topic is None:
        return "no source topic header: nowhere to replay to"
    if TRUNCATED_HEADER.removeprefix(ERROR_HEADER_PREFIX) in entry.error_headers:
        # the original did not fit the DLQ: its bytes here are cut, replaying them would
        # put a different (broken) record on the topic
        return "truncated copy: the original bytes are not all in the DLQ"
    if entry.replay_count is None:
        return f"unreadable {REPLAY_COUNT_HEADER} header"
    if entry.replay_count >= max_replays:
        return f"replay count {entry.replay_count} reached max replays {max_replays}"
    return None
