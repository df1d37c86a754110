"""Runner logic without a broker: error classification, DLQ fallbacks, lost partitions."""

from __future__ import annotations

import os
import signal

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from ordermesh.config import Settings
from ordermesh.errors import ConfigError
from ordermesh.kafka.commits import InFlightBatch
from ordermesh.kafka.producer import Delivery, is_permanent
from ordermesh.kafka.runner import COMMIT_EVERY_S, RECOMMIT_EVERY_S, BatchRunner
from ordermesh.records import (
    ERROR_HEADER_PREFIX,
    ORIGINAL_SIZE_HEADER,
    TRUNCATED_HEADER,
    TRUNCATED_KEEP_BYTES,
    InRecord,
    OutRecord,
    dead_letter,
    header,
    is_truncated,
    truncated_dead_letter,
)

# a port nothing listens on: clients are built but never reach a broker
NOWHERE = "127.0.0.1:9"


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
    ],
)
def test_permanent_produce_errors(code: int) -> None:
    assert is_permanent(KafkaError(code))


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._PURGE_QUEUE,
    ],
)
def test_retriable_produce_errors(code: int) -> None:
    assert not is_permanent(KafkaError(code))


def _record(offset: int = 7, headers: list[tuple[str, bytes]] | None = None) -> InRecord:
    return InRecord("orders", 2, offset, b"o-1", b"x" * 5000, headers or [("h", b"v")], 123)


def test_truncated_dead_letter_keeps_error_headers_only() -> None:
    full = dead_letter(
        _record(),
        dlq_topic="dlq",
        service="inventory",
        stage="decode",
        error_class="DecodeError.json",
        message="bad",
    )
    assert full.source == _record() and not is_truncated(full)
    small = truncated_dead_letter(full)
    assert small.topic == "dlq" and small.key == b"o-1" and small.source == full.source
    assert small.value is not None and len(small.value) == TRUNCATED_KEEP_BYTES
    assert header(small.headers, "h") is None  # original headers dropped
    assert header(small.headers, ERROR_HEADER_PREFIX + "offset") == b"7"
    assert header(small.headers, ERROR_HEADER_PREFIX + "class") == b"DecodeError.json"
    assert header(small.headers, TRUNCATED_HEADER) == b"1"
    assert header(small.headers, ORIGINAL_SIZE_HEADER) == b"5000"
    assert is_truncated(small)


def _runner(monkeypatch: pytest.MonkeyPatch, **env: str) -> BatchRunner:
    for name in ("ORDERMESH_FAULT", "ORDERMESH_FAULT_AFTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(bootstrap_servers=NOWHERE, topic_prefix="unit-")
    consumer = Consumer({"bootstrap.servers": NOWHERE, "group.id": "unit"})
    producer = Producer({"bootstrap.servers": NOWHERE})
    return BatchRunner(
        settings,
        group="unit",
        topics=["a", "b"],
        handler=None,  # type: ignore[arg-type]
        name="unit",
        consumer=consumer,
        producer=producer,
    )


def test_lost_partitions_drop_only_their_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner(monkeypatch)
    runner.stats.assigned = {("a", 0), ("a", 1), ("b", 0)}
    first = [TopicPartition("a", 0, 10), TopicPartition("a", 1, 20), TopicPartition("b", 0, 5)]
    second = [TopicPartition("a", 1, 25)]
    runner.commits.batches.append(InFlightBatch([], first, Delivery()))
    runner.commits.batches.append(InFlightBatch([], second, Delivery()))

    runner._on_lost(runner.consumer, [TopicPartition("a", 1)])

    assert len(runner.commits) == 2
    kept = [
        [(tp.topic, tp.partition, tp.offset) for tp in b.offsets] for b in runner.commits.batches
    ]
    assert kept == [[("a", 0, 10), ("b", 0, 5)], []]
    assert runner.stats.assigned == {("a", 0), ("b", 0)}


def test_lost_partition_forgets_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner(monkeypatch)
    runner.stats.assigned = {("a", 0), ("a", 1)}
    runner.stats.blocked[("a", 1)] = 42
    runner.metrics.partitions_blocked.labels("unit").set(1)
    runner._on_lost(runner.consumer, [TopicPartition("a", 1)])
    assert runner.stats.blocked == {}
    assert runner.metrics.partitions_blocked.labels("unit")._value.get() == 0


def test_fault_hook_is_read_once_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _runner(monkeypatch)._fault is None
    runner = _runner(monkeypatch, ORDERMESH_FAULT="after-produce", ORDERMESH_FAULT_AFTER="3")
    assert (runner._fault, runner._fault_after) == ("after-produce", 3)
    with pytest.raises(ConfigError):
        _runner(monkeypatch, ORDERMESH_FAULT="after-lunch")


def test_fault_hook_kills_at_its_point_after_n_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner(monkeypatch, ORDERMESH_FAULT="after-handle", ORDERMESH_FAULT_AFTER="2")
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append((pid, sig)))
    runner._fault_point("after-produce")
    runner._fault_point("after-handle")
    assert kills == []
    runner._fault_point("after-handle")
    assert len(kills) == 1 and kills[0][1] == signal.SIGKILL


def test_output_without_source_is_matched_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner(monkeypatch)
    rec = _record()
    other = InRecord("orders", 1, 3, b"o-2", b"{}", [], 1)
    batch = InFlightBatch([rec, other], [], Delivery())
    event = OutRecord("events", b"o-1", b"y" * 10)
    replacement = runner._after_permanent(batch, event, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    assert replacement is not None and replacement.topic == runner._dlq_topic
    assert replacement.source == rec
    assert header(replacement.headers, ERROR_HEADER_PREFIX + "stage") == b"produce"
    assert header(replacement.headers, ERROR_HEADER_PREFIX + "class") == b"MSG_SIZE_TOO_LARGE"


class _RecordingConsumer:
    """Stands in for the client's commit only: fails the first ``fail`` commits."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.commits: list[list[tuple[str, int, int]]] = []

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise KafkaException(KafkaError(KafkaError._WAIT_COORD))
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])


def test_a_failed_commit_is_committed_again_for_partitions_still_owned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("ordermesh.kafka.runner.time.monotonic", lambda: clock[0])
    runner = _runner(monkeypatch)
    fake = _RecordingConsumer(fail=1)
    runner.consumer = fake  # type: ignore[assignment]
    runner.stats.assigned = {("a", 0), ("a", 1)}
    runner._commit([TopicPartition("a", 0, 10), TopicPartition("a", 1, 7)], asynchronous=True)
    assert fake.commits == []
    assert runner.confirmations.unconfirmed() == {("a", 0): 10, ("a", 1): 7}

    runner._on_revoke(runner.consumer, [TopicPartition("a", 1)])  # no longer ours
    clock[0] += RECOMMIT_EVERY_S
    runner._recommit(clock[0], asynchronous=True)
    assert fake.commits == [[("a", 0, 10)]]


def test_losing_every_partition_arms_the_rejoin_and_an_assignment_disarms_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = _runner(monkeypatch)
    runner.stats.assigned = {("a", 0), ("a", 1)}
    runner._on_lost(runner.consumer, [TopicPartition("a", 0)])
    assert runner._lost_all_at is None  # one partition still ours
    runner._on_lost(runner.consumer, [TopicPartition("a", 1)])
    assert runner._lost_all_at is not None
    runner._on_assign(runner.consumer, [TopicPartition("a", 0)])
    assert runner._lost_all_at is None


def test_done_batches_commit_together_at_most_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("ordermesh.kafka.runner.time.monotonic", lambda: clock[0])
    runner = _runner(monkeypatch)
    fake = _RecordingConsumer(fail=0)
    runner.consumer = fake  # type: ignore[assignment]
    runner.stats.assigned = {("a", 0), ("a", 1), ("b", 0)}

    def done(*offsets: tuple[str, int, int]) -> None:
        tps = [TopicPartition(t, p, o) for t, p, o in offsets]
        runner.commits.batches.append(InFlightBatch([], tps, Delivery()))
        runner._settle()

    done(("a", 0, 10))  # the first commit goes at once
    done(("a", 0, 11), ("a", 1, 5))
    clock[0] += COMMIT_EVERY_S / 2
    done(("a", 1, 6), ("b", 0, 3))
    assert fake.commits == [[("a", 0, 10)]]  # the others wait for the interval

    clock[0] += COMMIT_EVERY_S / 2 + 0.001
    runner._settle()  # an idle tick after the interval: one commit, latest offsets
    assert fake.commits[1:] == [[("a", 0, 11), ("a", 1, 6), ("b", 0, 3)]]

    done(("a", 0, 12), ("a", 1, 7))
    runner._on_lost(runner.consumer, [TopicPartition("a", 1)])  # someone else's now
    runner._on_revoke(runner.consumer, [TopicPartition("b", 0)])  # commits before it goes
    assert fake.commits[2:] == [[("a", 0, 12)]]
    assert runner._due == {}
