"""A store outage as a runner sees it: the batch it holds, when to try it again, how long.

A ``StoreError`` from ``handle(batch)`` means the database did not take the batch (its
transaction rolled back): nothing of it was produced, nothing of it is committed. The
runner does not end on it. It keeps the batch here, pauses its partitions (no new
records, while its polls go on, so the group keeps the member and nothing rebalances)
and hands the same batch to the handler again after a pause that doubles from
``BACKOFF_S[0]`` up to ``BACKOFF_S[1]``, until the handler takes it; then it resumes.

The batch is kept rather than fetched again (a seek back to its first offsets): the
records are in hand, and a seek on a paused partition would have to be ordered against
the pause and against the records already fetched behind it. A record that still comes
in while the outage lasts (fetched before the pause, or of a partition assigned
meanwhile) joins the held batch, and its partition is paused too: this consumer does
not fetch a record again once a poll returned it, so dropping it would skip it. The held batch never
enters the commit queue, so nothing at or past its first offsets is committed before
the database has taken it. Records of partitions revoked or lost meanwhile leave the
batch: their next owner starts at the last committed offset and gets them again.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Final

from ordermesh.kafka.commits import Partition
from ordermesh.records import InRecord

# first and longest pause before the held batch is handed to the handler again
BACKOFF_S: Final = (0.5, 10.0)


class StoreOutage:
    """The batch a ``StoreError`` stopped, and when to hand it to the handler again.

    Times are monotonic seconds, passed in by the caller (tests pass their own).
    """

    def __init__(
        self,
        records: Sequence[InRecord],
        poison: Sequence[InRecord],
        error: BaseException,
        now: float,
        *,
        backoff: tuple[float, float] = BACKOFF_S,
    ) -> None:
        self.records = list(records)
        self.poison = list(poison)
        self.error = _one_line(error)
        self.started_at = now
        self.retries = 0
        self.first, self.cap = backoff
        self.delay = self.first
        self.next_at = now + self.delay

    @property
    def empty(self) -> bool:
        return not (self.records or self.poison)

    def __len__(self) -> int:
        return len(self.records) + len(self.poison)

    def partitions(self) -> set[Partition]:
        return {(r.topic, r.partition) for r in (*self.records, *self.poison)}

    def first_offsets(self) -> dict[Partition, int]:
        """The lowest held offset per partition: where its next owner or a restart
        begins again (nothing from there on is committed)."""
        first: dict[Partition, int] = {}
        for rec in (*self.records, *self.poison):
            key = (rec.topic, rec.partition)
            if rec.offset < first.get(key, rec.offset + 1):
                first[key] = rec.offset
        return first

    def hold(self, records: Sequence[InRecord], poison: Sequence[InRecord]) -> set[Partition]:
        """Add records that came in meanwhile (after the held ones of their partition);
        their partitions."""
        self.records.extend(records)
        self.poison.extend(poison)
        return {(r.topic, r.partition) for r in (*records, *poison)}

    def drop(self, gone: Collection[Partition]) -> int:
        """Forget the records of partitions that moved on; how many there were."""
        before = len(self)
        self.records = [r for r in self.records if (r.topic, r.partition) not in gone]
        self.poison = [r for r in self.poison if (r.topic, r.partition) not in gone]
        return before - len(self)

    def due(self, now: float) -> bool:
        """Whether the held batch may go to the handler again."""
        return now >= self.next_at

    def wait_s(self, now: float) -> float:
        return max(0.0, self.next_at - now)

    def retrying(self) -> None:
        """The held batch goes to the handler again."""
        self.retries += 1

    def failed(self, error: BaseException, now: float) -> None:
        """The retry failed too: wait twice as long (at most the cap) before the next."""
        self.error = _one_line(error)
        self.delay = min(self.cap, self.delay * 2)
        self.next_at = now + self.delay

    def lasted(self, now: float) -> float:
        return max(0.0, now - self.started_at)


def _one_line(error: BaseException) -> str:
    # libpq's messages span lines ("Is the server running on that host...")
    return " ".join(str(error).split())
