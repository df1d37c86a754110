"""Which asked commits the group coordinator has confirmed, and which to ask again.

A commit is asked (sent) and later reported: confirmed, refused, or never (the
coordinator moved or restarted meanwhile). Reports may come late and in any order, a
refusal of an old commit after the confirmation of a newer one or the other way round.
So nothing here is a flag set by one report and cleared by the next: per partition the
last offset asked is compared with the last offset confirmed, and a partition whose two
differ once its ask is ``recommit_after_s`` old is asked again, until they agree.

A confirmation counts as the coordinator's latest word: if an older commit is confirmed
after a newer one, the newer one may have been overwritten, so it is asked again (one
commit more, which costs nothing).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from confluent_kafka import TopicPartition

Partition = tuple[str, int]


class Confirmations:
    """The last asked and the last confirmed offset of every partition committed to."""

    __slots__ = ("_asked", "_asked_at", "_confirmed", "recommit_after_s")

    def __init__(self, recommit_after_s: float) -> None:
        self.recommit_after_s = recommit_after_s
        self._asked: dict[Partition, int] = {}
        self._asked_at: dict[Partition, float] = {}
        self._confirmed: dict[Partition, int] = {}

    def asked(self, offsets: Iterable[TopicPartition], now: float) -> None:
        """``offsets`` were sent to be committed at monotonic time ``now``."""
        for tp in offsets:
            key = (tp.topic, tp.partition)
            self._asked[key] = tp.offset
            self._asked_at[key] = now

    def confirmed(self, offsets: Iterable[TopicPartition]) -> None:
        """A report: the coordinator holds ``offsets`` now (of partitions still asked)."""
        asked = self._asked
        for tp in offsets:
            key = (tp.topic, tp.partition)
            if key in asked:
                self._confirmed[key] = tp.offset

    def forget(self, keys: Iterable[Partition]) -> None:
        """Partitions that are someone else's now: nothing of them is asked again."""
        for key in keys:
            self._asked.pop(key, None)
            self._asked_at.pop(key, None)
            self._confirmed.pop(key, None)

    def stale(
        self, owned: Collection[Partition], now: float, *, min_age: float | None = None
    ) -> list[TopicPartition]:
        """The asked offsets of ``owned`` partitions not confirmed, asked at least
        ``min_age`` (default ``recommit_after_s``) ago: the ones to commit again."""
        age = self.recommit_after_s if min_age is None else min_age
        confirmed = self._confirmed
        asked_at = self._asked_at
        return [
            TopicPartition(key[0], key[1], offset)
            for key, offset in self._asked.items()
            if confirmed.get(key) != offset and key in owned and now - asked_at[key] >= age
        ]

    def unconfirmed(self) -> dict[Partition, int]:
        """Every asked offset the coordinator has not confirmed (for logs and tests)."""
        confirmed = self._confirmed
        return {k: o for k, o in self._asked.items() if confirmed.get(k) != o}
