"""Committed offsets and lag of a consumer group, read without joining the group."""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import Consumer, TopicPartition

from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError
from ordermesh.kafka.client import common_config
from ordermesh.kafka.reader import watermarks

PartitionLag = dict[tuple[str, int], int]
# (topic, partition) -> the group's committed offset (negative: nothing committed yet)
CommittedOffsets = dict[tuple[str, int], int]


def _group_reader(settings: Settings, group: str) -> Consumer:
    conf = common_config(settings)
    # same group id so committed() reads the group's offsets; never subscribes or commits
    conf.update({"group.id": settings.group(group), "enable.auto.commit": False})
    return Consumer(conf)


def _committed(
    consumer: Consumer, group: str, topics: Sequence[str], *, strict: bool
) -> list[TopicPartition]:
    partitions = []
    for topic in topics:
        md = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None:
            if strict:
                raise OrderMeshError(f"topic {topic} not found")
            continue
        partitions += [TopicPartition(topic, p) for p in md.partitions]
    committed = consumer.committed(partitions, timeout=10)
    if strict:
        for tp in committed:
            if tp.error is not None:
                raise OrderMeshError(f"group {group}: committed offset of {tp}: {tp.error}")
    return list(committed)


def committed_offsets(
    settings: Settings, group: str, topics: Sequence[str], *, strict: bool = False
) -> CommittedOffsets:
    """(topic, partition) -> committed offset of ``group`` on every partition of ``topics``.

    ``strict``: a missing topic or an unreadable offset raises OrderMeshError instead of
    being left out.
    """
    consumer = _group_reader(settings, group)
    try:
        return {
            (tp.topic, tp.partition): tp.offset
            for tp in _committed(consumer, group, topics, strict=strict)
        }
    finally:
        consumer.close()


def group_lag(settings: Settings, group: str, topics: Sequence[str]) -> PartitionLag:
    """(topic, partition) -> high watermark minus committed offset (all of it if none)."""
    consumer = _group_reader(settings, group)
    try:
        lag: PartitionLag = {}
        for tp in _committed(consumer, group, topics, strict=False):
            low, high = watermarks(consumer, tp.topic, tp.partition)
            start = tp.offset if tp.offset >= 0 else low
            lag[(tp.topic, tp.partition)] = max(0, high - start)
        return lag
    finally:
        consumer.close()
