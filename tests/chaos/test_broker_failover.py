"""A 3-node cluster keeps accepting acks=all writes with one broker killed, losing none."""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from ordermesh.broker.local import LocalCluster
from ordermesh.config import Settings
from ordermesh.kafka.admin import ensure_topics
from ordermesh.kafka.client import make_admin, make_consumer, make_producer
from tests.conftest import wait_for

pytestmark = pytest.mark.cluster


def _produce(
    producer: object, topic: str, start: int, count: int, acked: set[bytes], failed: list[str]
) -> None:
    def on_delivery(err: object, msg: object) -> None:
        if err is None:
            acked.add(msg.value())  # type: ignore[attr-defined]
        else:
            failed.append(str(err))

    for i in range(start, start + count):
        value = f"rec-{i:07d}".encode()
        while True:
            try:
                producer.produce(topic, value, key=value, on_delivery=on_delivery)  # type: ignore[attr-defined]
                break
            except BufferError:
                producer.poll(0.05)  # type: ignore[attr-defined]
        if i % 500 == 0:
            producer.poll(0)  # type: ignore[attr-defined]


def _leader(settings: Settings, topic: str, partition: int) -> int | None:
    """The leader of a partition, None while a new topic's metadata is still spreading."""
    parts = make_admin(settings).list_topics(topic, timeout=10).topics[topic].partitions
    meta = parts.get(partition)
    return meta.leader if meta is not None and meta.leader >= 0 else None


def test_rf3_survives_sigkill_of_one_broker(kafka_cluster3: LocalCluster) -> None:
    state = kafka_cluster3.load_state()
    assert state is not None
    settings = Settings(
        bootstrap_servers=state.bootstrap_servers, topic_prefix=f"f{uuid.uuid4().hex[:8]}-"
    )
    reports = ensure_topics(make_admin(settings), settings)
    assert all(r.replication_factor == 3 for r in reports)
    topic = settings.topic("orders")

    producer = make_producer(settings, **{"delivery.timeout.ms": 120_000})
    acked: set[bytes] = set()
    failed: list[str] = []
    _produce(producer, topic, 0, 20_000, acked, failed)

    # kill the leader of partition 0 mid-stream, while records are still in flight
    victim = wait_for(lambda: _leader(settings, topic, 0), 30, f"a leader of {topic}[0]")
    kafka_cluster3.kill_node(victim, signal.SIGKILL)
    _produce(producer, topic, 20_000, 20_000, acked, failed)
    assert producer.flush(120) == 0
    assert failed == []
    assert len(acked) == 40_000

    kafka_cluster3.start_node(victim)
    # wait until the restarted broker is back in the ISR of every partition
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parts = make_admin(settings).list_topics(topic, timeout=10).topics[topic].partitions
        if all(len(p.isrs) == 3 for p in parts.values()):
            break
        time.sleep(0.5)

    consumer = make_consumer(settings, f"readback-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([topic])
    seen: set[bytes] = set()
    deadline = time.monotonic() + 60
    while not acked <= seen and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=5000, timeout=0.5):
            if msg.error() is None:
                seen.add(msg.value())
    consumer.close()
    assert acked - seen == set()
