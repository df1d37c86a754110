"""Failures that repeat, logged without flooding: the first one, then every ``every``-th."""

from __future__ import annotations


class Repeats:
    """Counts a failure that may repeat (in a row, or since start) and says which to log."""

    __slots__ = ("count", "every")

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = every
        self.count = 0

    def failed(self) -> bool:
        """One more failure; True when this one is to be logged."""
        self.count += 1
        return self.count == 1 or self.count % self.every == 0

    def succeeded(self) -> int:
        """The run of failures is over; how many it had (0: there was none)."""
        count, self.count = self.count, 0
        return count
