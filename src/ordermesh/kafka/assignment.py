"""How a runner's consumer gets its partitions: as a group member, or every partition.

``group``: the consumer subscribes and the group coordinator assigns partitions (the
consumer services; instances share the partitions).

``every-partition``: ``EveryPartition`` assigns *every* partition of the topics itself
(manual assignment, no group membership), starting where the caller's ``positions`` say
or from the beginning. For an aggregate view (analytics): every instance sees the whole
picture, a restarted one starts at once (no session timeout of a dead member to wait
out), and nothing is ever revoked. The group id is still used to commit, so the group's
lag stays visible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final, Literal

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

log = logging.getLogger(__name__)

Assignment = Literal["group", "every-partition"]
ASSIGNMENTS: Final[tuple[Assignment, ...]] = ("group", "every-partition")
PARTITIONS_REFRESH_S: Final = 10.0
# (topic, partition) -> the offset to start reading it at
Positions = Callable[[], dict[tuple[str, int], int]]


class EveryPartition:
    """A consumer that reads *every* partition of its topics, from the beginning.

    Used in place of a group consumer: ``subscribe`` assigns all partitions itself and
    reports them through ``on_assign``; partitions added later are picked up every
    ``PARTITIONS_REFRESH_S``. Everything else goes to the real consumer, whose group id
    is still used to commit.
    """

    def __init__(self, consumer: Consumer, positions: Positions | None = None) -> None:
        self._consumer = consumer
        self._positions: Positions = positions or dict
        self._topics: list[str] = []
        self._on_assign: Callable[[Any, list[TopicPartition]], None] | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._next_refresh = 0.0

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[TopicPartition]], None] | None = None,
        **_callbacks: Any,  # on_revoke / on_lost: nothing is ever taken away
    ) -> None:
        self._topics = list(topics)
        self._on_assign = on_assign
        self._refresh()

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if time.monotonic() >= self._next_refresh:
            self._refresh()
        return list(self._consumer.consume(num_messages=num_messages, timeout=timeout))

    def _refresh(self) -> None:
        self._next_refresh = time.monotonic() + PARTITIONS_REFRESH_S
        positions = self._positions()
        new: list[TopicPartition] = []
        for topic in self._topics:
            try:
                meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
            except KafkaException as exc:
                log.warning("no metadata for %s yet: %s", topic, exc)
                continue
            if meta is None or meta.error is not None:
                continue
            for partition in sorted(meta.partitions):
                if (topic, partition) in self._assigned:
                    continue
                start = positions.get((topic, partition), OFFSET_BEGINNING)
                new.append(TopicPartition(topic, partition, start))
        if not new:
            return
        self._consumer.incremental_assign(new)
        self._assigned |= {(tp.topic, tp.partition) for tp in new}
        if self._on_assign is not None:
            self._on_assign(self, new)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)
