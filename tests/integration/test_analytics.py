"""Analytics on the real broker: totals equal `verify`, survive kill -9, /metrics scrapes."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ordermesh import schema
from ordermesh.config import Settings
from ordermesh.kafka.client import make_producer
from ordermesh.kafka.lag import group_lag
from ordermesh.loadgen import run_load, sku_name
from ordermesh.services.analytics import REJECT_REASONS
from ordermesh.stores.factory import open_inventory_store
from ordermesh.topics import COMMANDS, ORDERS
from ordermesh.verify import VerifyReport, verify
from tests.conftest import ServiceProcess, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seed(settings: Settings, skus: int, stock: int) -> None:
    store = open_inventory_store(settings)
    store.seed({sku_name(i): stock for i in range(1, skus + 1)})
    store.close()


def get_json(port: int, path: str) -> Any:
    """The JSON at ``path``, or None while the server is not up (or restarting)."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.TransportError:
        return None
    response.raise_for_status()
    return response.json()


def inventory_drained(settings: Settings) -> bool:
    lag = group_lag(settings, "inventory", [settings.topic(ORDERS), settings.topic(COMMANDS)])
    return bool(lag) and sum(lag.values()) == 0


def cancel(settings: Settings, order_ids: list[str]) -> None:
    producer = make_producer(settings)
    for order_id in order_ids:
        command = schema.CancelOrder(order_id=order_id, requested_at=time.time(), reason="test")
        producer.produce(settings.topic(COMMANDS), schema.encode(command), order_id.encode())
    assert producer.flush(30) == 0


def expected_totals(report: VerifyReport) -> dict[str, Any]:
    """The analytics totals that ``verify`` also counts, as verify reports them."""
    return {
        "placed": report.valid_orders,
        "malformed": report.invalid_records,
        "orders_records": report.orders_records,
        "reserved": report.outcomes.get("OrderReserved", 0),
        "rejected": {r: report.outcomes.get(f"OrderRejected.{r}", 0) for r in REJECT_REASONS},
        "decided": sum(report.outcomes.values()),
        "cancelled": report.cancelled,
        "dlq": report.dlq_entries,
        "in_flight": 0,
    }


def totals_match(port: int, expected: dict[str, Any]) -> dict[str, Any] | None:
    snap = get_json(port, "/snapshot")
    if snap is None:
        return None
    totals = snap["totals"]
    return snap if all(totals[k] == v for k, v in expected.items()) else None


def start_analytics(
    service_factory: Callable[..., ServiceProcess], settings: Settings, port: int, name: str
) -> ServiceProcess:
    proc = service_factory(["analytics", "run", "--port", str(port)], settings, name)
    wait_for(
        lambda: get_json(port, "/healthz") is not None or not proc.alive(),
        30,
        f"{name} to serve http",
    )
    assert proc.alive(), proc.log_text()[-3000:]
    return proc


def run_pipeline(
    settings: Settings, service_factory: Callable[..., ServiceProcess], count: int, rate: float
) -> VerifyReport:
    """Inventory on a load with malformed orders, unknown SKUs, stock-outs and cancels."""
    seed(settings, skus=200, stock=40)
    service_factory(["inventory", "run"], settings, "inventory")
    summary = run_load(
        settings,
        count=count,
        duration=None,
        rate=rate,
        malformed_ratio=0.05,
        seed=21,
        skus=210,
    )
    assert summary.failed == 0
    wait_for(lambda: inventory_drained(settings), 60, "the inventory to decide the orders")
    # cancel some orders: reserved ones are cancelled, rejected ones refused (an event),
    # unknown ids are dead-lettered
    cancel(settings, [f"ord-21-{n:09d}" for n in range(1, 400, 9)] + ["ord-21-999999999"])
    wait_for(lambda: inventory_drained(settings), 60, "the inventory to drain its topics")
    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    return report


def metric_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_totals_equal_verify_survive_kill_and_scrape(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    port = free_port()
    analytics = start_analytics(service_factory, settings, port, "analytics")
    report = run_pipeline(settings, service_factory, count=3_000, rate=3_000)
    expected = expected_totals(report)
    # the scenario exercises every count
    assert expected["malformed"] > 50 and expected["cancelled"] > 0
    assert expected["rejected"]["OUT_OF_STOCK"] > 0 and expected["rejected"]["UNKNOWN_SKU"] > 0
    assert expected["dlq"] > expected["malformed"]  # + the cancels of unknown orders

    snap = wait_for(lambda: totals_match(port, expected), 60, "analytics totals == verify")
    before = snap["totals"]
    assert before["duplicate_outcomes"] == 0 and before["undecodable_events"] == 0
    assert before["revenue"]["USD"] > 0
    assert sum(before["dlq_by_reason"].values()) == report.dlq_entries
    assert "CancelRejected" in before["dlq_by_reason"]
    # all of it happened within the last minutes: the series holds every decision
    assert sum(snap["series"]["decided"]) == before["decided"]
    assert snap["top_skus"]["all_time"][0]["quantity"] > 0
    assert len(snap["dlq_recent"]) == 20

    # /metrics: the runner's metrics and the analytics ones, equal to the snapshot
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    samples = metric_samples(response.text)
    for name in (
        "ordermesh_messages_in_total",
        "ordermesh_batches_total",
        "ordermesh_handle_seconds_bucket",
        "ordermesh_consumer_lag",
    ):
        assert name in samples, name
    read_in = sum(v for labels, v in samples["ordermesh_messages_in_total"])
    assert read_in == sum(before["records"].values())

    def one(name: str, **labels: str) -> float:
        values = [v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items())]
        assert len(values) == 1, (name, labels, samples.get(name))
        return values[0]

    assert one("ordermesh_analytics_orders_placed_total") == before["placed"]
    assert one("ordermesh_analytics_orders_malformed_total") == before["malformed"]
    assert one("ordermesh_analytics_orders_reserved_total") == before["reserved"]
    assert one("ordermesh_analytics_orders_cancelled_total") == before["cancelled"]
    for reason, n in before["rejected"].items():
        assert one("ordermesh_analytics_orders_rejected_total", reason=reason) == n
    for reason, n in before["dlq_by_reason"].items():
        assert one("ordermesh_analytics_dlq_total", reason=reason) == n
    assert one("ordermesh_analytics_revenue_total", currency="USD") == before["revenue"]["USD"]
    for window in ("1s", "10s", "60s"):
        for kind in ("placed", "decided", "dlq"):
            assert one("ordermesh_analytics_rate_per_second", kind=kind, window=window) >= 0
    assert one("ordermesh_analytics_latency_seconds", window="60s", quantile="0.99") > 0

    # /groups: the inventory member owns its 12 partitions; analytics reads all 15
    # without joining, and its commits show it caught up
    def groups_ready() -> dict[str, Any] | None:
        doc = get_json(port, "/groups")
        if doc is None or not doc["groups"]:
            return None
        g = doc["groups"]
        ok = (
            g["inventory"]["member_count"] == 1
            and len(g["inventory"]["members"][0]["partitions"]) == 12
            and g["inventory"]["total_lag"] == 0
            and len(g["analytics"]["partitions"]) == 15
            and g["analytics"]["total_lag"] == 0
        )
        return doc if ok else None

    groups = wait_for(groups_ready, 30, "the consumer groups view")
    g = groups["groups"]
    assert {p["member"] for p in g["inventory"]["partitions"]} == {
        g["inventory"]["members"][0]["client_id"]
    }
    assert g["analytics"]["membership"] == "reader" and g["analytics"]["member_count"] == 0
    assert g["tracker"]["state"] == "DEAD"  # not running in this test

    # kill -9 and restart: the totals are rebuilt from the topics, identical
    analytics.signal(signal.SIGKILL)
    analytics.wait(30)
    port2 = free_port()
    restarted = start_analytics(service_factory, settings, port2, "analytics-2")
    again = wait_for(lambda: totals_match(port2, expected), 60, "the restarted analytics")
    assert again["totals"] == before
    assert sum(again["series"]["decided"]) == before["decided"]
    assert again["top_skus"]["all_time"] == snap["top_skus"]["all_time"]
    assert again["dlq_recent"] == snap["dlq_recent"]
    assert restarted.stop() == 0, restarted.log_text()[-3000:]
    assert "analytics: stopped after" in restarted.log_text()
