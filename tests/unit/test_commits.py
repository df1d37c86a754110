"""Commit bookkeeping without a broker: order, merging, lost and blocked partitions."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from ordermesh.errors import CommitError, OrderMeshError
from ordermesh.kafka.commits import CommitQueue, commit, next_offsets
from ordermesh.kafka.producer import Delivery
from ordermesh.records import InRecord


def rec(topic: str, partition: int, offset: int) -> InRecord:
    return InRecord(topic, partition, offset, b"k", b"v", [], 0)


def offsets(tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
    return {(tp.topic, tp.partition): tp.offset for tp in tps}


def test_next_offsets_are_the_last_offset_plus_one_per_partition() -> None:
    records = [rec("a", 0, 5), rec("a", 1, 2), rec("a", 0, 7), rec("b", 0, 0), rec("a", 0, 6)]
    assert offsets(next_offsets(records)) == {("a", 0): 8, ("a", 1): 3, ("b", 0): 1}
    assert next_offsets([]) == []


def test_batches_wait_in_poll_order() -> None:
    queue = CommitQueue()
    first = queue.add([rec("a", 0, 0)], Delivery())
    second = queue.add([rec("a", 0, 1)], Delivery())
    assert len(queue) == 2 and queue.head() is first
    assert queue.pop_head() is first and queue.head() is second
    assert queue.clear() == 1 and len(queue) == 0


def test_done_batches_merge_with_the_later_batch_winning() -> None:
    queue = CommitQueue()
    done = [
        queue.add([rec("a", 0, 0), rec("a", 1, 4)], Delivery()),
        queue.add([rec("a", 0, 1), rec("b", 0, 9)], Delivery()),
    ]
    assert offsets(queue.committable(done)) == {("a", 0): 2, ("a", 1): 5, ("b", 0): 10}


def test_lost_partitions_are_dropped_from_every_waiting_batch() -> None:
    queue = CommitQueue()
    queue.add([rec("a", 0, 0), rec("a", 1, 0)], Delivery())
    queue.add([rec("a", 1, 1)], Delivery())
    queue.drop_partitions({("a", 1)})
    assert [offsets(b.offsets) for b in queue.batches] == [{("a", 0): 1}, {}]


def test_nothing_at_or_past_a_blocking_record_is_committed() -> None:
    blocked: dict[tuple[str, int], int] = {}
    queue = CommitQueue(blocked)
    assert queue.block(("a", 0), 5)
    assert not queue.block(("a", 0), 3)  # already blocked: the lower offset wins
    assert blocked == {("a", 0): 3}  # the caller's dict is the queue's
    done = [queue.add([rec("a", 0, 2), rec("a", 0, 9), rec("a", 1, 4)], Delivery())]
    assert offsets(queue.committable(done)) == {("a", 0): 3, ("a", 1): 5}
    assert queue.unblock({("a", 0), ("b", 0)})
    assert not queue.unblock({("a", 0)})
    assert offsets(queue.committable(done)) == {("a", 0): 10, ("a", 1): 5}


def test_first_offset_of_a_partition_in_a_batch() -> None:
    batch = CommitQueue().add([rec("a", 0, 7), rec("a", 0, 4), rec("a", 1, 1)], Delivery())
    assert batch.first_offset("a", 0) == 4


class Refusing:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def commit(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        raise KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS))


@pytest.mark.parametrize("asynchronous", [True, False])
def test_a_refused_commit_is_a_commit_error(asynchronous: bool) -> None:
    consumer = Refusing()
    with pytest.raises(CommitError, match=r"a\[0\]@3") as caught:
        commit(consumer, [TopicPartition("a", 0, 3)], asynchronous=asynchronous)
    assert isinstance(caught.value, OrderMeshError)
    assert consumer.calls[0]["asynchronous"] is asynchronous
