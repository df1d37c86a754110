"""The runner's commit windows without a broker: a fatal producer error, commit reports in
any order, commits of partitions that moved on."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from ordermesh.config import Settings
from ordermesh.errors import DeliveryError
from ordermesh.kafka.commits import InFlightBatch
from ordermesh.kafka.confirmations import Confirmations
from ordermesh.kafka.producer import Delivery
from ordermesh.kafka.runner import RECOMMIT_EVERY_S, BatchRunner
from ordermesh.records import OutRecord

# a port nothing listens on: clients are built but never reach a broker
NOWHERE = "127.0.0.1:9"

Offsets = list[tuple[str, int, int]]


class Committing:
    """Stands in for the consumer's commit and close only: records every commit."""

    def __init__(self) -> None:
        self.commits: list[Offsets] = []
        self.closed = False

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def close(self) -> None:
        self.closed = True


def _runner(monkeypatch: pytest.MonkeyPatch) -> tuple[BatchRunner, Committing]:
    for name in ("ORDERMESH_FAULT", "ORDERMESH_FAULT_AFTER"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(bootstrap_servers=NOWHERE, topic_prefix="unit-")
    runner = BatchRunner(
        settings,
        group="unit",
        topics=["a"],
        handler=None,  # type: ignore[arg-type]
        name="unit",
        consumer=Consumer({"bootstrap.servers": NOWHERE, "group.id": "unit"}),
        producer=Producer({"bootstrap.servers": NOWHERE}),
    )
    fake = Committing()
    runner.consumer = fake  # type: ignore[assignment]
    return runner, fake


def _batch(runner: BatchRunner, *offsets: tuple[str, int, int]) -> InFlightBatch:
    batch = InFlightBatch([], [TopicPartition(t, p, o) for t, p, o in offsets], Delivery())
    runner.commits.batches.append(batch)
    return batch


@pytest.mark.parametrize(
    "error",
    [
        KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, "fenced", fatal=True),
        # what produce() raises once the producer has failed fatally
        KafkaError(KafkaError._FATAL, "failed earlier"),
    ],
    ids=["fatal-report", "queued-after-fatal"],
)
def test_a_fatal_producer_error_commits_nothing_of_its_batch_or_later(
    monkeypatch: pytest.MonkeyPatch, error: KafkaError
) -> None:
    runner, fake = _runner(monkeypatch)
    runner.stats.assigned = {("a", 0), ("a", 1)}
    _batch(runner, ("a", 0, 5))  # acknowledged before the fatal error
    hit = _batch(runner, ("a", 0, 9), ("a", 1, 3))
    hit.delivery.failed.append((OutRecord("events", b"k", b"v"), error))
    _batch(runner, ("a", 0, 12), ("a", 1, 4))  # acknowledged, but after the one hit

    with pytest.raises(DeliveryError):
        runner._settle()
    raised: list[DeliveryError] = []
    try:
        runner.close()  # the stop that follows (run's finally)
    except DeliveryError as exc:
        raised.append(exc)

    assert fake.commits == [[("a", 0, 5)]]  # nothing of the batch hit, nor of later ones
    assert fake.closed and len(runner.commits) == 0
    assert raised  # and the stop says why the runner stopped


def test_records_of_a_partition_that_moved_on_are_not_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner, fake = _runner(monkeypatch)
    runner.stats.assigned = {("a", 0)}
    _batch(runner, ("a", 0, 5), ("a", 1, 7))  # a[1] was revoked after its fetch
    runner._settle(drain=True)
    assert fake.commits == [[("a", 0, 5)]]


def test_a_success_reported_for_an_older_commit_after_the_newer_one_asks_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner, fake = _runner(monkeypatch)
    runner.stats.assigned = {("a", 0)}
    runner._commit([TopicPartition("a", 0, 5)], asynchronous=True)
    runner._commit([TopicPartition("a", 0, 10)], asynchronous=True)
    # the coordinator's last word is the older commit: it may have overwritten the newer
    runner._on_commit(None, [TopicPartition("a", 0, 10)])
    runner._on_commit(None, [TopicPartition("a", 0, 5)])
    runner.close()
    assert fake.commits == [[("a", 0, 5)], [("a", 0, 10)], [("a", 0, 10)]]


class Answer(NamedTuple):
    """A partition of the client's answer to a commit (its TopicPartition.error is
    read-only)."""

    topic: str
    partition: int
    offset: int
    error: KafkaError | None


class RefusingSome(Committing):
    """Answers a synchronous commit as the coordinator may: refused for some partitions
    only, without raising."""

    def __init__(self, refused: set[tuple[str, int]]) -> None:
        super().__init__()
        self.refused = refused

    def commit(  # type: ignore[override]
        self, *, offsets: list[TopicPartition], asynchronous: bool
    ) -> list[Answer] | None:
        super().commit(offsets=offsets, asynchronous=asynchronous)
        refusal = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
        answer = [
            Answer(tp.topic, tp.partition, tp.offset, refusal if key in self.refused else None)
            for tp in offsets
            for key in [(tp.topic, tp.partition)]
        ]
        self.refused = set()
        return None if asynchronous else answer


def test_a_synchronous_commit_refused_for_some_partitions_is_committed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner, _ = _runner(monkeypatch)
    fake = RefusingSome({("a", 1)})
    runner.consumer = fake  # type: ignore[assignment]
    runner.stats.assigned = {("a", 0), ("a", 1)}
    _batch(runner, ("a", 0, 10), ("a", 1, 4))
    runner._settle(drain=True)  # synchronous, as before a revoke or the stop
    assert runner.confirmations.unconfirmed() == {("a", 1): 4}
    runner.close()
    assert fake.commits == [[("a", 0, 10), ("a", 1, 4)], [("a", 1, 4)]]


def test_failures_reported_after_a_recommit_was_sent_are_committed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("ordermesh.kafka.runner.time.monotonic", lambda: clock[0])
    runner, fake = _runner(monkeypatch)
    runner.stats.assigned = {("a", 0), ("a", 1)}
    runner._commit([TopicPartition("a", 0, 10), TopicPartition("a", 1, 4)], asynchronous=True)
    refused = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    runner._on_commit(refused, [TopicPartition("a", 0, 10), TopicPartition("a", 1, 4)])
    clock[0] += RECOMMIT_EVERY_S
    runner._recommit(clock[0], asynchronous=True)
    assert fake.commits[-1] == [("a", 0, 10), ("a", 1, 4)]
    # the recommit is refused too, and its report comes after it was sent: asked again
    runner._on_commit(refused, [TopicPartition("a", 0, 10), TopicPartition("a", 1, 4)])
    clock[0] += RECOMMIT_EVERY_S / 2
    runner._recommit(clock[0], asynchronous=True)
    assert len(fake.commits) == 2  # not before its ask is RECOMMIT_EVERY_S old
    clock[0] += RECOMMIT_EVERY_S / 2
    runner._recommit(clock[0], asynchronous=True)
    assert fake.commits[-1] == [("a", 0, 10), ("a", 1, 4)]
    runner._on_commit(None, [TopicPartition("a", 0, 10), TopicPartition("a", 1, 4)])
    clock[0] += RECOMMIT_EVERY_S
    runner._recommit(clock[0], asynchronous=True)
    assert len(fake.commits) == 3  # confirmed: nothing more


def test_a_failed_partition_is_asked_again_while_others_keep_committing() -> None:
    confirmations = Confirmations(recommit_after_s=2.0)
    owned = {("a", 0), ("a", 1)}
    confirmations.asked([TopicPartition("a", 0, 10), TopicPartition("a", 1, 4)], now=0.0)
    confirmations.confirmed([TopicPartition("a", 1, 4)])  # a[0] refused: no confirmation
    for step in range(1, 31):  # a[1] busy: a commit every 0.1 s, each confirmed
        confirmations.asked([TopicPartition("a", 1, 4 + step)], now=step / 10)
        confirmations.confirmed([TopicPartition("a", 1, 4 + step)])
    stale = confirmations.stale(owned, now=3.0)
    assert [(tp.topic, tp.partition, tp.offset) for tp in stale] == [("a", 0, 10)]


Report = tuple[str, int]  # ("ok" | "refused", offset)


@pytest.mark.parametrize(
    "reports",
    [
        list(order)
        for n in range(5)
        for order in itertools.permutations(
            [("ok", 5), ("ok", 10), ("refused", 5), ("refused", 10)], n
        )
    ],
)
def test_asking_again_converges_whatever_the_order_of_reports(reports: list[Report]) -> None:
    confirmations = Confirmations(recommit_after_s=2.0)
    owned = {("a", 0)}
    confirmations.asked([TopicPartition("a", 0, 5)], now=0.0)
    confirmations.asked([TopicPartition("a", 0, 10)], now=0.0)
    for outcome, offset in reports:
        if outcome == "ok":
            confirmations.confirmed([TopicPartition("a", 0, offset)])
    oks = [offset for outcome, offset in reports if outcome == "ok"]
    stale = confirmations.stale(owned, now=2.0)
    # settled only when the coordinator's last word is the newest ask
    assert (stale == []) == (oks[-1:] == [10])
    now = 2.0
    while stale:  # each round asks again; a round's confirmation ends it
        assert [(tp.topic, tp.partition, tp.offset) for tp in stale] == [("a", 0, 10)]
        confirmations.asked(stale, now=now)
        confirmations.confirmed(stale)
        now += 2.0
        stale = confirmations.stale(owned, now=now)
    assert confirmations.unconfirmed() == {}


def test_partitions_that_moved_on_are_not_asked_again() -> None:
    confirmations = Confirmations(recommit_after_s=2.0)
    confirmations.asked([TopicPartition("a", 0, 10), TopicPartition("a", 1, 4)], now=0.0)
    assert confirmations.stale({("a", 0)}, now=5.0)[0].partition == 0
    assert len(confirmations.stale({("a", 0)}, now=5.0)) == 1
    confirmations.forget([("a", 0)])
    confirmations.confirmed([TopicPartition("a", 0, 10)])  # a late report of a forgotten one
    assert confirmations.stale({("a", 0), ("a", 1)}, now=5.0)[0].partition == 1
    assert confirmations.unconfirmed() == {("a", 1): 4}
