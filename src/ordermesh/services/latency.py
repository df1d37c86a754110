"""Log-scale latency histograms: percentiles over any window from small sparse dicts.

Bin i holds (gamma^(i-1), gamma^i] with gamma = (1 + alpha) / (1 - alpha) (DDSketch-style),
so the value reported for a bin is within ``LATENCY_ALPHA`` of anything in it, and merging
two histograms is adding their counts.
"""

from __future__ import annotations

import math
from typing import Final, TypeVar

LATENCY_ALPHA: Final = 0.01
_GAMMA: Final = (1 + LATENCY_ALPHA) / (1 - LATENCY_ALPHA)
_LOG_GAMMA: Final = math.log(_GAMMA)
# latencies are clamped into [1 us, 1 day]; <= 0 (clock skew) has a bin of its own
_MIN_LATENCY: Final = 1e-6
_MAX_LATENCY: Final = 86_400.0
ZERO_BIN: Final = -(10**6)

_K = TypeVar("_K")


def latency_bin(seconds: float) -> int:
    """The log-scale bin of a latency: bin i holds (gamma^(i-1), gamma^i]."""
    if not seconds > 0:  # also NaN
        return ZERO_BIN
    clamped = min(max(seconds, _MIN_LATENCY), _MAX_LATENCY)
    return math.ceil(math.log(clamped) / _LOG_GAMMA)


def bin_value(index: int) -> float:
    """The value reported for a bin: within ``LATENCY_ALPHA`` of anything in it."""
    if index == ZERO_BIN:
        return 0.0
    return 2.0 * _GAMMA**index / (_GAMMA + 1.0)


def percentile(hist: dict[int, int], q: float, exact_max: float | None = None) -> float | None:
    """Nearest-rank ``q``-quantile (0 < q <= 1) of a histogram; None when it is empty."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            value = bin_value(index)
            # the exact max bounds every estimate (and only moves it closer to the truth)
            return value if exact_max is None else min(value, exact_max)
    raise AssertionError("unreachable: rank <= total")


def merge_counts(into: dict[_K, int], other: dict[_K, int]) -> None:
    for key, count in other.items():
        into[key] = into.get(key, 0) + count


class Histogram:
    """A latency histogram (log-scale bins) and its exact max."""

    __slots__ = ("bins", "max")

    def __init__(self) -> None:
        self.bins: dict[int, int] = {}
        self.max: float | None = None

    def add(self, seconds: float, also: Histogram | None = None) -> None:
        """Count ``seconds`` here and in ``also`` (the bin is computed once)."""
        if not math.isfinite(seconds):
            return
        seconds = max(seconds, 0.0)  # clock skew between hosts: count it as instant
        index = latency_bin(seconds)
        self.bins[index] = self.bins.get(index, 0) + 1
        if self.max is None or seconds > self.max:
            self.max = seconds
        if also is not None:
            also.bins[index] = also.bins.get(index, 0) + 1
            if also.max is None or seconds > also.max:
                also.max = seconds

    def merge(self, other: Histogram) -> None:
        merge_counts(self.bins, other.bins)
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max
