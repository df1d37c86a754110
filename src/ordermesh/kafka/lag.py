"""Committed offsets and lag of consumer groups, read without joining them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka import admin as kafka_admin
from confluent_kafka.admin import AdminClient

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


# the client's stubs do not export OffsetSpec
EARLIEST: Final = kafka_admin.OffsetSpec.earliest()  # type: ignore[attr-defined,no-untyped-call]
LATEST: Final = kafka_admin.OffsetSpec.latest()  # type: ignore[attr-defined,no-untyped-call]


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
    topics, which must be among ``topics``), in three requests of one admin client.

    ``group_lag`` per group makes a consumer and a round trip per partition: a live view
    of six groups made hundreds of requests a second, and a Ctrl-C waited for each one.
    Raises ``KafkaException`` when the cluster does not answer (``kafka_errors`` turns it
    into ours).
    """
    admin = AdminClient(common_config(settings))
    metadata = admin.list_topics(timeout=timeout_s)
    partitions: list[TopicPartition] = []
    for topic in topics:
        meta = metadata.topics.get(topic)
        if meta is None or meta.error is not None:
            raise OrderMeshError(f"topic {topic} not found")
        partitions += [TopicPartition(topic, p) for p in meta.partitions]
    low = _offsets(admin, partitions, EARLIEST, timeout_s)
    high = _offsets(admin, partitions, LATEST, timeout_s)
    watermarks: dict[str, dict[int, tuple[int, int]]] = {t: {} for t in topics}
    for tp in partitions:
        where = (tp.topic, tp.partition)
        watermarks[tp.topic][tp.partition] = (low[where], high[where])
    requests = {
        group: admin.list_consumer_group_offsets(
            [
                ConsumerGroupTopicPartitions(
                    settings.group(group), [tp for tp in partitions if tp.topic in set(of)]
                )
            ],
            request_timeout=timeout_s,
        )[settings.group(group)]
        for group, of in groups.items()
    }
    lag: dict[str, int] = {}
    for group, future in requests.items():
        total = 0
        for tp in future.result(timeout=timeout_s).topic_partitions:
            lo, hi = watermarks[tp.topic][tp.partition]
            total += max(0, hi - (tp.offset if tp.offset >= 0 else lo))
        lag[group] = total
    return OffsetsSnapshot(watermarks, lag)


def _offsets(
    admin: AdminClient, partitions: list[TopicPartition], spec: Any, timeout_s: float
) -> dict[tuple[str, int], int]:
    if not partitions:
        return {}
    futures = admin.list_offsets({tp: spec for tp in partitions}, request_timeout=timeout_s)
    return {
        (tp.topic, tp.partition): int(future.result(timeout=timeout_s).offset)
        for tp, future in futures.items()
    }
