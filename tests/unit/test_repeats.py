"""``Repeats``: the first failure of a run and every ``every``-th are logged, no others."""

from __future__ import annotations

import pytest

from ordermesh.repeats import Repeats


def test_the_first_and_every_nth_failure_are_logged() -> None:
    failures = Repeats(every=3)
    logged = [n for n in range(1, 11) if failures.failed()]
    assert logged == [1, 3, 6, 9]
    assert failures.count == 10


def test_a_success_ends_the_run_and_says_how_long_it_was() -> None:
    failures = Repeats(every=100)
    assert failures.succeeded() == 0
    failures.failed()
    failures.failed()
    assert failures.succeeded() == 2
    assert failures.count == 0
    assert failures.failed()  # the first of a new run is logged again


def test_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Repeats(every=0)
