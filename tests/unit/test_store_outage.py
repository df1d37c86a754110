"""A store outage without a broker or a database: the back-off, the held batch, and the
runner pausing, retrying and resuming around it."""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from ordermesh.config import Settings
from ordermesh.errors import StoreError
from ordermesh.kafka.outage import BACKOFF_S, StoreOutage
from ordermesh.kafka.runner import BatchRunner
from ordermesh.records import InRecord, OutRecord

# a port nothing listens on: clients are built but never reach a broker
NOWHERE = "127.0.0.1:9"
DOWN = StoreError("inventory db (postgresql 127.0.0.1:5432/x): transaction failed: gone\n\tIs it?")

Partition = tuple[str, int]


def rec(topic: str, partition: int, offset: int) -> InRecord:
    return InRecord(topic, partition, offset, b"k", b"{}", [], 1)


# --- StoreOutage -------------------------------------------------------------------------


def test_back_off_doubles_from_half_a_second_to_ten() -> None:
    assert BACKOFF_S == (0.5, 10.0)
    outage = StoreOutage([rec("a", 0, 5)], [], DOWN, now=100.0)
    assert outage.delay == 0.5 and not outage.due(100.4) and outage.due(100.5)
    assert outage.wait_s(100.1) == pytest.approx(0.4)
    delays = []
    for n in range(7):
        outage.retrying()
        outage.failed(DOWN, now=200.0 + n)
        delays.append(outage.delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert outage.next_at == 206.0 + 10.0 and outage.retries == 7
    assert outage.lasted(130.0) == 30.0


def test_the_error_is_kept_on_one_line() -> None:
    outage = StoreOutage([rec("a", 0, 5)], [], DOWN, now=0.0)
    assert "\n" not in outage.error and outage.error.endswith("gone Is it?")


def test_held_records_leave_with_their_partition() -> None:
    outage = StoreOutage(
        [rec("a", 0, 5), rec("a", 1, 9), rec("a", 0, 6)], [rec("b", 0, 2)], DOWN, 0
    )
    assert outage.hold([rec("a", 0, 7)], []) == {("a", 0)}
    assert outage.first_offsets() == {("a", 0): 5, ("a", 1): 9, ("b", 0): 2}
    assert len(outage) == 5 and outage.partitions() == {("a", 0), ("a", 1), ("b", 0)}
    assert outage.drop({("a", 0), ("c", 3)}) == 3
    assert [r.where() for r in outage.records] == ["a[1]@9"]
    assert outage.drop({("a", 1), ("b", 0)}) == 2 and outage.empty


# --- the runner --------------------------------------------------------------------------


class Msg:
    """A polled message, as much of it as the runner reads."""

    def __init__(self, record: InRecord) -> None:
        self.record = record

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self.record.topic

    def partition(self) -> int:
        return self.record.partition

    def offset(self) -> int:
        return self.record.offset

    def key(self) -> bytes | None:
        return self.record.key

    def value(self) -> bytes | None:
        return self.record.value

    def headers(self) -> list[tuple[str, bytes]]:
        return list(self.record.headers)

    def timestamp(self) -> tuple[int, int]:
        return (1, self.record.timestamp_ms)


class FakeConsumer:
    """Stands in for the group consumer: hands out ``polls`` in turn (none while one of
    its partitions is paused), ``stray`` records at the first call whatever is paused
    (fetched before the pause); records pauses, resumes and commits."""

    def __init__(self, *polls: list[InRecord], stray: list[InRecord] | None = None) -> None:
        self.polls: deque[list[InRecord]] = deque(polls)
        self.stray = stray or []
        self.consumes = 0
        self.paused: set[Partition] = set()
        self.resumed: list[set[Partition]] = []
        self.commits: list[list[tuple[str, int, int]]] = []
        self.closed = False

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def consume(self, num_messages: int, timeout: float) -> list[Msg]:
        self.consumes += 1
        if self.stray:
            stray, self.stray = self.stray, []
            return [Msg(r) for r in stray]
        if not self.polls or any((r.topic, r.partition) in self.paused for r in self.polls[0]):
            return []
        return [Msg(r) for r in self.polls.popleft()]

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, tps: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in tps}
        self.paused -= keys
        self.resumed.append(keys)

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return []

    def close(self) -> None:
        self.closed = True


class FlakyHandler:
    """Raises ``DOWN`` ``failures`` times, then handles; remembers every batch it got."""

    def __init__(self, failures: int, on_call: Any = None) -> None:
        self.failures = failures
        self.batches: list[list[str]] = []
        self.on_call = on_call

    def handle(self, batch: list[InRecord]) -> list[OutRecord]:
        self.batches.append([r.where() for r in batch])
        if self.on_call is not None:
            self.on_call(len(self.batches))
        if self.failures > 0:
            self.failures -= 1
            raise DOWN
        return []


def _runner(
    monkeypatch: pytest.MonkeyPatch, handler: FlakyHandler, consumer: FakeConsumer
) -> BatchRunner:
    for name in ("ORDERMESH_FAULT", "ORDERMESH_FAULT_AFTER"):
        monkeypatch.delenv(name, raising=False)
    # the same doubling, ten times faster
    fast = functools.partial(StoreOutage, backoff=(0.05, 0.2))
    monkeypatch.setattr("ordermesh.kafka.runner.StoreOutage", fast)
    runner = BatchRunner(
        Settings(bootstrap_servers=NOWHERE, topic_prefix="unit-"),
        group="unit",
        topics=["a", "b"],
        handler=handler,
        name="unit",
        consumer=Consumer({"bootstrap.servers": NOWHERE, "group.id": "unit"}),
        producer=Producer({"bootstrap.servers": NOWHERE}),
    )
    runner.consumer = consumer  # type: ignore[assignment]
    runner.stats.assigned = {("a", 0), ("a", 1), ("b", 0)}
    return runner


def _value(runner: BatchRunner, metric: str) -> float:
    sample = getattr(runner.metrics, metric).labels("unit")
    return float(sample._value.get())


def _ride_out_until_done(runner: BatchRunner, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while runner._outage is not None:
        assert time.monotonic() < end, "the outage did not end"
        runner._ride_out()


def test_a_failed_batch_is_held_paused_retried_and_resumed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    batch = [rec("a", 0, 10), rec("a", 1, 20)]
    # fetched before the pause: one behind the batch, one of a partition it does not hold
    consumer = FakeConsumer(stray=[rec("a", 0, 11), rec("b", 0, 3)])
    handler = FlakyHandler(failures=3)
    runner = _runner(monkeypatch, handler, consumer)
    caplog.set_level(logging.INFO, logger="ordermesh.kafka.runner")

    runner._process_or_hold(batch, [])
    assert runner._outage is not None
    assert consumer.paused == {("a", 0), ("a", 1), ("b", 0)}
    assert _value(runner, "store_unavailable") == 1
    assert consumer.commits == [] and len(runner.commits) == 0

    _ride_out_until_done(runner)

    # the same batch each time, with what came in meanwhile; handled once it went through
    assert handler.batches[0] == ["a[0]@10", "a[1]@20"]
    assert handler.batches[1:] == [["a[0]@10", "a[1]@20", "a[0]@11", "b[0]@3"]] * 3
    assert consumer.consumes >= 1  # polled meanwhile: the group keeps the member
    assert consumer.paused == set() and consumer.resumed == [{("a", 0), ("a", 1), ("b", 0)}]
    assert _value(runner, "store_unavailable") == 0
    assert _value(runner, "store_retries") == 3
    assert consumer.commits == [[("a", 0, 12), ("a", 1, 21), ("b", 0, 4)]]
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    warnings = [m for level, m in lines if level == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("unit: store unavailable (")
    assert "gone Is it?" in warnings[0] and "from a[0]@10, a[1]@20 on" in warnings[0]
    recovered = [m for level, m in lines if level == logging.INFO and "store" in m]
    assert len(recovered) == 1 and recovered[0].startswith("unit: store available again after")
    assert "and 3 retries" in recovered[0]


def test_only_store_errors_are_held(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def handle(self, batch: list[InRecord]) -> list[OutRecord]:
            raise ValueError("a bug")

    runner = _runner(monkeypatch, FlakyHandler(0), FakeConsumer())
    runner.handler = Broken()
    with pytest.raises(ValueError):
        runner._process_or_hold([rec("a", 0, 1)], [])
    assert runner._outage is None


def test_a_revoke_during_the_outage_lets_its_records_go(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = FakeConsumer()
    handler = FlakyHandler(failures=100)
    runner = _runner(monkeypatch, handler, consumer)
    runner._process_or_hold([rec("a", 0, 10), rec("a", 1, 20)], [])
    runner._on_revoke(consumer, [TopicPartition("a", 0)])
    outage = runner._outage
    assert outage is not None and [r.where() for r in outage.records] == ["a[1]@20"]
    assert consumer.resumed == [{("a", 0)}]  # fetched again should it come back
    assert consumer.commits == []  # nothing of the held batch, revoked or not

    caplog.set_level(logging.INFO, logger="ordermesh.kafka.runner")
    runner._on_lost(consumer, [TopicPartition("a", 1)])
    calls = len(handler.batches)
    runner._ride_out()
    assert runner._outage is None and len(handler.batches) == calls
    assert consumer.paused == set()
    assert _value(runner, "store_unavailable") == 0
    assert consumer.commits == []
    assert any("moved on" in r.getMessage() for r in caplog.records)


def test_a_stop_during_the_outage_ends_the_run_without_committing_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = FakeConsumer([rec("a", 0, 10), rec("a", 0, 11)])
    runner: BatchRunner | None = None

    def stop_on_third(calls: int) -> None:
        if calls == 3 and runner is not None:
            runner.request_stop()

    handler = FlakyHandler(failures=100, on_call=stop_on_third)
    runner = _runner(monkeypatch, handler, consumer)
    stats = runner.run()  # no StoreError escapes
    assert len(handler.batches) == 3
    assert stats.batches == 0 and consumer.commits == []
    assert consumer.closed


def test_a_store_error_no_longer_ends_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch is handled once the store answers, the next one after it, and nothing
    is committed before the store took the first."""
    consumer = FakeConsumer([rec("a", 0, 10)], [rec("a", 0, 11)])
    runner: BatchRunner | None = None
    commits_seen: list[int] = []

    def on_call(calls: int) -> None:
        commits_seen.append(len(consumer.commits))
        if calls == 4 and runner is not None:
            runner.request_stop()

    handler = FlakyHandler(failures=2, on_call=on_call)
    runner = _runner(monkeypatch, handler, consumer)
    stats = runner.run()
    assert handler.batches == [["a[0]@10"]] * 3 + [["a[0]@11"]]
    assert commits_seen[:3] == [0, 0, 0]
    assert stats.batches == 2
    assert consumer.commits[0] == [("a", 0, 11)] and consumer.commits[-1] == [("a", 0, 12)]
