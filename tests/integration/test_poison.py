"""Poison pills and permanent produce errors on the real broker: none stops a partition.

A record with a header name that is not UTF-8 (which the Python client cannot even
produce: ``tests/raw_produce.py`` writes it through librdkafka), a DLQ copy larger than
the topic allows, an output Kafka refuses for good, a DLQ that refuses even the truncated
copy, and a stop while the cluster does not acknowledge anything.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from ordermesh.apps.inventory import inventory_runner
from ordermesh.config import Settings
from ordermesh.kafka import runner as runner_mod
from ordermesh.kafka.client import common_config, make_admin, make_producer
from ordermesh.kafka.metrics import scrape_text
from ordermesh.kafka.reader import read_topic
from ordermesh.kafka.runner import BatchRunner
from ordermesh.loadgen import run_load
from ordermesh.records import (
    ERROR_HEADER_PREFIX,
    ORIGINAL_SIZE_HEADER,
    TRUNCATED_HEADER,
    TRUNCATED_KEEP_BYTES,
    InRecord,
    OutRecord,
    header,
    undecodable,
)
from ordermesh.stores.factory import open_inventory_store
from ordermesh.topics import DLQ, EVENTS, ORDERS
from ordermesh.verify import verify
from tests.conftest import wait_for
from tests.integration.test_dlq import produce
from tests.integration.test_inventory_pipeline import drained, seed
from tests.raw_produce import produce_raw


def err(rec: InRecord, name: str) -> bytes | None:
    return header(rec.headers, ERROR_HEADER_PREFIX + name)


def committed(settings: Settings, group: str, topic: str, partitions: int) -> dict[int, int]:
    conf = common_config(settings)
    conf.update({"group.id": settings.group(group), "enable.auto.commit": False})
    consumer = Consumer(conf)
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], 10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


def test_header_name_not_utf8_is_dead_lettered_and_the_runner_goes_on(
    settings: Settings, kafka_bootstrap: str
) -> None:
    seed(settings, skus=50, stock=1000)
    orders = settings.topic(ORDERS)
    run_load(settings, count=300, duration=None, rate=None, malformed_ratio=0.0, seed=3, skus=50)
    produce_raw(
        kafka_bootstrap,
        orders,
        key=b"o-poison",
        value=b"not an order either",
        headers=[(b"fine", b"1"), (b"caf\xe9-\xff", b"2")],
        partition=0,
    )
    run_load(settings, count=300, duration=None, rate=None, malformed_ratio=0.0, seed=4, skus=50)

    # the reader does not crash: it yields the record, marked
    marked = [r for r in read_topic(settings, orders) if undecodable(r) is not None]
    assert [(r.partition, r.key, r.value) for r in marked] == [
        (0, b"o-poison", b"not an order either")
    ]
    poison = marked[0]
    assert "UTF-8" in (undecodable(poison) or "")

    store = open_inventory_store(settings)
    try:
        stats = inventory_runner(settings, store).run(idle_exit_s=3.0)
    finally:
        store.close()
    assert stats.undecodable == 1
    assert drained(settings)

    dlq = list(read_topic(settings, settings.topic(DLQ)))
    assert len(dlq) == 1
    (entry,) = dlq
    assert (entry.key, entry.value) == (b"o-poison", b"not an order either")
    assert err(entry, "class") == b"HeaderDecodeError"
    assert err(entry, "stage") == b"decode"
    assert err(entry, "service") == b"inventory"
    assert (err(entry, "topic"), err(entry, "partition"), err(entry, "offset")) == (
        orders.encode(),
        b"0",
        str(poison.offset).encode(),
    )
    assert b"UTF-8" in (err(entry, "message") or b"")
    # only error headers: the undecodable ones are gone, the reader's marker never sent
    assert all(name.startswith(ERROR_HEADER_PREFIX) for name, _ in entry.headers)

    report = verify(settings, check_tracker=False)
    assert report.orders_records == 601
    assert report.invalid_records == 1
    assert sum(report.outcomes.values()) == 600


def test_dlq_copy_over_the_topic_limit_is_sent_truncated(settings: Settings) -> None:
    seed(settings, skus=20, stock=1000)
    orders = settings.topic(ORDERS)
    # accepted on the way in (the record fits the broker's 1048588-byte default), but its
    # DLQ copy, with the error headers, does not
    big = b"\xfe" * 1_048_400
    producer = make_producer(settings, **{"compression.type": "none"})
    producer.produce(orders, big, b"o-big", partition=1)
    assert producer.flush(30) == 0
    run_load(settings, count=200, duration=None, rate=None, malformed_ratio=0.0, seed=5, skus=20)

    store = open_inventory_store(settings)
    try:
        inventory_runner(settings, store).run(idle_exit_s=3.0)
    finally:
        store.close()
    assert drained(settings)

    (entry,) = read_topic(settings, settings.topic(DLQ))
    assert entry.key == b"o-big"
    assert entry.value == big[:TRUNCATED_KEEP_BYTES]
    assert header(entry.headers, TRUNCATED_HEADER) == b"1"
    assert header(entry.headers, ORIGINAL_SIZE_HEADER) == str(len(big)).encode()
    assert err(entry, "stage") == b"decode"
    assert (err(entry, "topic"), err(entry, "partition")) == (orders.encode(), b"1")
    report = verify(settings, check_tracker=False)
    assert report.invalid_records == 1
    assert sum(report.outcomes.values()) == 200
    assert "invalid_not_in_dlq" not in report.violation_counts


class Echo:
    """Copies each input to ``out``; an input whose value starts with b"big" asks for an
    output of 3 MB, which Kafka refuses for good."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.seen: list[InRecord] = []

    def handle(self, batch: list[InRecord]) -> list[OutRecord]:
        self.seen += batch
        return [
            OutRecord(
                self.out,
                rec.key,
                b"B" * 3_000_000 if (rec.value or b"").startswith(b"big") else rec.value,
            )
            for rec in batch
        ]


def _echo_runner(settings: Settings, handler: Echo, **kw: object) -> BatchRunner:
    return BatchRunner(
        settings,
        group="echo",
        topics=[settings.topic(ORDERS)],
        handler=handler,
        name="echo",
        **kw,  # type: ignore[arg-type]
    )


def test_refused_output_dead_letters_its_input(settings: Settings) -> None:
    orders, events = settings.topic(ORDERS), settings.topic(EVENTS)
    good = [(f"k{i}".encode(), f"v{i}".encode(), None) for i in range(100)]
    produce(settings, orders, [*good[:50], (b"k-big", b"big one", None), *good[50:]])

    handler = Echo(events)
    runner = _echo_runner(settings, handler)
    stats = runner.run(idle_exit_s=3.0)

    assert stats.produce_dead_lettered == 1
    out = sorted((r.key, r.value) for r in read_topic(settings, events))
    assert out == sorted((k, v) for k, v, _ in good)
    (entry,) = read_topic(settings, settings.topic(DLQ))
    (source,) = [r for r in handler.seen if r.key == b"k-big"]
    assert (entry.key, entry.value) == (b"k-big", b"big one")
    assert err(entry, "stage") == b"produce"
    assert err(entry, "class") == b"MSG_SIZE_TOO_LARGE"
    assert err(entry, "service") == b"echo"
    assert err(entry, "offset") == str(source.offset).encode()
    assert events.encode() in (err(entry, "message") or b"")
    lag = committed(settings, "echo", orders, 6)
    assert sum(lag.values()) == 101  # every partition committed to its end


def test_dlq_refusing_even_the_truncated_copy_blocks_only_that_partition(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    orders, events, dlq = settings.topic(ORDERS), settings.topic(EVENTS), settings.topic(DLQ)
    # a DLQ that takes nothing of this size: the broker refuses the copy and its truncation
    admin = make_admin(settings)
    limit = ConfigResource(
        ConfigResource.Type.TOPIC,
        dlq,
        incremental_configs=[
            ConfigEntry("max.message.bytes", "600", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([limit]).values():
        future.result(30)

    before = [(f"a{i}".encode(), f"v{i}".encode(), None) for i in range(20)]
    after = [(f"b{i}".encode(), f"v{i}".encode(), None) for i in range(20)]
    # incompressible: lz4 must not shrink the copies under the limit
    bad = (b"k-big", b"big" + os.urandom(2000), None)
    # partition 0 gets before, the bad record, after; every other partition gets traffic
    producer = make_producer(settings)
    for key, value, _ in [*before, bad, *after]:
        producer.produce(orders, value, key, partition=0)
    for p in range(1, 6):
        for i in range(30):
            producer.produce(orders, b"v", f"p{p}-{i}".encode(), partition=p)
    assert producer.flush(30) == 0

    handler = Echo(events)
    # the producer's own limit comes from the output topic only: the refusal is the broker's
    runner = _echo_runner(settings, handler, outputs=[events])
    caplog.set_level(logging.INFO, logger="ordermesh.kafka.runner")
    blocked_seen: list[str] = []

    def watch() -> None:
        while not runner._stop.is_set():
            if runner.stats.blocked:
                blocked_seen.append(scrape_text(runner.metrics))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        runner.run(idle_exit_s=4.0)
    finally:
        runner._stop.set()
        watcher.join(10)

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert f"{orders}[0]@20 blocked" in errors[0].getMessage()
    assert blocked_seen and 'ordermesh_partitions_blocked{service="echo"} 1.0' in blocked_seen[0]
    offsets = committed(settings, "echo", orders, 6)
    assert offsets[0] == 20  # nothing at or past the blocked record
    assert all(offsets[p] == 30 for p in range(1, 6))  # the others kept flowing
    # the revoke on close forgot the block: the next owner tries again
    assert runner.stats.blocked == {}
    assert 'ordermesh_partitions_blocked{service="echo"} 0.0' in scrape_text(runner.metrics)

    # with the DLQ limit back to normal, the next owner dead-letters it and moves on
    limit = ConfigResource(
        ConfigResource.Type.TOPIC,
        dlq,
        incremental_configs=[
            ConfigEntry("max.message.bytes", "", incremental_operation=AlterConfigOpType.DELETE)
        ],
    )
    for future in admin.incremental_alter_configs([limit]).values():
        future.result(30)
    _echo_runner(settings, Echo(events), outputs=[events]).run(idle_exit_s=3.0)
    assert committed(settings, "echo", orders, 6)[0] == 41
    (entry,) = read_topic(settings, dlq)
    assert (entry.key, err(entry, "offset"), err(entry, "class")) == (
        b"k-big",
        b"20",
        b"MSG_SIZE_TOO_LARGE",
    )


def test_unacknowledged_outputs_are_retried_and_a_stop_is_bounded(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    orders = settings.topic(ORDERS)
    produce(settings, orders, [(f"k{i}".encode(), b"v", None) for i in range(10)])
    monkeypatch.setattr(runner_mod, "STOP_DEADLINE_S", 3.0)
    monkeypatch.setattr(runner_mod, "RETRY_BACKOFF_S", (0.05, 0.2))
    # a cluster that never answers: every delivery times out, which a retry may cure
    down = make_producer(
        settings, **{"bootstrap.servers": "127.0.0.1:9", "message.timeout.ms": 300}
    )
    runner = _echo_runner(settings, Echo(settings.topic(EVENTS)), producer=down)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    try:
        # more rounds than the old give-up-after-3 allowed, and still running
        wait_for(lambda: runner.stats.produce_retries >= 6 * 10, 60, "retry rounds")
        assert thread.is_alive()
    finally:
        t0 = time.monotonic()
        runner.request_stop()
        thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 3.0 + 5.0
    assert result and result[0] is runner.stats
    assert runner.stats.commits == 0
    assert all(o < 0 for o in committed(settings, "echo", orders, 6).values())
