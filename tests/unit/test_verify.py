"""The pure checks of ``verify``: a consistent picture passes, each broken invariant fails."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from ordermesh import schema
from ordermesh.schema import ItemQty, OrderRejected, OrderReserved
from ordermesh.stores.inventory import StockRow
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS
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


def test_unknown_db_order_fails() -> None:
    obs, stock, movements, db = consistent()
    db["ghost"] = ("REJECTED", ())
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"unknown_db_order": 1}


# --- the inventory DB against the events ------------------------------------------


def test_an_outcome_without_a_db_row_fails() -> None:
    obs, stock, movements, db = consistent()
    del db["o2"]  # rejected: holds no stock, so only the missing row tells
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"outcome_not_in_db": 1}
    assert "o2" in report.violations[0]


def test_a_db_row_disagreeing_with_the_outcome_event_fails() -> None:
    obs, stock, movements, db = consistent()
    db["o2"] = ("RESERVED", ())
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"db_outcome_mismatch": 1}


def test_negative_stock_fails() -> None:
    obs, _stock, movements, db = consistent()
    movements["B"] = -1
    stock = [StockRow("A", 8, 2), StockRow("B", -1, 0)]
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"negative_stock": 1}


def test_reserved_not_held_by_db_orders_fails() -> None:
    obs, stock, movements, db = consistent()
    db["o1"] = ("RESERVED", (("A", 1),))  # the row holds less than the stock says
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"reserved_mismatch_db": 1}


def test_reserved_not_held_by_events_fails() -> None:
    obs, stock, movements, db = consistent()
    obs.cancelled.discard("o3")  # the events say B is still held; the DB released it
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"reserved_mismatch_events": 1}


def test_a_sku_named_only_by_the_events_is_checked() -> None:
    obs, stock, movements, db = consistent()
    obs.valid_orders["o4"] = (2, 0)
    obs.outcomes["o4"][reserved("o4", "Z", 1)] += 1
    obs.reserved_items["o4"] = (ItemQty("Z", 1),)
    db["o4"] = ("RESERVED", ())  # the row is there but holds nothing, stock has no Z
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"sku_missing_from_db": 1}
    assert "Z" in report.violations[0]


def test_a_sku_named_only_by_the_movements_is_checked() -> None:
    obs, stock, movements, db = consistent()
    movements["R"] = 5  # restocked, yet no stock row
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"sku_missing_from_db": 1}


def test_a_sku_released_by_the_events_but_unknown_to_the_db_fails() -> None:
    obs, stock, movements, db = consistent()
    obs.released_skus.add("Q")
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"sku_missing_from_db": 1}


# --- order-commands ---------------------------------------------------------------


def test_cancels_with_an_effect_pass() -> None:
    obs, stock, movements, db = consistent()
    obs.commands = 3
    obs.cancels = [("o3", 0, 0), ("o2", 0, 1), ("nobody", 1, 0)]
    obs.cancel_rejected.add("o2")  # o2 was rejected: the cancel is refused by an event
    obs.dlq_command_sources[(1, 0)] = 1  # unknown order: dead-lettered
    report = check(obs, stock, movements, db)
    assert report.ok, report.violations
    assert report.cancel_commands == 3 and report.commands_records == 3


def test_a_cancel_without_any_effect_fails() -> None:
    obs, stock, movements, db = consistent()
    obs.cancels = [("o1", 0, 0), ("nobody", 1, 0)]
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"cancel_without_effect": 2}


def test_an_undecodable_command_without_dlq_entry_fails() -> None:
    obs, stock, movements, db = consistent()
    obs.invalid_commands = {(0, 4), (0, 5)}
    obs.dlq_command_sources[(0, 4)] = 1
    obs.dlq_sources[(0, 5)] = 1  # an entry for orders[0]@5 does not count
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"invalid_command_not_in_dlq": 1}
    assert "order-commands[0]@5" in report.violations[0]


def test_a_cancel_effect_the_outcome_rules_out_fails() -> None:
    obs, stock, movements, db = consistent()
    obs.cancel_rejected.add("o1")  # o1 was reserved: a refusal is wrong
    obs.cancel_reject_reasons["o1"] = {"ORDER_REJECTED"}
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"cancel_conflicts_outcome": 1}

    # o1 was neither shipped nor ended by itself: "too late" refusals are wrong too
    for reason in ("ALREADY_SHIPPED", "ALREADY_ENDED"):
        obs, stock, movements, db = consistent()
        obs.cancel_rejected.add("o1")
        obs.cancel_reject_reasons["o1"] = {reason}
        report = check(obs, stock, movements, db)
        assert report.violation_counts == {"cancel_conflicts_outcome": 1}, reason

    obs, stock, movements, db = consistent()
    obs.cancelled.add("o2")  # o2 was rejected: nothing to cancel
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"cancel_conflicts_outcome": 1}


def test_undecodable_events_fail() -> None:
    obs, stock, movements, db = consistent()
    obs.undecodable_events = [(3, 7), (3, 9)]
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"undecodable_event": 2}
    assert "order-events[3]@7" in report.violations[0]


# --- pending: records the services have not committed yet -------------------------


def test_an_order_past_the_committed_offset_is_pending_not_lost() -> None:
    obs, stock, movements, db = consistent()
    obs.valid_orders["o4"] = (2, 5)
    obs.invalid.add((2, 6))
    obs.inventory_orders_done = {0: 2, 1: 2, 2: 5}
    report = check(obs, stock, movements, db)
    assert report.ok, report.violations
    assert report.pending == 2
    assert report.pending_counts == {"lost": 1, "invalid_not_in_dlq": 1}
    assert report.as_dict()["pending"] == 2

    obs.inventory_orders_done[2] = 7  # committed: the inventory is done with them
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"lost": 1, "invalid_not_in_dlq": 1}
    assert report.pending == 0


def test_a_partition_never_committed_is_all_pending() -> None:
    obs, stock, movements, db = consistent()
    obs.valid_orders["o4"] = (2, 0)
    obs.inventory_orders_done = {0: 2, 1: 2}  # nothing committed on partition 2
    report = check(obs, stock, movements, db)
    assert report.ok and report.pending_counts == {"lost": 1}


def test_an_uncommitted_decision_may_be_in_the_db_before_its_events() -> None:
    obs, stock, movements, db = consistent()
    # o4 reserved 1 A in the DB; the crash came before its event was produced
    obs.valid_orders["o4"] = (2, 0)
    obs.unsettled_skus.add("A")
    db["o4"] = ("RESERVED", (("A", 1),))
    stock = [StockRow("A", 7, 3), StockRow("B", 5, 0)]
    obs.inventory_orders_done = {0: 2, 1: 2, 2: 0}
    report = check(obs, stock, movements, db)
    assert report.ok, report.violations
    assert report.pending_counts == {"lost": 1, "reserved_mismatch_events": 1}

    obs.inventory_orders_done[2] = 1
    obs.unsettled_skus.clear()
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"lost": 1, "reserved_mismatch_events": 1}


def test_an_outcome_of_an_uncommitted_order_may_precede_its_db_row() -> None:
    obs, stock, movements, db = consistent()
    del db["o2"]
    obs.inventory_orders_done = {0: 1, 1: 2}  # o2 is orders[0]@1: not committed
    report = check(obs, stock, movements, db)
    assert report.ok and report.pending_counts == {"outcome_not_in_db": 1}


def test_an_uncommitted_cancel_is_pending() -> None:
    obs, stock, movements, db = consistent()
    obs.cancels = [("o1", 4, 10)]
    obs.inventory_commands_done = {4: 10}
    # the DB may already have released o1's stock; its events are not out yet
    db["o1"] = ("CANCELLED", (("A", 2),))
    stock = [StockRow("A", 10, 0), StockRow("B", 5, 0)]
    report = check(obs, stock, movements, db)
    assert report.ok, report.violations
    assert report.pending_counts == {"cancel_without_effect": 1, "reserved_mismatch_events": 1}

    obs.inventory_commands_done = {4: 11}
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"cancel_without_effect": 1, "reserved_mismatch_events": 1}


def test_invariants_within_the_db_are_never_pending() -> None:
    obs, stock, movements, db = consistent()
    obs.inventory_orders_done = {0: 0, 1: 0}  # nothing committed at all
    obs.unsettled_skus = {"A", "B"}
    movements["B"] = 6
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"stock_not_conserved": 1}


def test_tracker_lagging_behind_is_pending() -> None:
    obs, _, _, db = consistent()
    obs.tracker_orders_done = {0: 1, 1: 0}  # the tracker has only read orders[0]@0
    report = tracker_report(obs, db, {"o1": "RESERVED"})
    assert report.ok, report.violations
    assert report.pending_counts == {"tracker_missing": 2} and report.tracker_missing == 0

    obs.tracker_unsettled.add("o3")  # the tracker has not committed o3's cancel
    report = tracker_report(obs, db, {**TRACKED, "o3": "RESERVED"})
    assert report.ok and report.pending_counts == {"tracker_status_mismatch": 1}

    obs.tracker_unsettled.clear()
    report = tracker_report(obs, db, {**TRACKED, "o3": "RESERVED"})
    assert report.violation_counts == {"tracker_status_mismatch": 1}


def test_tracker_ahead_of_the_events_of_an_uncommitted_cancel_is_pending() -> None:
    obs, _, _, db = consistent()
    # the DB cancelled o1 and the tracker says so, the read of the DB came first
    obs.cancels = [("o1", 0, 3)]
    obs.inventory_commands_done = {0: 3}
    report = tracker_report(obs, db, {**TRACKED, "o1": "CANCELLED"})
    assert report.ok and report.pending_counts == {"tracker_status_mismatch": 1}


def test_a_rejected_order_may_name_an_unknown_sku() -> None:
    obs, stock, movements, db = consistent()
    db["o2"] = ("REJECTED", (("NOPE", 1),))  # UNKNOWN_SKU keeps the items as placed
    assert check(obs, stock, movements, db).ok
    db["o3"] = ("CANCELLED", (("NOPE", 1),))  # but a cancelled one held its stock
    report = check(obs, stock, movements, db)
    assert report.violation_counts["sku_missing_from_db"] == 1


# --- deleted by retention: said, not reported as lost ---------------------------------


def test_orders_whose_outcomes_retention_deleted_are_unverifiable_not_lost() -> None:
    obs, stock, movements, db = consistent()
    # o1's OrderReserved was deleted with the start of order-events[0]
    del obs.outcomes["o1"]
    del obs.reserved_items["o1"]
    obs.deleted = {EVENTS: {0: 40}}
    report = check(obs, stock, movements, db)
    assert report.ok, report.violations
    assert report.unverifiable_counts == {"lost": 1, "reserved_mismatch_events": 1}
    assert report.deleted_by_retention == [
        "records before offset 40 of order-events[0] were deleted by retention:"
        " outcomes among them can't be checked"
    ]
    assert report.as_dict()["unverifiable"] == 2

    obs.deleted = {}  # nothing was deleted: the same picture is a lost order
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"lost": 1, "reserved_mismatch_events": 1}
    assert report.unverifiable == 0 and report.deleted_by_retention == []


def test_orders_retention_deleted_from_the_orders_topic_are_not_unknown() -> None:
    obs, stock, movements, db = consistent()
    # o0 was decided long ago; its OrderPlaced and its outcome are both gone
    db["o0"] = ("REJECTED", ())
    tracker = {**TRACKED, "o0": "REJECTED"}
    obs.deleted = {ORDERS: {2: 7, 0: 3}, EVENTS: {2: 9}}
    report = check(obs, stock, movements, db)
    check_tracker(report, obs, db, tracker)
    assert report.ok, report.violations
    assert report.unverifiable_counts == {"unknown_db_order": 1, "tracker_unknown_order": 1}
    assert report.deleted_by_retention[:2] == [
        "records before offset 9 of order-events[2] were deleted by retention:"
        " outcomes among them can't be checked",
        "records before offset 3 of orders[0] were deleted by retention:"
        " orders among them can't be checked",
    ]

    obs.deleted = {}
    report = check(obs, stock, movements, db)
    check_tracker(report, obs, db, tracker)
    assert report.violation_counts == {"unknown_db_order": 1, "tracker_unknown_order": 1}


def test_a_trimmed_dlq_makes_missing_dlq_entries_unverifiable() -> None:
    obs, stock, movements, db = consistent()
    obs.dlq_sources.clear()  # the bad record's DLQ entry is gone
    obs.deleted = {DLQ: {0: 1}}
    report = check(obs, stock, movements, db)
    assert report.ok and report.unverifiable_counts == {"invalid_not_in_dlq": 1}


def test_what_retention_deleted_never_hides_a_db_invariant() -> None:
    obs, stock, movements, db = consistent()
    obs.deleted = {ORDERS: {0: 5}, EVENTS: {0: 5}, DLQ: {0: 5}, COMMANDS: {0: 5}}
    movements["B"] = 6
    report = check(obs, stock, movements, db)
    assert report.violation_counts == {"stock_not_conserved": 1}
