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
from ordermesh.records import InRecord, dead_letter
from ordermesh.services.analytics import REJECT_REASONS
from ordermesh.stores.factory import open_inventory_store
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS, topic_specs
from ordermesh.topology import service
from ordermesh.verify import VerifyReport, verify
from tests.conftest import ServiceProcess, wait_for
from tests.unit.test_analytics import Feed, every_branch


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
    service_factory: Callable[..., ServiceProcess],
    settings: Settings,
    port: int,
    name: str,
    *args: str,
) -> ServiceProcess:
    proc = service_factory(["analytics", "run", "--port", str(port), *args], settings, name)
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


def partitions_of(name: str) -> int:
    """How many partitions the topics of service ``name`` have, at the default count."""
    sizes = {spec.name: spec.partitions for spec in topic_specs()}
    return sum(sizes[topic] for topic in service(name).consumes)


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

    # /groups: the inventory member owns every partition of its topics; analytics reads
    # all of its own without joining, and its commits show it caught up
    def groups_ready() -> dict[str, Any] | None:
        doc = get_json(port, "/groups")
        if doc is None or not doc["groups"]:
            return None
        g = doc["groups"]
        ok = (
            g["inventory"]["member_count"] == 1
            and len(g["inventory"]["members"][0]["partitions"]) == partitions_of("inventory")
            and g["inventory"]["total_lag"] == 0
            and len(g["analytics"]["partitions"]) == partitions_of("analytics")
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


# --- the order's life, produced by the test ---------------------------------------------
# Payments and fulfilment are separate services; these tests write the saga's events
# themselves (every branch of lifecycle.py, as the services emit them) to the test's own
# topics, so what analytics must show is known exactly.

SAGA_COPIES = 20  # x 13 orders, one down each branch (every_branch)


def produce_saga(settings: Settings, copies: int = SAGA_COPIES, malformed: int = 3) -> None:
    """``copies`` x every branch of an order's life, plus ``malformed`` bad orders and
    their DLQ entries, as the inventory dead-letters them; the events sit 5 s back."""
    feed = Feed()
    t = time.time() - 5
    lives = []
    for n in range(copies):
        lives += every_branch(feed, t, prefix=f"saga-{n:03d}-")
    topics = {ORDERS: settings.topic(ORDERS), EVENTS: settings.topic(EVENTS)}
    producer = make_producer(settings)
    for life in lives:
        # keyed by order_id, as every service writes them: one order's events stay in
        # one partition, in order
        for rec in life.records:
            producer.produce(topics[rec.topic], rec.value, life.order_id.encode())
    for _ in range(malformed):
        bad = feed.malformed(t)
        producer.produce(topics[ORDERS], bad.value, bad.key)
        dl = dead_letter(
            bad,
            dlq_topic=settings.topic(DLQ),
            service="inventory",
            stage="decode",
            error_class="DecodeError.json",
            message="bad order: not valid JSON",
        )
        producer.produce(dl.topic, dl.value, dl.key, headers=dl.headers)
    assert producer.flush(30) == 0


def produce_dead_letters(settings: Settings, n: int) -> None:
    """``n`` DLQ entries of unknown cancels (as the inventory dead-letters them)."""
    producer = make_producer(settings)
    for i in range(n):
        command = schema.CancelOrder(order_id=f"nope-{i}", requested_at=time.time())
        source = InRecord(
            settings.topic(COMMANDS), 0, i, command.order_id.encode(), schema.encode(command), [], 0
        )
        dl = dead_letter(
            source,
            dlq_topic=settings.topic(DLQ),
            service="inventory",
            stage="handle",
            error_class="CancelRejected",
            message="unknown order",
        )
        producer.produce(dl.topic, dl.value, dl.key, headers=dl.headers)
    assert producer.flush(30) == 0


def expected_life(copies: int = SAGA_COPIES) -> dict[str, Any]:
    """What /lifecycle's ``all`` must hold for ``copies`` x every_branch (see the unit
    test of every branch for where each number comes from)."""
    k = copies
    return {
        "funnel": {"PLACED": 13 * k, "RESERVED": 10 * k, "PAID": 4 * k, "SHIPPED": 2 * k},
        "ends": {
            "REJECTED": {
                "total": 2 * k,
                "causes": {"OUT_OF_STOCK": k, "UNKNOWN_SKU": k, "INVALID_ORDER": 0},
            },
            "PAYMENT_FAILED": {
                "total": 2 * k,
                "causes": {"card_declined": k, "insufficient_funds": k},
            },
            "EXPIRED": {"total": 2 * k, "causes": {}},
            "CANCELLED": {"total": 3 * k, "causes": {"RESERVED": k, "PAID": 2 * k}},
        },
        "authorizations": 5 * k,
        "declines": 2 * k,
        "money": {
            "authorized": {"USD": round(62.0 * k, 2)},
            "captured": {"USD": round(41.0 * k, 2)},
            "voided": {"USD": round(21.0 * k, 2)},
            "refunded": {"USD": round(10.5 * k, 2)},
            "net_captured": {"USD": round(30.5 * k, 2)},
        },
    }


def life_matches(port: int, path: str, expected: dict[str, Any]) -> dict[str, Any] | None:
    doc = get_json(port, path)
    if doc is None:
        return None
    every = doc["lifecycle"]["all"]
    return doc if all(every[k] == v for k, v in expected.items()) else None


def test_lifecycle_of_a_saga_on_the_broker_survives_kill_and_scrapes(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    port = free_port()
    analytics = start_analytics(
        service_factory, settings, port, "analytics", "--dlq-alert-ratio", "0.02"
    )
    produce_saga(settings)
    expected = expected_life()
    view = wait_for(lambda: life_matches(port, "/lifecycle", expected), 60, "the funnel")
    life = view["lifecycle"]
    every = life["all"]
    k = SAGA_COPIES
    assert every["conversion"] == {
        "RESERVED": round(10 / 13, 4),
        "PAID": round(4 / 10, 4),
        "SHIPPED": round(2 / 4, 4),
    }
    assert every["decline_rate"] == round(2 / 7, 4) and every["expiry_rate"] == 0.2
    # created -> shipped: half the shipped orders took 1.3 s, half 2.5 s
    ship = every["time_to_ship_ms"]
    assert ship["count"] == 2 * k
    assert abs(ship["p50"] - 1300) <= 13 and abs(ship["max"] - 2500) <= 1
    assert every["time_to_pay_ms"]["count"] == 4 * k
    assert life["by_status"] == {
        "PLACED": k,
        "RESERVED": k,
        "PAID": 0,
        "SHIPPED": 2 * k,
        "REJECTED": 2 * k,
        "PAYMENT_FAILED": 2 * k,
        "EXPIRED": 2 * k,
        "CANCELLED": 3 * k,
    }
    assert life["stale_events"] == 0
    # the snapshot carries the same, and the old totals keep counting alongside
    snap = get_json(port, "/snapshot")
    assert snap["lifecycle"]["all"] == every
    assert snap["totals"]["reserved"] == 10 * k and snap["totals"]["cancelled"] == 3 * k
    assert snap["totals"]["duplicate_outcomes"] == 0
    # the alert threshold is the flag's: 3 dead letters of 263 orders records is 1.1 %
    alert = snap["dlq_alert"]
    assert alert["threshold"] == 0.02 and alert["window_s"] == 60

    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    samples = metric_samples(response.text)

    def one(name: str, **labels: str) -> float:
        values = [v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items())]
        assert len(values) == 1, (name, labels, samples.get(name))
        return values[0]

    for status, n in expected["funnel"].items():
        assert one("ordermesh_analytics_funnel_orders_total", status=status) == n
    assert one("ordermesh_analytics_order_ends_total", status="CANCELLED", cause="PAID") == 2 * k
    assert one("ordermesh_analytics_order_ends_total", status="EXPIRED", cause="") == 2 * k
    for kind, amounts in expected["money"].items():
        if kind != "net_captured":  # a difference, not a counter: not exported
            total = one("ordermesh_analytics_money_total", kind=kind, currency="USD")
            assert total == amounts["USD"]
    assert one("ordermesh_analytics_orders_by_status", status="SHIPPED") == 2 * k

    # kill -9 and restart: the order's life is rebuilt from the topics, identical
    analytics.signal(signal.SIGKILL)
    analytics.wait(30)
    port2 = free_port()
    restarted = start_analytics(service_factory, settings, port2, "analytics-2")
    again = wait_for(lambda: life_matches(port2, "/lifecycle", expected), 60, "the restart")
    assert again["lifecycle"]["all"] == every
    assert again["lifecycle"]["by_status"] == life["by_status"]
    assert again["dlq_alert"]["threshold"] == 0.05  # the default, without the flag
    assert restarted.stop() == 0, restarted.log_text()[-3000:]
    log = restarted.log_text()
    assert f"placed {13 * k} reserved {10 * k} paid {4 * k} shipped {2 * k}" in log
