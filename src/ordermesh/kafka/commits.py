"""Commit bookkeeping of the runner: which consumed offsets may be committed, and when.

Kept apart from consuming and producing (the runner in ``runner.py`` polls, calls the
handler and produces; this unit only decides what to commit):

- handled batches wait in a queue, in the order they were polled, until every record
  they produced is acknowledged; only a done batch at the head of the queue commits, so
  commits never pass an unacknowledged batch;
- the offsets of consecutive done batches are merged, later batches winning per
  partition, into one commit;
- lost partitions are dropped from every waiting batch (they belong to someone else);
- a blocked partition (a record that can be neither processed nor dead-lettered)
  commits nothing at or past its blocking offset.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from ordermesh.errors import CommitError
from ordermesh.kafka.producer import Delivery
from ordermesh.records import InRecord

Partition = tuple[str, int]


def next_offsets(records: Iterable[InRecord]) -> list[TopicPartition]:
    """The offsets to commit after ``records``: last offset + 1 per partition."""
    highest: dict[Partition, int] = {}
    for rec in records:
        key = (rec.topic, rec.partition)
        if rec.offset >= highest.get(key, -1):
            highest[key] = rec.offset
    return [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]


class InFlightBatch:
    """A handled batch whose outputs are not all acknowledged yet."""

    __slots__ = ("attempts", "delivery", "offsets", "records")

    def __init__(
        self, records: list[InRecord], offsets: list[TopicPartition], delivery: Delivery
    ) -> None:
        self.records = records  # only read to find the input of a refused output
        self.offsets = offsets
        self.delivery = delivery
        self.attempts = 1

    def first_offset(self, topic: str, partition: int) -> int:
        """The lowest offset of the batch's records on ``topic[partition]``."""
        return min(r.offset for r in self.records if (r.topic, r.partition) == (topic, partition))


class CommitQueue:
    """Handled batches in poll order, and the offsets that may be committed.

    ``blocked`` maps (topic, partition) to the offset of the record that blocks it; the
    caller may share the dict (the runner's stats show it).
    """

    def __init__(self, blocked: dict[Partition, int] | None = None) -> None:
        self.batches: deque[InFlightBatch] = deque()
        self.blocked: dict[Partition, int] = {} if blocked is None else blocked

    def __len__(self) -> int:
        return len(self.batches)

    def add(self, records: list[InRecord], delivery: Delivery) -> InFlightBatch:
        """Queue a handled batch; it commits once ``delivery`` has nothing pending."""
        batch = InFlightBatch(records, next_offsets(records), delivery)
        self.batches.append(batch)
        return batch

    def head(self) -> InFlightBatch:
        return self.batches[0]

    def pop_head(self) -> InFlightBatch:
        return self.batches.popleft()

    def clear(self) -> int:
        """Forget every waiting batch (none of them is committed); how many there were."""
        count = len(self.batches)
        self.batches.clear()
        return count

    def drop_partitions(self, gone: Collection[Partition]) -> None:
        """Lost partitions: nothing of them is committed, the other partitions' offsets stay."""
        for batch in self.batches:
            batch.offsets = [tp for tp in batch.offsets if (tp.topic, tp.partition) not in gone]

    def committable(self, done: Sequence[InFlightBatch]) -> list[TopicPartition]:
        """The offsets to commit for ``done`` (consecutive done batches, oldest first)."""
        merged: dict[Partition, int] = {}
        for batch in done:
            for tp in batch.offsets:
                merged[(tp.topic, tp.partition)] = tp.offset
        if self.blocked:
            # nothing at or past a blocking record is committed
            for key, offset in self.blocked.items():
                if key in merged:
                    merged[key] = min(merged[key], offset)
        return [TopicPartition(t, p, o) for (t, p), o in merged.items()]

    def block(self, key: Partition, offset: int) -> bool:
        """Block ``key`` from ``offset`` on; True when it was not blocked before."""
        if key in self.blocked:
            self.blocked[key] = min(self.blocked[key], offset)
            return False
        self.blocked[key] = offset
        return True

    def unblock(self, keys: Collection[Partition]) -> bool:
        """Forget the blocks of ``keys`` (revoked or lost); True when one was blocked."""
        if not (self.blocked and self.blocked.keys() & keys):
            return False
        for key in keys:
            self.blocked.pop(key, None)
        return True


def commit(
    consumer: Any, offsets: list[TopicPartition], *, asynchronous: bool
) -> list[TopicPartition] | None:
    """Commit ``offsets`` for the consumer's group; CommitError when the client refuses.

    Synchronously: the coordinator's answer, partition by partition (a commit refused for
    only some partitions does not raise: their ``error`` says so). Asynchronously: None,
    the answer comes to the consumer's ``on_commit``.
    """
    try:
        if asynchronous:
            consumer.commit(offsets=offsets, asynchronous=True)
            return None
        answer = consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as exc:
        raise CommitError(f"commit of {_fmt(offsets)} failed: {exc}") from exc
    return list(answer) if answer is not None else None


def _fmt(offsets: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in offsets)
