"""Consumer-group lag per partition, read without joining the group."""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import Consumer, TopicPartition

from ordermesh.config import Settings
from ordermesh.kafka.client import common_config
from ordermesh.kafka.reader import watermarks

PartitionLag = dict[tuple[str, int], int]


def group_lag(settings: Settings, group: str, topics: Sequence[str]) -> PartitionLag:
    """(topic, partition) -> high watermark minus committed offset (all of it if none)."""
    conf = common_config(settings)
    # same group id so committed() reads the group's offsets; never subscribes or commits
    conf.update({"group.id": settings.group(group), "enable.auto.commit": False})
    consumer = Consumer(conf)
    try:
        partitions = []
        for topic in topics:
            md = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if md is None or md.error is not None:
                continue
            partitions += [TopicPartition(topic, p) for p in md.partitions]
        committed = consumer.committed(partitions, timeout=10)
        lag: PartitionLag = {}
        for tp in committed:
            low, high = watermarks(consumer, tp.topic, tp.partition)
            start = tp.offset if tp.offset >= 0 else low
            lag[(tp.topic, tp.partition)] = max(0, high - start)
        return lag
    finally:
        consumer.close()
