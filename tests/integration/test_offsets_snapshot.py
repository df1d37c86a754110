"""``offsets_snapshot``: every group's lag and every topic's ends in a few requests, equal
to what ``group_lag`` and ``end_offsets`` read one partition at a time."""

from __future__ import annotations

from confluent_kafka import Producer, TopicPartition

from ordermesh.config import Settings
from ordermesh.kafka.client import common_config, make_consumer
from ordermesh.kafka.lag import group_lag, offsets_snapshot
from ordermesh.kafka.reader import end_offsets
from ordermesh.topics import DLQ, EVENTS, ORDERS


def test_the_snapshot_reads_what_the_per_partition_calls_read(settings: Settings) -> None:
    orders, events, dlq = (settings.topic(t) for t in (ORDERS, EVENTS, DLQ))
    producer = Producer(common_config(settings))
    for i in range(60):
        producer.produce(orders, key=f"o{i}".encode(), value=b"{}", partition=i % 6)
    for i in range(9):
        producer.produce(events, key=f"e{i}".encode(), value=b"{}", partition=i % 3)
    assert producer.flush(30) == 0
    # "tracker" committed part of orders; "inventory" nothing at all
    reader = make_consumer(settings, "tracker")
    try:
        reader.commit(
            offsets=[TopicPartition(orders, p, 4) for p in range(6)]
            + [TopicPartition(events, 0, 3)],
            asynchronous=False,
        )
    finally:
        reader.close()
    groups = {"tracker": [orders, events], "inventory": [orders]}

    snapshot = offsets_snapshot(settings, [orders, events, dlq], groups)

    assert snapshot.lag == {"tracker": 6 * (10 - 4) + 3 + 3, "inventory": 60}
    assert snapshot.lag == {g: sum(group_lag(settings, g, of).values()) for g, of in groups.items()}
    assert (snapshot.ends(orders), snapshot.ends(events), snapshot.ends(dlq)) == (60, 9, 0)
    for topic in (orders, events, dlq):
        assert snapshot.watermarks[topic] == end_offsets(settings, topic)
