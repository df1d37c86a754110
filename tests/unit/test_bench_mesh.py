"""``ordermesh bench mesh``'s pure parts: reading Kafka's tools, the latency arithmetic,
its command line and the page it writes (never its speed)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ordermesh.bench import mesh
from ordermesh.bench.kafka_tools import (
    consumer_performance_args,
    parse_consumer_performance,
    parse_producer_performance,
    producer_performance_args,
)
from ordermesh.bench.mesh import (
    PARTS,
    REST_OF_MACHINE,
    OutcomeStamp,
    mean_record_bytes,
    parse_parts,
    parse_rates,
    percentiles_ms,
    resolve_rates,
    throughput_rows,
    window_latencies,
)
from ordermesh.bench.performance_doc import (
    NOTES_HEADING,
    render_markdown,
    write_chart,
    write_docs,
)
from ordermesh.cli import app
from ordermesh.errors import ConfigError, OrderMeshError

# captured from Kafka 4.3.1's tools against a local broker
PRODUCER_OUTPUT = """\
99703 records sent, 49826.6 records/sec (14.49 MB/sec), 165.5 ms avg latency, 485.0 ms max latency.
100153 records sent, 50076.5 records/sec (14.57 MB/sec), 6.2 ms avg latency, 56.0 ms max latency.
400000 records sent, 49683.269159 records/sec (14.45 MB/sec), 55.10 ms avg latency, \
485.00 ms max latency, 6 ms 50th, 309 ms 95th, 357 ms 99th, 463 ms 99.9th.
"""
CONSUMER_OUTPUT = """\
start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, \
rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec
2026-11-25 09:30:01:265, 2026-11-25 09:30:02:919, 58.1741, 35.1718, 200000, 120918.9843, \
742, 912, 63.7874, 219298.2456
"""


def test_producer_performance_summary_is_read_past_the_interval_lines() -> None:
    parsed = parse_producer_performance(PRODUCER_OUTPUT)
    assert parsed["records"] == 400_000
    assert parsed["records_per_s"] == 49683.3
    assert parsed["mb_per_s"] == 14.45
    assert parsed["latency_ms"] == {
        "avg": 55.1,
        "p50": 6.0,
        "p95": 309.0,
        "p99": 357.0,
        "p99.9": 463.0,
        "max": 485.0,
    }


def test_consumer_performance_result_line_is_read_by_its_header() -> None:
    parsed = parse_consumer_performance("some warning\n" + CONSUMER_OUTPUT)
    assert parsed == {
        "records": 200_000,
        "mb": 58.1741,
        "records_per_s": 120919.0,
        "mb_per_s": 35.1718,
        "fetch_records_per_s": 219298.2,
        "fetch_mb_per_s": 63.7874,
        "rebalance_ms": 742,
        "fetch_ms": 912,
    }


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_producer_performance, PRODUCER_OUTPUT.splitlines()[0]),
        (parse_producer_performance, ""),
        (parse_consumer_performance, CONSUMER_OUTPUT.splitlines()[0]),
        (parse_consumer_performance, CONSUMER_OUTPUT.replace("200000", "lots")),
    ],
    ids=["producer-interval-only", "producer-empty", "consumer-header-only", "consumer-bad"],
)
def test_output_without_a_result_is_an_error(parse: Any, text: str) -> None:
    with pytest.raises(OrderMeshError):
        parse(text)


def test_tool_command_lines_use_the_kafka_4_options() -> None:
    producer = producer_performance_args("h:1", "t", 10, 305)
    assert producer[0].endswith("ProducerPerformance")
    assert producer[1:3] == ["--bootstrap-server", "h:1"]
    assert producer[-4:] == ["--throughput", "-1", "--command-property", "acks=all"]
    consumer = consumer_performance_args("h:1", "t", 10, "g")
    assert consumer[0].endswith("ConsumerPerformance")
    assert "--num-records" in consumer and "--messages" not in consumer


def test_percentiles_are_nearest_rank_in_ms() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles_ms(values) == {
        "p50": 50.0,
        "p90": 90.0,
        "p95": 95.0,
        "p99": 99.0,
        "max": 100.0,
    }
    assert set(percentiles_ms([0.007]).values()) == {7.0}
    assert set(percentiles_ms([]).values()) == {None}


def test_rates_parse_with_half() -> None:
    assert parse_rates("1000, 5000,half") == [1000.0, 5000.0, "half"]
    for bad in ("", "fast", "0", "-5", "inf"):
        with pytest.raises(ConfigError):
            parse_rates(bad)


def test_half_is_resolved_against_the_drain_and_duplicates_drop() -> None:
    assert resolve_rates([1000.0, "half", 5000.0], 10_001.0) == ([1000.0, 5000.0], "")
    assert resolve_rates(["half"], 7000.0) == ([3500.0], "")
    rates, note = resolve_rates([1000.0, "half"], None)
    assert rates == [1000.0] and "half" in note


def test_parts_are_all_but_skip_or_only() -> None:
    assert parse_parts(None, None) == frozenset(PARTS)
    assert parse_parts("latency,api", None) == frozenset({"kafka", "python", "drain"})
    assert parse_parts(None, "drain") == frozenset({"drain"})
    for skip, only in (("kafka", "drain"), ("nope", None), (None, "nope"), (None, ",")):
        with pytest.raises(ConfigError):
            parse_parts(skip, only)


def test_record_size_is_an_orders_key_and_value() -> None:
    size = mean_record_bytes(sample=2000)
    assert 200 < size < 400
    assert size == mean_record_bytes(sample=2000)


def _stamp(order: str, created: float, event: float, reserved: bool = True) -> OutcomeStamp:
    return OutcomeStamp(order, created, event - 0.001, event, reserved)


def test_window_latencies_take_the_window_after_warmup_and_first_outcomes() -> None:
    stamps = [
        _stamp("warm", 100.0, 100.5),  # created during the warm-up: left out
        _stamp("a", 102.0, 102.010),
        _stamp("b", 103.0, 103.030, reserved=False),
        _stamp("a", 102.0, 104.0),  # a redelivered outcome: its first record counts
        _stamp("late", 112.0, 112.001),  # created after the window
    ]
    result = window_latencies(stamps, warmup_s=2.0, window_s=10.0)
    assert result["orders"] == 2
    assert result["reserved"] == 1
    assert result["decided_per_s"] == 0.2
    assert result["created_to_event_ms"]["p50"] == 10.0
    assert result["created_to_event_ms"]["max"] == 30.0
    assert result["created_to_decision_ms"]["max"] == 29.0
    assert window_latencies([], warmup_s=1, window_s=1)["orders"] == 0


def _result(*, ok: bool = True) -> dict[str, Any]:
    verify = {"ok": ok, "pending": 0, "violation_counts": {} if ok else {"lost_order": 2}}
    result: dict[str, Any] = {
        "at": "2026-01-01T00:00:00Z",
        "command": "ordermesh bench mesh --orders 5000",
        "machine": {"cpus": 2, "cpu_model": "Test CPU", "ram_gib": 8.0, "kafka": "4.3.1"},
        "setup": {"orders": 5000, "record_bytes": 305, "db": "sqlite", "malformed_ratio": 0.01},
        "kafka": {
            "producer_performance": {"records_per_s": 40_000.0, "command": "java ... PP"},
            "consumer_performance": {
                "records_per_s": 100_000.0,
                "fetch_records_per_s": 200_000.0,
                "rebalance_ms": 700,
                "command": "java ... CP",
            },
        },
        "python_consume": {"records_per_s": 300_000.0},
        "drain": [
            {
                "db": "sqlite",
                "inventory_instances": 1,
                "orders": 5000,
                "orders_per_s": 8_000.0,
                "first_commit_s": 2.0,
                "after_first_commit_orders_per_s": 9_000.0,
                "load": {"rate": 30_000.0},
                "verify": verify,
            }
        ],
        "latency": [
            {
                "rate": 1000.0,
                "decided_per_s": 990.0,
                "orders": 19_800,
                "created_to_event_ms": {"p50": 18.3, "p95": 88.6, "p99": 216.1, "max": 289.4},
                "backlog_at_load_end": 0,
                "verify": verify,
            }
        ],
        "api": {
            "background_rate": 1000.0,
            "orders": 300,
            "rate": 25.0,
            "outcomes": {"RESERVED": 300},
            "post_ack_ms": {"p50": 7.1, "p95": 49.9, "p99": 62.9, "max": 66.9},
            "post_to_reserved_ms": {"p50": 71.5, "p95": 189.2, "p99": 286.4, "max": 301.2},
        },
        "notes": [],
    }
    result["rows"] = throughput_rows(result)
    return result


def test_throughput_rows_are_percentages_of_producer_performance() -> None:
    rows = throughput_rows(_result())
    assert [row["pct_of_producer"] for row in rows] == [100.0, 500.0, 750.0, 75.0, 20.0]
    assert "305 B" in rows[0]["what"]
    assert rows[-1]["unit"] == "orders/s" and "sqlite, 1 inventory" in rows[-1]["what"]
    assert all(row["pct_of_producer"] is None for row in throughput_rows({"drain": []}))


def test_the_page_shows_the_tables_the_machine_and_the_command() -> None:
    page = render_markdown(_result())
    assert "```bash\nordermesh bench mesh --orders 5000\n```" in page
    assert "| what | rate | % of ProducerPerformance | verify |" in page
    assert "| 40,000 records/s | 100.0% | — |" in page
    assert "| 8,000 orders/s | 20.0% | OK |" in page
    assert "| 1,000 | 990 | 19,800 | 18 ms | 89 ms | 216 ms | 289 ms | 0 | OK |" in page
    assert "| 7.1 ms | 50 ms | 63 ms | 72 ms | 189 ms | 286 ms |" in page
    assert "2 × Test CPU" in page and "8.0 GiB" in page
    assert "![throughput and latency](performance.svg)" in page
    assert "performance.svg" not in render_markdown(_result(), chart=None)


def test_the_page_says_the_broker_was_warmed_first_and_how_fast() -> None:
    result = _result()
    assert "drains" not in render_markdown(result)
    result["warm_up"] = {
        "orders": 200_000,
        "seconds": 16.0,
        "orders_per_s": 12_500.0,
        "cpu": {REST_OF_MACHINE: {"cpu_s": 5.4, "us_per_order": 27.0}},
        "verify": {"ok": True},
    }
    page = render_markdown(result)
    assert "the mesh drains 200,000 orders once on the same broker (12,500 orders/s;" in page
    assert "the broker and the OS took 27.0 µs per order" in page


def test_a_failed_verify_shows_on_the_page() -> None:
    assert "FAILED: lost_order 2" in render_markdown(_result(ok=False))


def test_the_chart_is_an_svg_that_a_rerun_writes_alike(tmp_path: Path) -> None:
    first, second = tmp_path / "a.svg", tmp_path / "b.svg"
    write_chart(_result(), first)
    write_chart(_result(), second)
    assert first.read_text().lstrip().startswith("<?xml")
    assert "<svg" in first.read_text()
    assert first.read_bytes() == second.read_bytes()


def test_docs_are_the_page_and_its_chart(tmp_path: Path) -> None:
    written = write_docs(_result(), tmp_path)
    assert sorted(p.name for p in written) == ["performance.md", "performance.svg"]


def test_a_rerun_keeps_the_hand_written_findings(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    write_docs(_result(), tmp_path)
    generated = page.read_text()
    findings = f"\n{NOTES_HEADING}\n\nThe tracker is the bottleneck.\n"
    page.write_text("stale numbers" + findings)
    write_docs(_result(), tmp_path)
    assert page.read_text() == generated + findings


@pytest.mark.parametrize(
    "args",
    [
        ["--inventory", "3"],  # several inventories share only a PostgreSQL store
        ["--inventory", "0", "--db", "postgres"],
        ["--rates", "fast"],
        ["--skip", "everything"],
        ["--skip", "kafka", "--only", "drain"],
        ["--db", "mysql"],
    ],
)
def test_bad_command_lines_exit_2_before_starting_anything(args: list[str]) -> None:
    out = CliRunner().invoke(app, ["bench", "mesh", *args])
    assert out.exit_code == 2, out.output


def test_process_cpu_reads_this_process() -> None:
    before = mesh.process_cpu_s(os.getpid())
    assert before is not None
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    after = mesh.process_cpu_s(os.getpid())
    assert after is not None and after >= before
    assert mesh.process_cpu_s(None) is None
    assert mesh.machine_busy_s() is not None


def test_cpu_per_order_splits_services_and_the_rest() -> None:
    rows = mesh.cpu_per_order({"tracker": 2.0, "inventory": 1.0}, 5.0, 100_000)
    assert list(rows) == ["tracker", "inventory", "rest of the machine (broker, OS)", "total"]
    assert rows["tracker"] == {"cpu_s": 2.0, "us_per_order": 20.0}
    assert rows["rest of the machine (broker, OS)"]["cpu_s"] == 2.0
    assert rows["total"]["us_per_order"] == 50.0
    # without a machine figure only the services are listed
    assert list(mesh.cpu_per_order({"tracker": 1.0}, None, 10)) == ["tracker"]
