"""Committed offsets and lag of consumer groups, read without joining them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

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


class OffsetsSnapshot(NamedTuple):
    """Every partition's watermarks and several groups' lag, read at once."""

    # topic -> partition -> (low, high)
    watermarks: dict[str, dict[int, tuple[int, int]]]
    # group -> its total lag over its topics
    lag: dict[str, int]

    def ends(self, topic: str) -> int:
        """The sum of ``topic``'s high watermarks (0: a topic not read)."""
        return sum(high for _low, high in self.watermarks.get(topic, {}).values())


def offsets_snapshot(
    settings: Settings,
    topics: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    *,
    timeout_s: float = 10.0,
) -> OffsetsSnapshot:
    """The watermarks of ``topics`` and the lag of each of ``groups`` (group -> its
    topics, which must be among ``topics``): one metadata request, the watermarks on one
    consumer, and one committed-offsets request per group.

    ``group_lag`` and ``end_offsets`` per group and topic made a consumer and a metadata
    request each: a live view of six groups made dozens of clients a second. (Not the
    admin client's offset calls: ``list_consumer_group_offsets`` crashes the process in
    librdkafka while a group's coordinator is not known yet, as on a fresh broker.)
    Raises ``KafkaException`` when the cluster does not answer (``kafka_errors`` turns it
    into ours), OrderMeshError for a topic that is not there.
    """
    conf = common_config(settings)
    conf.update({"group.id": settings.group("offsets-reader"), "enable.auto.commit": False})
    reader = Consumer(conf)
    try:
        metadata = reader.list_topics(timeout=timeout_s)
        partitions: dict[str, list[int]] = {}
        for topic in topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                raise OrderMeshError(f"topic {topic} not found")
            partitions[topic] = sorted(meta.partitions)
        marks = {
            topic: {p: watermarks(reader, topic, p) for p in numbers}
            for topic, numbers in partitions.items()
        }
    finally:
        reader.close()
    lag: dict[str, int] = {}
    for group, of in groups.items():
        consumer = _group_reader(settings, group)
        try:
            asked = [TopicPartition(t, p) for t in of for p in partitions[t]]
            committed = consumer.committed(asked, timeout=timeout_s)
        finally:
            consumer.close()
        total = 0
        for tp in committed:
            low, high = marks[tp.topic][tp.partition]
            total += max(0, high - (tp.offset if tp.offset >= 0 else low))
        lag[group] = total
    return OffsetsSnapshot(marks, lag)
