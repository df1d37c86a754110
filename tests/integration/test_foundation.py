"""The foundation against a real broker: round trip, topics, idempotent `up`."""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer

from ordermesh.config import Settings
from ordermesh.kafka.admin import ensure_topics
from ordermesh.kafka.client import make_admin, make_consumer, make_producer, producer_config
from ordermesh.topics import SPECS
from tests.conftest import SettingsFactory


def _consume_all(consumer: Consumer, want: int, deadline_s: float = 30.0) -> list[bytes]:
    import time

    got: list[bytes] = []
    end = time.monotonic() + deadline_s
    while len(got) < want and time.monotonic() < end:
        for msg in consumer.consume(num_messages=1000, timeout=0.5):
            assert msg.error() is None, msg.error()
            got.append(msg.value())
    return got


def test_produce_consume_round_trip_idempotent_acks_all(settings: Settings) -> None:
    conf = producer_config(settings)
    assert conf["enable.idempotence"] is True
    assert conf["acks"] == "all"
    producer = make_producer(settings)
    topic = settings.topic("orders")
    sent = [f"msg-{i}".encode() for i in range(500)]
    errors: list[object] = []
    for i, value in enumerate(sent):
        producer.produce(
            topic,
            value,
            key=str(i).encode(),
            on_delivery=lambda err, _m: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0
    assert errors == []
    consumer = make_consumer(settings, f"rt-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([topic])
    got = _consume_all(consumer, len(sent))
    consumer.close()
    assert sorted(got) == sorted(sent)


def test_topics_ensure_is_idempotent(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()  # ensures once
    admin = make_admin(settings)
    first = ensure_topics(admin, settings)
    second = ensure_topics(admin, settings)
    assert [(r.name, r.partitions, r.replication_factor) for r in first] == [
        (r.name, r.partitions, r.replication_factor) for r in second
    ]
    assert {r.outcome for r in second} == {"exists"}
    assert [r.partitions for r in first] == [s.partitions for s in SPECS]


def test_topics_with_wrong_shape_are_reported(settings_factory: SettingsFactory) -> None:
    import pytest
    from confluent_kafka.admin import NewTopic

    from ordermesh.errors import TopicError

    settings = settings_factory()
    wrong = Settings(**{**settings.model_dump(), "topic_prefix": settings.topic_prefix + "w-"})
    admin = make_admin(wrong)
    admin.create_topics([NewTopic(wrong.topic("orders"), num_partitions=2, replication_factor=1)])[
        wrong.topic("orders")
    ].result()
    with pytest.raises(TopicError, match="2 partitions"):
        ensure_topics(admin, wrong)
