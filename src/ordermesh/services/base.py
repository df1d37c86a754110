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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

from ordermesh.errors import DecodeError, StoreError
from ordermesh.records import ERROR_HEADER_PREFIX, InRecord, OutRecord, dead_letter, header

logger = logging.getLogger(__name__)

StoreT = TypeVar("StoreT")
TaskT = TypeVar("TaskT")
StepT = TypeVar("StepT")

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
