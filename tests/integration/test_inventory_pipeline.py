"""The inventory pipeline on the real broker: outcomes, DLQ, conservation, rebalance."""

from __future__ import annotations

import re
import signal
import threading
from collections import Counter
from collections.abc import Callable

from ordermesh import schema
from ordermesh.apps.inventory import inventory_runner
from ordermesh.config import Settings
from ordermesh.errors import DecodeError
from ordermesh.kafka.lag import group_lag
from ordermesh.kafka.reader import end_offsets, read_topic
from ordermesh.loadgen import run_load, sku_name
from ordermesh.records import ERROR_HEADER_PREFIX, header
from ordermesh.stores.factory import open_inventory_store
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS
from ordermesh.verify import verify
from tests.conftest import ServiceProcess, wait_for

ERROR_HEADERS = (
    "topic",
    "partition",
    "offset",
    "timestamp",
    "service",
    "stage",
    "class",
    "message",
)


def seed(settings: Settings, skus: int, stock: int) -> None:
    store = open_inventory_store(settings)
    store.seed({sku_name(i): stock for i in range(1, skus + 1)})
    store.close()


def _events(settings: Settings) -> int:
    return sum(high for _low, high in end_offsets(settings, settings.topic(EVENTS)).values())


def drained(settings: Settings) -> bool:
    lag = group_lag(settings, "inventory", [settings.topic(ORDERS), settings.topic(COMMANDS)])
    return sum(lag.values()) == 0


def test_20k_orders_with_malformed_no_faults(settings: Settings) -> None:
    # 1000 SKUs seeded with little stock, orders drawn from 1050: some run out, some unknown
    seed(settings, skus=1000, stock=60)
    summary = run_load(
        settings, count=20_000, duration=None, rate=None, malformed_ratio=0.05, seed=7, skus=1050
    )
    assert summary.failed == 0 and summary.acknowledged == 20_000
    assert summary.malformed_sent > 500

    store = open_inventory_store(settings)
    runner = inventory_runner(settings, store)
    runner.run(idle_exit_s=3.0)
    store.close()
    assert drained(settings)

    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    assert report.orders_records == 20_000
    assert report.invalid_records == summary.malformed_sent
    assert report.valid_orders == 20_000 - summary.malformed_sent
    # no faults: exactly one outcome per order and exactly one DLQ entry per bad message
    assert report.duplicate_outcomes == 0
    assert report.duplicate_dlq == 0
    assert sum(report.outcomes.values()) == report.valid_orders
    assert report.outcomes["OrderReserved"] > 0
    assert report.outcomes["OrderRejected.OUT_OF_STOCK"] > 0
    assert report.outcomes["OrderRejected.UNKNOWN_SKU"] > 0

    originals = {(r.partition, r.offset): r for r in read_topic(settings, settings.topic(ORDERS))}
    dlq = list(read_topic(settings, settings.topic(DLQ)))
    assert len(dlq) == summary.malformed_sent
    for rec in dlq:
        values = {h: header(rec.headers, ERROR_HEADER_PREFIX + h) for h in ERROR_HEADERS}
        assert all(v is not None for v in values.values()), values
        assert values["topic"] == settings.topic(ORDERS).encode()
        assert values["service"] == b"inventory"
        assert values["stage"] == b"decode"
        assert values["class"] is not None and values["class"].startswith(b"DecodeError")
        src = originals[(int(values["partition"] or b""), int(values["offset"] or b""))]
        assert (rec.key, rec.value) == (src.key, src.value)
        assert values["timestamp"] == str(src.timestamp_ms).encode()
        try:
            schema.decode_order(src.value)
            raise AssertionError("a valid order was dead-lettered")
        except DecodeError:
            pass

    # the events topic agrees with the DB on every order, and stock matches the ledger
    kinds = Counter(
        schema.decode_event(r.value).__class__.__name__
        for r in read_topic(settings, settings.topic(EVENTS))
    )
    assert kinds["OrderReserved"] + kinds["OrderRejected"] == report.valid_orders


def _records_in(proc: ServiceProcess) -> int:
    match = re.search(r"stopped after (\d+) records in", proc.log_text())
    assert match, proc.log_text()[-2000:]
    return int(match.group(1))


def test_two_instances_with_rebalance_mid_stream(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    seed(settings, skus=200, stock=150)
    first = service_factory(["inventory", "run"], settings, "inv-a")
    # a paced load keeps orders arriving while the second instance joins
    load = threading.Thread(
        target=run_load,
        args=(settings,),
        kwargs=dict(
            count=24_000, duration=None, rate=3_000, malformed_ratio=0.02, seed=11, skus=200
        ),
    )
    load.start()
    try:
        wait_for(lambda: _events(settings) > 3_000, 60, "instance A to be mid-stream")
        second = service_factory(["inventory", "run"], settings, "inv-b")
        wait_for(
            lambda: re.search(r"assigned .*orders\[", second.log_text()),
            60,
            "instance B to take over partitions of orders",
        )
    finally:
        load.join()
    wait_for(lambda: drained(settings), 120, "both instances to drain the topics")
    assert first.stop() == 0, first.log_text()[-3000:]
    assert second.stop() == 0, second.log_text()[-3000:]
    assert "revoked" in first.log_text()  # the rebalance really moved partitions away
    assert _records_in(first) > 0 and _records_in(second) > 0

    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    assert report.orders_records == 24_000
    store = open_inventory_store(settings)
    assert all(row.available >= 0 for row in store.stock())
    store.close()


def test_sigterm_finishes_batch_commits_and_exits_zero(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    seed(settings, skus=100, stock=1000)
    proc = service_factory(["inventory", "run"], settings, "inv")
    run_load(settings, count=5_000, duration=None, rate=None, malformed_ratio=0.0, seed=3, skus=100)
    wait_for(lambda: drained(settings), 90, "the service to drain the topic")
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.log_text()[-3000:]
    assert "stopped after" in proc.log_text()
    assert verify(settings, check_tracker=False).ok
