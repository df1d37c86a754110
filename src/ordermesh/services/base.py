"""The skeleton of a core that owns a store: decode by topic, guard each record, dead-letter.

The inventory and tracker cores are both ``handle(batch) -> records`` over a store
Protocol. What they share lives here:

- the constructor shape: a store, the topics it reads (each with its decoder), the DLQ
  topic, the service name written into dead letters, and a clock;
- ``decode(record)``: the topic's decoder, or a dead letter (stage ``route``, class
  ``UnexpectedTopic``) for a topic the service does not read; a ``DecodeError`` is left
  to the service, since what to do with bad input differs per topic and service;
- ``apply_guarded``: runs one step per record, and a record whose step raises anything
  but ``StoreError`` is dead-lettered (stage ``process``, class = the exception's) rather
  than stopping the consumer. ``StoreError`` propagates: the batch is not committed and
  will be redelivered.

``OrderRowService`` is that skeleton for the cores over ``order-events`` that keep one
row per order (payments, fulfilment): peek at each event's type and skip those it has
no concern with, decode or dead-letter the rest, then load, change and save the rows of
the batch in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import Generic, Protocol, Self, TypeVar

import msgspec

from ordermesh import schema
from ordermesh.errors import DecodeError, StoreError
from ordermesh.records import ERROR_HEADER_PREFIX, InRecord, OutRecord, dead_letter, header
from ordermesh.schema import OrderEvent

logger = logging.getLogger(__name__)

StoreT = TypeVar("StoreT")
TaskT = TypeVar("TaskT")
StepT = TypeVar("StepT")
RowT = TypeVar("RowT")

Decoder = Callable[[bytes | None], TaskT]


def describe_dead_letter(record: InRecord, dlq: OutRecord) -> str:
    """``topic[p]@o: why`` of a dead letter, for the batch's log summary."""
    raw = header(dlq.headers, ERROR_HEADER_PREFIX + "message") or b""
    return f"{record.where()}: {raw.decode('utf-8', 'replace')}"


class StoreService(Generic[StoreT, TaskT]):
    """Base of a pure core over ``StoreT``; its topics decode to ``TaskT``."""

    def __init__(
        self,
        store: StoreT,
        *,
        decoders: Mapping[str, Decoder[TaskT]],
        dlq_topic: str,
        service_name: str,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.dlq_topic = dlq_topic
        self.service_name = service_name
        self._clock = clock
        self._decoders = dict(decoders)

    def decode(self, record: InRecord) -> TaskT | OutRecord:
        """The record's value decoded by its topic's decoder; raises ``DecodeError``.

        A record of a topic the service does not read comes back as its dead letter.
        """
        decoder = self._decoders.get(record.topic)
        if decoder is None:
            message = f"{self.service_name} does not consume {record.topic!r}"
            return self.dead_letter(record, "route", "UnexpectedTopic", message)
        return decoder(record.value)

    def dead_letter(
        self, record: InRecord, stage: str, error_class: str, message: str
    ) -> OutRecord:
        """The DLQ record of ``record``, naming this service and why."""
        return dead_letter(
            record,
            dlq_topic=self.dlq_topic,
            service=self.service_name,
            stage=stage,
            error_class=error_class,
            message=message,
        )

    def decode_dead_letter(self, record: InRecord, exc: DecodeError) -> OutRecord:
        """The DLQ record of an undecodable record (class ``DecodeError.<kind>``)."""
        return self.dead_letter(record, "decode", f"DecodeError.{exc.kind}", str(exc))

    def apply_guarded(
        self,
        work: Iterable[tuple[InRecord, StepT, bytes]],
        step: Callable[[InRecord, StepT, bytes], None],
        dead: Callable[[InRecord, OutRecord], None],
    ) -> None:
        """``step`` each item of ``work``; an item whose step fails goes to ``dead``.

        A bug on one record must not stop the consumer: anything but ``StoreError``
        raised by a step becomes that record's dead letter, handed to ``dead``.
        """
        for record, task, extra in work:
            try:
                step(record, task, extra)
            except StoreError:
                raise
            except Exception as exc:
                logger.exception("%s: unexpected error on %s", self.service_name, record.where())
                dead(
                    record,
                    self.dead_letter(record, "process", type(exc).__name__, f"unexpected: {exc!r}"),
                )


# --- one row per order, over order-events ----------------------------------------------


class _Kind(msgspec.Struct):
    """Only the tag of an event: enough to skip the ones a service ignores."""

    type: str = ""


_peek = msgspec.json.Decoder(_Kind)


def event_kind(raw: bytes | None) -> str | None:
    """The ``type`` of an encoded event; None when it cannot be read (decode it fully
    then, for the dead letter's reason)."""
    if raw is None:
        return None
    try:
        return _peek.decode(raw).type
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class RowStore(Protocol[RowT]):
    """What ``OrderRowService`` needs of its store: rows by order_id, in a transaction."""

    def transaction(self) -> AbstractContextManager[None]: ...

    def load(self, order_ids: Collection[str]) -> dict[str, RowT]: ...

    def save(self, rows: Sequence[RowT]) -> None: ...


@dataclass
class RowStats:
    """Counters of an ``OrderRowService`` since start; services add their own."""

    batches: int = 0
    records: int = 0
    skipped: int = 0
    unchanged: int = 0
    dlq: int = 0

    def add(self, other: Self) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


StatsT = TypeVar("StatsT", bound=RowStats)


class OrderRowService(StoreService[RowStore[RowT], OrderEvent], Generic[RowT, StatsT]):
    """A core over ``order-events`` keeping one ``RowT`` per order; ``handle`` returns
    only dead letters (the work the rows stand for is done later by a worker).

    A subclass says which event types concern it (``concerns``), what an event does to
    a row (``apply``) and what a change counts as (``count``).
    """

    # the batch's summary line goes to the subclass's own logger
    log: logging.Logger = logger

    def __init__(
        self,
        store: RowStore[RowT],
        *,
        events_topic: str,
        dlq_topic: str,
        service_name: str,
        clock: Callable[[], float],
        concerns: frozenset[str],
        stats: StatsT,
    ) -> None:
        super().__init__(
            store,
            decoders={events_topic: schema.decode_event},
            dlq_topic=dlq_topic,
            service_name=service_name,
            clock=clock,
        )
        self.events_topic = events_topic
        self.concerns = concerns
        self.stats = stats

    def apply(self, row: RowT | None, event: OrderEvent, now: float) -> RowT | None:
        """The order's row after ``event`` (the same object when nothing changes)."""
        raise NotImplementedError

    def count(self, stats: StatsT, before: RowT | None, after: RowT) -> None:
        """Count a row that ``apply`` changed from ``before`` to ``after``."""
        raise NotImplementedError

    def handle(self, batch: Sequence[InRecord]) -> list[OutRecord]:
        """Apply the batch's events to their rows in one transaction; the dead letters.

        A ``StoreError`` means nothing was committed: the batch must be redelivered.
        """
        if not batch:
            return []
        stats = type(self.stats)(batches=1, records=len(batch))
        out: list[OutRecord] = []
        first_dlq: str | None = None
        work: list[tuple[InRecord, OrderEvent, bytes]] = []
        # decode outside the transaction: CPU only, keeps the write lock short
        for record in batch:
            if record.topic == self.events_topic:
                kind = event_kind(record.value)
                if kind is not None and kind not in self.concerns:
                    stats.skipped += 1
                    continue
            try:
                task = self.decode(record)
            except DecodeError as exc:
                task = self.decode_dead_letter(record, exc)
            if isinstance(task, OutRecord):
                out.append(task)
                first_dlq = first_dlq or describe_dead_letter(record, task)
                continue
            work.append((record, task, b""))
        if work:
            now = self._clock()
            with self.store.transaction():
                rows = self.store.load({e.order_id for _, e, _ in work})
                changed: dict[str, RowT] = {}

                def step(record: InRecord, event: OrderEvent, _extra: bytes) -> None:
                    before = rows.get(event.order_id)
                    after = self.apply(before, event, now)
                    if after is None or after is before:
                        stats.unchanged += 1
                        return
                    rows[event.order_id] = changed[event.order_id] = after
                    self.count(stats, before, after)

                def dead(record: InRecord, dlq: OutRecord) -> None:
                    nonlocal first_dlq
                    out.append(dlq)
                    first_dlq = first_dlq or describe_dead_letter(record, dlq)

                self.apply_guarded(work, step, dead)
                self.store.save(list(changed.values()))
        stats.dlq = len(out)
        if first_dlq is not None:
            self.log.warning(
                "%s: %d record(s) dead-lettered, first: %s", self.service_name, len(out), first_dlq
            )
        self.stats.add(stats)
        return out
