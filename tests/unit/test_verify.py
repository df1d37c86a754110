"""The pure checks of ``verify``: a consistent picture passes, each broken invariant fails."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from ordermesh import schema
from ordermesh.schema import ItemQty, OrderRejected, OrderReserved
from ordermesh.stores.inventory import StockRow
from ordermesh.verify import Observed, VerifyReport, check, check_tracker

DbOrders = dict[str, tuple[str, tuple[tuple[str, int], ...]]]


def reserved(order_id: str, sku: str, qty: int) -> bytes:
    return schema.encode(OrderReserved(order_id, (ItemQty(sku, qty),), 1.0, "EUR", 1.0, 2.0))


def rejected(order_id: str) -> bytes:
    return schema.encode(OrderRejected(order_id, "OUT_OF_STOCK", "none left", 1.0, 2.0))


def consistent() -> tuple[Observed, list[StockRow], dict[str, int], DbOrders]:
    """o1 reserved 2 A, o2 rejected, o3 reserved 1 B then cancelled; one bad record."""
    obs = Observed()
    obs.records = 4
    obs.valid_orders = {"o1": (0, 0), "o2": (0, 1), "o3": (1, 0)}
    obs.invalid = {(1, 1)}
    obs.dlq_sources[(1, 1)] = 1
    obs.dlq_entries = 1
    obs.outcomes["o1"][reserved("o1", "A", 2)] += 1
    obs.outcomes["o2"][rejected("o2")] += 1
    obs.outcomes["o3"][reserved("o3", "B", 1)] += 1
    obs.reserved_items = {"o1": (ItemQty("A", 2),), "o3": (ItemQty("B", 1),)}
    obs.cancelled = {"o3"}
    stock = [StockRow("A", 8, 2), StockRow("B", 5, 0)]
    movements = {"A": 10, "B": 5}
    db: DbOrders = {
        "o1": ("RESERVED", (("A", 2),)),
        "o2": ("REJECTED", ()),
        "o3": ("CANCELLED", (("B", 1),)),
    }
    return obs, stock, movements, db


TRACKED = {"o1": "RESERVED", "o2": "REJECTED", "o3": "CANCELLED"}


def tracker_report(obs: Observed, db: DbOrders, tracker: Mapping[str, str]) -> VerifyReport:
    report = VerifyReport()
    check_tracker(report, obs, db, tracker)
    return report


def test_a_consistent_picture_passes() -> None:
    obs, stock, movements, db = consistent()
    report = check(obs, stock, movements, db)
    assert report.ok, report.violations
    assert report.valid_orders == 3 and report.cancelled == 1
    assert report.outcomes == {"OrderReserved": 2, "OrderRejected.OUT_OF_STOCK": 1}
    check_tracker(report, obs, db, TRACKED)
    assert report.ok, report.violations
    assert report.tracker_checked and report.tracker_orders == 3
    assert report.as_dict()["tracker_mismatches"] == 0


def test_a_lost_order_fails() -> None:
    obs, stock, movements, db = consistent()
    obs.valid_orders["o4"] = (2, 0)
    report = check(obs, stock, movements, db)
    assert not report.ok
    assert report.violation_counts == {"lost": 1}
    assert "o4" in report.violations[0]


def test_conflicting_outcomes_fail_but_identical_copies_do_not() -> None:
    obs, stock, movements, db = consistent()
    obs.outcomes["o2"][rejected("o2")] += 1  # redelivered identical copy: allowed
    report = check(obs, stock, movements, db)
    assert report.ok and report.duplicate_outcomes == 1

    obs.outcomes["o2"][reserved("o2", "A", 1)] += 1
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"conflicting_outcomes": 1}


def test_stock_not_conserved_fails() -> None:
    obs, stock, movements, db = consistent()
    movements["B"] = 6  # a unit entered that is neither available nor reserved
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"stock_not_conserved": 1}


def test_stock_released_twice_fails() -> None:
    obs, _stock, movements, db = consistent()
    # o3's cancel released its unit twice: one unit too many available
    stock = [StockRow("A", 8, 2), StockRow("B", 6, 0)]
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"stock_not_conserved": 1}


def test_invalid_record_without_dlq_entry_fails() -> None:
    obs, stock, movements, db = consistent()
    obs.dlq_sources.clear()
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"invalid_not_in_dlq": 1}


# --- tracker ----------------------------------------------------------------------


def test_tracker_missing_an_order_fails() -> None:
    obs, _, _, db = consistent()
    report = tracker_report(obs, db, {"o1": "RESERVED", "o3": "CANCELLED"})
    assert report.violation_counts == {"tracker_missing": 1}
    assert report.tracker_missing == 1 and "o2" in report.violations[0]


@pytest.mark.parametrize(
    ("order_id", "status"),
    [
        ("o1", "PLACED"),  # the inventory decided, the tracker never heard
        ("o1", "REJECTED"),
        ("o2", "RESERVED"),
        ("o3", "RESERVED"),  # the cancel did not reach the tracker
    ],
)
def test_tracker_status_disagreeing_with_inventory_fails(order_id: str, status: str) -> None:
    obs, _, _, db = consistent()
    report = tracker_report(obs, db, {**TRACKED, order_id: status})
    assert report.violation_counts == {"tracker_status_mismatch": 1}
    assert report.tracker_mismatches == 1
    assert order_id in report.violations[0] and status in report.violations[0]


def test_tracker_falls_back_to_the_topics_and_expects_placed_when_undecided() -> None:
    obs, _, _, db = consistent()
    del db["o1"], db["o3"]  # e.g. another inventory DB: the events still tell
    assert tracker_report(obs, db, TRACKED).ok
    assert not tracker_report(obs, db, {**TRACKED, "o3": "RESERVED"}).ok

    obs.valid_orders["o4"] = (2, 0)  # not decided by anyone yet
    assert tracker_report(obs, db, {**TRACKED, "o4": "PLACED"}).ok
    report = tracker_report(obs, db, {**TRACKED, "o4": "RESERVED"})
    assert report.violation_counts == {"tracker_status_mismatch": 1}


def test_tracker_order_not_on_the_topics_fails() -> None:
    obs, _, _, db = consistent()
    report = tracker_report(obs, db, {**TRACKED, "ghost": "PLACED"})
    assert report.violation_counts == {"tracker_unknown_order": 1}


def test_cancel_event_without_cancel_in_db_is_judged_by_the_db() -> None:
    obs, _, _, db = consistent()
    obs.cancelled.add("o1")
    # the inventory DB is the authority on o1: RESERVED
    assert tracker_report(obs, db, TRACKED).ok
