"""The pure parts of ``bench.lifecycle`` (when a lifecycle mesh is done, the gateway's
Little's-law bound, the lifecycle latencies) and the page's section on them."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from ordermesh.bench.lifecycle import (
    LifeProgress,
    all_ended,
    compare_latency,
    gateway_bound,
    gateway_latency_options,
    life_window_latencies,
    settled,
)
from ordermesh.bench.mesh import MeshBenchPlan, OutcomeStamp
from ordermesh.bench.performance_doc import lifecycle_section, render_markdown
from ordermesh.cli import app


def test_the_gateway_options_give_its_latency_or_nothing() -> None:
    assert gateway_latency_options(150, 800) == (
        "--latency-p50-ms",
        "150",
        "--latency-p99-ms",
        "800",
    )
    assert gateway_latency_options(0, 0) == ()


def test_the_bound_is_calls_in_flight_over_two_calls_of_the_mean_latency() -> None:
    # a constant latency: the mean is the median
    assert gateway_bound(100, 100, concurrency=10) == {
        "mean_call_ms": 100.0,
        "batch": 1,
        "in_flight": 10,
        "orders_per_s": 50.0,
    }
    # in a batch of a constant latency, the slowest is as fast as any
    assert gateway_bound(100, 100, concurrency=10, batch=50)["mean_call_ms"] == 100.0
    # the lognormal's tail lifts the mean above the median
    realistic = gateway_bound(150, 800, concurrency=128, instances=2)
    assert 190 < realistic["mean_call_ms"] < 200
    assert realistic["in_flight"] == 256
    assert realistic["orders_per_s"] == pytest.approx(
        256 / (2 * realistic["mean_call_ms"] / 1000), rel=1e-3
    )
    # a call in a batch waits for the slowest of its batch: of 100, near the p99
    batched = gateway_bound(150, 800, concurrency=4096, batch=100)
    assert 700 < batched["mean_call_ms"] < 1100
    assert batched["orders_per_s"] == pytest.approx(
        4096 / (2 * batched["mean_call_ms"] / 1000), rel=1e-3
    )


def test_orders_have_ended_when_none_is_short_of_its_end_and_all_are_there() -> None:
    ended = {"PLACED": 0, "RESERVED": 0, "PAID": 0, "SHIPPED": 9, "REJECTED": 1}
    assert all_ended(ended, 10)
    assert all_ended(ended, None)
    assert not all_ended(ended, 11)  # an order the tracker has not seen yet
    assert not all_ended({**ended, "PAID": 1}, None)
    assert not all_ended({**ended, "RESERVED": 1}, 11)


def _progress(**changes: Any) -> LifeProgress:
    base = LifeProgress({"SHIPPED": 5}, work=0, lag=0, ends_before=40, ends_after=40)
    return base._replace(**changes)


def test_settled_needs_no_work_no_lag_and_no_record_appended_meanwhile() -> None:
    assert settled(_progress(), 5)
    assert not settled(_progress(), 6)
    assert not settled(_progress(work=1), 5)  # a capture still due or unpublished
    assert not settled(_progress(lag=3), 5)
    # an answer published while the look was taken is not consumed yet
    assert not settled(_progress(ends_after=41), 5)
    assert not settled(_progress(statuses={"SHIPPED": 4, "PAID": 1}), 5)


def _stamp(order_id: str, created: float, event: float, *, reserved: bool = True) -> OutcomeStamp:
    return OutcomeStamp(order_id, created, event - 0.001, event, reserved)


def test_lifecycle_latencies_are_of_the_windows_reserved_orders() -> None:
    stamps = [
        _stamp("early", 100.0, 100.002),  # in the warm-up
        _stamp("a", 102.0, 102.010),
        _stamp("a", 102.0, 103.0),  # a redelivered decision: the first counts
        _stamp("b", 103.0, 103.020),
        _stamp("rejected", 104.0, 104.004, reserved=False),
        _stamp("unshipped", 105.0, 105.030),
        _stamp("late", 112.0, 112.001),  # created after the window
    ]
    shipped = {"early": 100.5, "a": 102.5, "b": 104.0, "late": 112.2}
    result = life_window_latencies(stamps, shipped, warmup_s=2.0, window_s=10.0)
    assert result["orders"] == 4 and result["reserved"] == 3
    assert result["created_to_reserved_ms"]["p50"] == 20.0
    assert result["created_to_reserved_ms"]["max"] == 30.0
    assert result["shipped"] == 2
    assert result["created_to_shipped_ms"]["p50"] == 500.0
    assert result["created_to_shipped_ms"]["max"] == 1000.0
    empty = life_window_latencies([], {}, warmup_s=1, window_s=1)
    assert empty["orders"] == 0 and empty["shipped"] == 0


def test_latency_is_compared_with_the_reservation_only_run_at_its_rate() -> None:
    life = {"rate": 1000.0, "created_to_reserved_ms": {"p50": 6.0, "p99": 30.0}}
    others = [
        {"rate": 5000.0, "created_to_event_ms": {"p50": 9.0, "p99": 50.0}},
        {"rate": 1000.0, "created_to_event_ms": {"p50": 3.0, "p99": 20.0}},
    ]
    compared = compare_latency(life, others)
    assert compared is not None
    assert compared["reservation_only_ms"] == {"p50": 3.0, "p99": 20.0}
    assert compared["ratio"] == {"p50": 2.0, "p99": 1.5}
    assert compare_latency(life, others[:1]) is None


def _verify(ok: bool = True) -> dict[str, Any]:
    return {"ok": ok, "pending": 0, "violation_counts": {} if ok else {"money": 1}}


def _life() -> dict[str, Any]:
    cpu = {
        "gateway": {"cpu_s": 30.0, "us_per_order": 1500.0},
        "payments-1": {"cpu_s": 20.0, "us_per_order": 1000.0},
    }
    return {
        "drain": {
            "orders": 20_000,
            "shipped": 19_800,
            "shipped_s": 39.0,
            "seconds": 40.0,
            "orders_per_s": 500.0,
            "pct_of_reservation_only": 5.0,
            "reservation_only_orders_per_s": 10_000.0,
            "cpu": cpu,
            "verify": _verify(),
        },
        "realistic": {
            "orders": 2000,
            "shipped": 1980,
            "shipped_s": 9.0,
            "seconds": 10.0,
            "orders_per_s": 200.0,
            "gateway_latency_ms": {"p50": 150.0, "p99": 800.0},
            "bound": {"mean_call_ms": 194.4, "in_flight": 128, "orders_per_s": 329.2},
            "cpu": cpu,
            "verify": _verify(ok=False),
        },
        "latency": {
            "rate": 1000.0,
            "orders": 10_000,
            "created_to_reserved_ms": {"p50": 4.0, "p95": 9.0, "p99": 15.0},
            "shipped": 9000,
            "created_to_shipped_ms": {"p50": 900.0, "p95": 2000.0, "p99": 4000.0},
            "settled_s": None,
            "backlog_at_load_end": 0,
            "statuses": {"SHIPPED": 9000, "PAID": 1000},
            "verify": _verify(),
        },
        "latency_vs_reservation_only": {
            "rate": 1000.0,
            "reservation_only_ms": {"p50": 2.0, "p99": 10.0},
            "lifecycle_ms": {"p50": 4.0, "p99": 15.0},
            "ratio": {"p50": 2.0, "p99": 1.5},
        },
    }


def test_the_page_shows_the_lifecycle_drains_their_cpu_and_latency() -> None:
    page = "\n".join(lifecycle_section(_life()))
    assert "| no faults | 20,000 | 19,800 | 39.0 s | 40.0 s | 500 | 5.0% | OK |" in page
    assert "| latency p50 150 ms, p99 800 ms | 2,000 | 1,980 |" in page
    assert "FAILED: money 1" in page
    assert "The reservation-only drain of the same run: 10,000 orders/s." in page
    assert "at most 329 orders/s per payments instance" in page
    assert "the lifecycle drain (no gateway faults, 40.0 s on" in page
    assert "| gateway | 30.00 | 1500.0 |" in page
    assert "| lifecycle mesh at 1,000 orders/s | 10,000 | 4.0 ms | 9.0 ms | 15 ms | 9,000 |" in page
    assert "| reservation-only mesh at 1,000 orders/s (above) |  | 2.0 ms |  | 10 ms |" in page
    assert "p50 × 2.0, p99 × 1.5" in page
    assert "had not finished every life" in page


def test_the_page_has_the_lifecycle_section_only_when_it_was_measured() -> None:
    heading = "## The whole life of an order"
    assert heading not in render_markdown({"rows": []}, chart=None)
    assert heading in render_markdown({"rows": [], "lifecycle": _life()}, chart=None)


def test_the_lifecycle_is_measured_by_default() -> None:
    plan = MeshBenchPlan()
    assert plan.lifecycle and plan.life_orders and plan.realistic_orders > 0


@pytest.mark.parametrize(
    "args", [["--life-orders", "10"], ["--realistic-orders", "-1"], ["--life-rate", "0"]]
)
def test_bad_lifecycle_options_exit_2(args: list[str]) -> None:
    out = CliRunner().invoke(app, ["bench", "mesh", *args])
    assert out.exit_code == 2, out.output
