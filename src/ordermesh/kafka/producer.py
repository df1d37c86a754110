"""The one producer wrapper: back-off on a full local queue, delivery tracking, size limit.

Every process that produces goes through ``Producer.produce``: the runner (its outputs
and DLQ copies), the load generator, the orders API and the DLQ replay. Waiting out a full
local queue (``BufferError``) by serving delivery reports is written here once.

Produce errors are split into permanent ones (``PERMANENT_ERRORS``: too large, not
authorized, unknown topic, invalid record), which no retry can cure, and retriable ones.
``message_limit`` reads the size limit of the topics a producer writes to, so the producer
refuses locally what the broker would refuse.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

from ordermesh.config import Settings
from ordermesh.errors import DeliveryError
from ordermesh.kafka.client import make_admin, make_producer
from ordermesh.records import OutRecord

log = logging.getLogger(__name__)

# how long one wait for room in a full local queue serves delivery reports
QUEUE_FULL_POLL_S: Final = 0.05
# the broker's default message.max.bytes, used when no topic limit can be read
DEFAULT_MESSAGE_MAX_BYTES: Final = 1_048_588

# Produce errors no retry can cure: the record is dead-lettered instead. librdkafka
# reports every delivery error with retriable() False (it already retried the retriable
# ones for message.timeout.ms), so the split is this explicit set; anything else is retried.
PERMANENT_ERRORS: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,  # also librdkafka's local size check
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.POLICY_VIOLATION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,  # invalid topic name
        # reported only after librdkafka's own metadata refreshes gave up on the topic
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._INVALID_ARG,
    }
)

DeliveryCallback = Callable[[Any, Any], None]


def is_permanent(err: KafkaError) -> bool:
    """Whether a produce error is one a retry cannot cure."""
    return err.code() in PERMANENT_ERRORS


class ProducerClient(Protocol):
    """The part of ``confluent_kafka.Producer`` OrderMesh uses (tests pass stand-ins)."""

    def produce(self, *args: Any, **kwargs: Any) -> None: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...
    def __len__(self) -> int: ...


class Delivery:
    """Collects the delivery reports of a group of records (one runner batch)."""

    __slots__ = ("failed", "pending")

    def __init__(self) -> None:
        self.pending = 0
        self.failed: list[tuple[OutRecord, KafkaError]] = []

    def callback(self, record: OutRecord) -> DeliveryCallback:
        def on_delivery(err: Any, _msg: Any) -> None:
            self.pending -= 1
            if err is not None:
                self.failed.append((record, err))

        return on_delivery


class Producer:
    """A confluent-kafka producer that waits out a full local queue instead of failing."""

    __slots__ = ("client",)

    def __init__(self, client: ProducerClient) -> None:
        self.client = client

    @classmethod
    def create(cls, settings: Settings, **overrides: Any) -> Producer:
        """An idempotent producer built from ``settings`` (``overrides``: librdkafka keys)."""
        return cls(make_producer(settings, **overrides))

    @classmethod
    def for_topics(cls, settings: Settings, topics: Sequence[str], **overrides: Any) -> Producer:
        """A producer that refuses locally what the smallest size limit of ``topics`` would."""
        limit = message_limit(settings, topics)
        config = {"message.max.bytes": limit, "batch.size": min(limit, 1_000_000)}
        return cls.create(settings, **(config | overrides))

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        on_delivery: DeliveryCallback | None = None,
        *,
        until: float = math.inf,
    ) -> bool:
        """Queue one record; while the local queue is full, serve delivery reports and try
        again until the monotonic time ``until`` (False once it passed, nothing queued).

        A record refused before sending (too large, unknown topic) raises KafkaException.
        """
        client = self.client
        while True:
            try:
                # only the arguments in use: stand-ins implement the shapes they need
                if headers is not None:
                    client.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                elif on_delivery is not None:
                    client.produce(topic, value, key, on_delivery=on_delivery)
                else:
                    client.produce(topic, value, key)
                return True
            except BufferError:
                if time.monotonic() >= until:
                    return False
                client.poll(QUEUE_FULL_POLL_S)

    def produce_now(
        self, topic: str, value: bytes | None, key: bytes | None, on_delivery: DeliveryCallback
    ) -> None:
        """Queue one record without waiting for room; DeliveryError when the local queue
        is full or the record is refused before sending (for callers that must not block,
        like an event loop)."""
        try:
            queued = self.produce(topic, value, key, on_delivery=on_delivery, until=0.0)
        except KafkaException as exc:
            raise DeliveryError(f"produce to {topic} failed: {exc}") from exc
        if not queued:
            raise DeliveryError(f"producer queue full, {topic} not produced")

    def send_all(self, outs: Sequence[OutRecord], delivery: Delivery) -> None:
        """Produce ``outs``, their reports counted in ``delivery``; a record refused before
        sending counts as a failed delivery."""
        produce = self.produce
        for out in outs:
            try:
                produce(out.topic, out.value, out.key, out.headers or None, delivery.callback(out))
            except KafkaException as exc:
                delivery.failed.append((out, exc.args[0]))
                continue
            delivery.pending += 1

    def poll(self, timeout: float = 0.0) -> int:
        return self.client.poll(timeout)

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` for outstanding records; how many are still outstanding."""
        return self.client.flush(timeout)

    def purge(self) -> None:
        """Drop what is queued and in flight (their reports say ``_PURGE_QUEUE``)."""
        purge: Callable[[], None] | None = getattr(self.client, "purge", None)
        if purge is not None:
            purge()

    def __len__(self) -> int:
        return len(self.client)


@dataclass(frozen=True, slots=True)
class Delivered:
    """Where a record of ``deliver`` landed, or why it did not (``error``; partition
    and offset are then -1)."""

    topic: str
    partition: int
    offset: int
    error: str | None = None


def deliver(
    settings: Settings, records: Sequence[OutRecord], **overrides: Any
) -> list[Delivered | None]:
    """Produce ``records`` with a new idempotent producer and wait for every report.

    One result per record, in order; None where no report came (``message.timeout.ms``
    bounds the wait, so that means the client gave up without saying why). A record
    refused before sending raises KafkaException.
    """
    producer = Producer.create(settings, **overrides)
    results: list[Delivered | None] = [None] * len(records)

    def report(index: int) -> DeliveryCallback:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                results[index] = Delivered(records[index].topic, -1, -1, str(err))
            else:
                results[index] = Delivered(msg.topic(), msg.partition(), msg.offset())

        return on_delivery

    for index, out in enumerate(records):
        producer.produce(out.topic, out.value, out.key, out.headers, report(index))
    # -1: no timeout; flush returns once every record is acknowledged or failed
    producer.flush(-1)
    return results


def message_limit(settings: Settings, topics: Sequence[str], timeout_s: float = 5.0) -> int:
    """The smallest ``max.message.bytes`` of ``topics``; else the broker's
    ``message.max.bytes``; else the broker default."""
    admin = make_admin(settings)
    limits: list[int] = []
    try:
        futures = admin.describe_configs(
            [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics],
            request_timeout=timeout_s,
        )
        for resource, future in futures.items():
            try:
                entry = future.result(timeout=timeout_s).get("max.message.bytes")
                if entry is not None and entry.value is not None:
                    limits.append(int(entry.value))
            except (KafkaException, ValueError, TimeoutError) as exc:
                log.warning("max.message.bytes of %s not readable: %s", resource.name, exc)
        if limits:
            return min(limits)
        brokers = admin.list_topics(timeout=timeout_s).brokers
        if brokers:
            resource = ConfigResource(ConfigResource.Type.BROKER, str(min(brokers)))
            configs = admin.describe_configs([resource], request_timeout=timeout_s)
            entry = configs[resource].result(timeout=timeout_s).get("message.max.bytes")
            if entry is not None and entry.value is not None:
                return int(entry.value)
    except (KafkaException, ValueError, TimeoutError) as exc:
        log.warning("message size limits not readable (%s); assuming the default", exc)
    return DEFAULT_MESSAGE_MAX_BYTES
