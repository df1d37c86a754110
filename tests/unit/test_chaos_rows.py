"""The fault matrix's rows: how verify's report becomes a row, and which rows run."""

from __future__ import annotations

from typing import Any

import pytest

from ordermesh import chaos
from ordermesh.errors import OrderMeshError


def life_report(**changes: Any) -> dict[str, Any]:
    """verify's ``as_dict()`` of a clean whole-life run: 10 orders, 7 shipped."""
    report: dict[str, Any] = {
        "ok": True,
        "pending": 0,
        "orders_records": 10,
        "duplicate_outcomes": 0,
        "dlq_entries": 0,
        "violation_counts": {},
        "lifecycle": {
            "orders": 10,
            "statuses": {"SHIPPED": 7, "EXPIRED": 1, "CANCELLED": 1, "RESERVED": 1},
            "money_checked": True,
            "captured_cents": 7_500,
            "refunded_cents": 500,
            "shipped_value_cents": 7_000,
        },
    }
    report.update(changes)
    return report


def test_a_clean_life_shows_its_shipped_and_ended_orders_and_money_ok() -> None:
    row = chaos.row_from_verify("payments-kill", life_report(), acked=10)
    assert (row.shipped, row.ended, row.double_charges, row.money_ok) == (7, 9, 0, True)
    assert row.verify_ok and row.lost == 0


def test_a_double_charge_counts_and_money_is_not_ok() -> None:
    report = life_report(ok=False, violation_counts={"double-charge": 2, "double-capture": 1})
    row = chaos.row_from_verify("gateway-lossy", report, acked=10)
    assert row.double_charges == 3
    assert not row.money_ok and not row.verify_ok


def test_money_kept_but_not_shipped_is_not_ok_even_without_a_violation() -> None:
    report = life_report()
    report["lifecycle"] = {**report["lifecycle"], "refunded_cents": 0}
    assert not chaos.row_from_verify("expiry-race", report, acked=10).money_ok


def test_a_row_without_the_ledger_is_not_money_ok() -> None:
    report = life_report()
    report["lifecycle"] = {**report["lifecycle"], "money_checked": False}
    assert not chaos.row_from_verify("gateway-down", report, acked=10).money_ok


def test_table_cells_show_the_life_only_for_whole_life_rows() -> None:
    row = chaos.row_from_verify("payments-kill", life_report(), acked=10)
    row.lifecycle = True
    cells = dict(zip(chaos.COLUMNS, next(chaos.table_rows([row])), strict=True))
    assert (cells["shipped / ended"], cells["money"]) == ("7 / 9", "ok")
    row.lifecycle = False
    cells = dict(zip(chaos.COLUMNS, next(chaos.table_rows([row])), strict=True))
    assert (cells["shipped / ended"], cells["money"]) == ("—", "—")


def test_whole_life_rows_are_in_the_matrix_with_a_mesh_that_runs_the_life() -> None:
    by_name = {s.name: s for s in chaos.SCENARIOS}
    life = {
        "payments-kill",
        "gateway-down",
        "gateway-slow",
        "gateway-lossy",
        "fulfilment-kill",
        "expiry-race",
    }
    assert life <= set(by_name)
    assert all(by_name[n].lifecycle for n in life)
    assert not any(s.lifecycle for s in chaos.SCENARIOS if s.name not in life)
    assert by_name["expiry-race"].settings["reservation_ttl_s"] < 10
    assert len(by_name) == len(chaos.SCENARIOS)  # names are unique


def test_select_names_the_unknown_and_keeps_the_quick_subset() -> None:
    quick = [s.name for s in chaos.select(None, quick=True)]
    assert quick == [s.name for s in chaos.SCENARIOS if s.quick]
    assert [s.name for s in chaos.select(["gateway-down"], quick=False)] == ["gateway-down"]
    with pytest.raises(OrderMeshError, match="no-such-row"):
        chaos.select(["no-such-row"], quick=False)


def test_the_docs_block_describes_every_row_it_shows() -> None:
    row = chaos.row_from_verify("gateway-slow", life_report(), acked=10)
    block = chaos.render_markdown([row], "ordermesh chaos", 60.0)
    assert block.startswith(chaos.DOC_BEGIN) and block.rstrip().endswith(chaos.DOC_END)
    assert "| gateway-slow | whole life: gateway latency" in block
