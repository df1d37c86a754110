"""Read whole topics from the beginning to their current end (verify, DLQ tools)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError
from ordermesh.kafka.client import common_config
from ordermesh.kafka.runner import read_record
from ordermesh.records import UNDECODABLE_HEADER, InRecord

log = logging.getLogger(__name__)

_SETTLING = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
}


def _reader(settings: Settings) -> Consumer:
    conf = common_config(settings)
    conf.update(
        {
            # a throwaway group that never commits: reading must not move anyone's offsets
            "group.id": f"ordermesh-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )
    return Consumer(conf)


def end_offsets(settings: Settings, topic: str) -> dict[int, tuple[int, int]]:
    """partition -> (low, high) watermarks."""
    consumer = _reader(settings)
    try:
        return _watermarks(consumer, topic)
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, topic: str) -> dict[int, tuple[int, int]]:
    md = consumer.list_topics(topic, timeout=10)
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None:
        raise OrderMeshError(f"topic {topic} not found")
    return {p: watermarks(consumer, topic, p) for p in meta.partitions}


def watermarks(
    consumer: Consumer, topic: str, partition: int, deadline_s: float = 30.0
) -> tuple[int, int]:
    """(low, high) of one partition, retrying the transient errors of a fresh topic."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            return int(low), int(high)
        except KafkaException as exc:
            # leadership of a just-created or just-moved partition is still settling
            if time.monotonic() > end or (
                not exc.args[0].retriable() and exc.args[0].code() not in _SETTLING
            ):
                raise
            time.sleep(0.2)


def read_topic(
    settings: Settings,
    topic: str,
    *,
    partitions: dict[int, int] | None = None,
    deadline_s: float = 300.0,
) -> Iterator[InRecord]:
    """Every record of ``topic`` up to the end offsets seen at the start.

    ``partitions`` optionally maps partition -> first offset to read. A record whose
    headers cannot be decoded is yielded too, with its key and value and, instead of its
    headers, one ``records.UNDECODABLE_HEADER`` (``records.undecodable`` tells why): a
    check counts it rather than never seeing it.
    """
    consumer = _reader(settings)
    try:
        marks = _watermarks(consumer, topic)
        starts = {p: (partitions or {}).get(p, OFFSET_BEGINNING) for p in marks}
        todo = {p: high for p, (low, high) in marks.items() if high > max(low, starts[p], 0)}
        if not todo:
            return
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
        end = time.monotonic() + deadline_s
        undecodable = 0
        while todo:
            if time.monotonic() > end:
                raise OrderMeshError(f"reading {topic} timed out with {todo} left")
            for msg in consumer.consume(num_messages=10_000, timeout=0.5):
                if msg.error() is not None:
                    continue
                p = msg.partition()
                offset = msg.offset()
                if p not in todo or p is None or offset is None:
                    continue
                if offset < todo[p]:
                    rec = read_record(msg)
                    if rec.headers and rec.headers[0][0] == UNDECODABLE_HEADER:
                        undecodable += 1
                        if undecodable == 1:
                            log.warning("%s has undecodable headers", rec.where())
                    yield rec
                if offset >= todo[p] - 1:
                    del todo[p]
        if undecodable:
            log.warning("%s: %d records with undecodable headers", topic, undecodable)
    finally:
        consumer.close()
