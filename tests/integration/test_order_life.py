"""The whole life of an order on the real broker, with every service of the mesh as a
process: reserve, pay, ship, and each way an order ends otherwise (rejected, declined,
expired, cancelled before and after payment, a payment that lands after its deadline),
checked by ``verify`` against the topics, the stores and the gateway's ledger."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ordermesh import schema
from ordermesh.config import Settings
from ordermesh.gateway.client import HttpGateway, read_ledger_summary
from ordermesh.kafka.producer import deliver
from ordermesh.loadgen import DECLINING_CARDS, OrderGenerator
from ordermesh.mesh import Mesh, MeshPlan, fetch_json
from ordermesh.records import OutRecord
from ordermesh.stores.factory import open_order_queries
from ordermesh.topics import COMMANDS, ORDERS
from ordermesh.verify import verify
from tests.conftest import SettingsFactory, wait_for

# long enough that a busy machine pays in time, short enough to wait for
TTL_S = 6.0
SKUS = 40


@pytest.fixture
def mesh(settings_factory: SettingsFactory) -> Iterator[Mesh]:
    settings = settings_factory(
        reservation_ttl_s=TTL_S,
        sweep_every_s=0.3,
        # long enough to cancel a paid order before it ships
        fulfilment_delay_s=4.0,
        payments_timeout_s=1.0,
        gateway_port=0,
        reorder_point=0,
    )
    mesh = Mesh(
        settings,
        MeshPlan(skus=SKUS, stock=10_000, api_port=0, analytics_port=0, gateway_faults=()),
    )
    try:
        mesh.start()
        wait_for(
            lambda: fetch_json(mesh.settings.gateway_base_url() + "/health") is not None,
            60,
            "the gateway to answer",
        )
        yield mesh
    finally:
        mesh.stop(stop_broker=False)


def set_faults(settings: Settings, **changes: Any) -> None:
    async def change() -> None:
        gateway = HttpGateway(settings.gateway_base_url())
        try:
            await gateway.faults(changes)
        finally:
            await gateway.close()

    asyncio.run(change())


def place(settings: Settings, orders: list[schema.OrderPlaced]) -> None:
    topic = settings.topic(ORDERS)
    records = [OutRecord(topic, o.order_id.encode(), schema.encode(o)) for o in orders]
    assert all(r is None or r.error is None for r in deliver(settings, records))


def cancel(settings: Settings, order_ids: list[str]) -> None:
    topic = settings.topic(COMMANDS)
    records = [
        OutRecord(
            topic,
            oid.encode(),
            schema.encode(schema.CancelOrder(oid, requested_at=schema.now(), reason="test")),
        )
        for oid in order_ids
    ]
    assert all(r is None or r.error is None for r in deliver(settings, records))


def statuses(settings: Settings, order_ids: list[str]) -> dict[str, str]:
    with open_order_queries(settings) as store:
        found = dict(store.statuses())
    return {oid: found.get(oid, "MISSING") for oid in order_ids}


def wait_statuses(
    settings: Settings, order_ids: list[str], wanted: set[str], timeout: float
) -> dict[str, str]:
    """Poll the tracker until every order is in one of ``wanted``; fail naming where
    they are."""
    end = time.monotonic() + timeout
    while True:
        seen = statuses(settings, order_ids)
        if all(seen[oid] in wanted for oid in order_ids):
            return seen
        if time.monotonic() > end:
            pytest.fail(f"after {timeout:.0f}s, orders not in {sorted(wanted)}: {seen}")
        time.sleep(0.25)


def generate(seed: int, count: int, **ratios: float) -> list[schema.OrderPlaced]:
    generator = OrderGenerator(seed, skus=SKUS, **ratios)
    return [generator.next_order() for _ in range(count)]


def test_every_life_ends_in_one_status_with_its_money_and_stock_accounted(mesh: Mesh) -> None:
    settings = mesh.settings
    ended = {"SHIPPED", "REJECTED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED"}

    # the main path, with declining cards among them
    normal = generate(11, 120, decline_ratio=0.15)
    place(settings, normal)
    declined = {o.order_id for o in normal if o.card in DECLINING_CARDS}
    assert declined
    # an order asking for more than there is is rejected
    greedy = generate(12, 1)[0]
    greedy = schema.OrderPlaced(
        greedy.order_id,
        greedy.customer_id,
        (schema.OrderItem(greedy.items[0].sku, 10_000, 1.0),),
        "USD",
        10_000.0,
        greedy.created_at,
    )
    place(settings, [greedy])
    normal_ids = [o.order_id for o in normal]
    seen = wait_statuses(settings, [*normal_ids, greedy.order_id], ended, 120)
    assert seen[greedy.order_id] == "REJECTED"
    assert {seen[oid] for oid in declined} == {"PAYMENT_FAILED"}
    assert {seen[oid] for oid in set(normal_ids) - declined} == {"SHIPPED"}

    # a cancel after payment, before shipment: stock released, authorization voided
    paid = generate(15, 2)
    paid_ids = [o.order_id for o in paid]
    for order in paid:
        place(settings, [order])
        wait_statuses(settings, [order.order_id], {"PAID"}, 60)
        cancel(settings, [order.order_id])
    assert set(wait_statuses(settings, paid_ids, ended, 60).values()) == {"CANCELLED"}

    # a cancel while the payment cannot go through (RESERVED), and one after shipment
    # (refused: the order stays SHIPPED)
    set_faults(settings, timeout_rate=1.0)
    stuck = generate(13, 3)
    place(settings, stuck)
    wait_statuses(settings, [o.order_id for o in stuck], {"RESERVED"}, 60)
    cancel(settings, [stuck[0].order_id, normal_ids[0]])
    late = wait_statuses(settings, [stuck[0].order_id], {"CANCELLED"}, 60)
    assert late[stuck[0].order_id] == "CANCELLED"

    # the rest of the stuck ones: no payment before the deadline, so they expire
    expired = wait_statuses(settings, [o.order_id for o in stuck[1:]], {"EXPIRED"}, 60)
    assert set(expired.values()) == {"EXPIRED"}

    # a payment that lands after its deadline (the gateway takes longer than the TTL):
    # the order stays EXPIRED and the authorization is voided
    set_faults(settings, timeout_rate=0.0, latency_p50_ms=TTL_S * 1500, latency_p99_ms=TTL_S * 2000)
    slow = generate(14, 4)
    place(settings, slow)
    slow_ids = [o.order_id for o in slow]
    assert set(wait_statuses(settings, slow_ids, {"EXPIRED"}, 60).values()) == {"EXPIRED"}
    set_faults(settings, latency_p50_ms=0.0, latency_p99_ms=0.0)

    def voided() -> bool:
        ledger = read_ledger_summary(settings)
        return all(
            (s := ledger.get(oid)) is not None and s.authorizations == s.voids == 1
            for oid in slow_ids
        )

    wait_for(voided, 60, "the late authorizations voided")

    everyone = [
        *normal_ids,
        greedy.order_id,
        *paid_ids,
        *(o.order_id for o in stuck),
        *slow_ids,
    ]
    final = wait_statuses(settings, everyone, ended, 60)
    assert final[normal_ids[0]] == "SHIPPED"  # its cancel came after shipment: refused
    assert {"SHIPPED", "REJECTED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED"} == set(final.values())

    assert mesh.wait_drained(120)
    # payments' and fulfilment's own work (retries, the voids above) past their offsets
    wait_for(lambda: verify(settings).pending == 0, 90, "verify with nothing pending")
    report = verify(settings)
    assert report.ok, report.violations
    assert report.pending == 0, report.pending_counts
    life = report.lifecycle
    assert life["money_checked"] is True
    assert life["captured_cents"] - life["refunded_cents"] == life["shipped_value_cents"] > 0
    counts = life["statuses"]
    assert isinstance(counts, dict)
    assert counts["SHIPPED"] == len(normal_ids) - len(declined)
    assert counts["PAYMENT_FAILED"] == len(declined)
    assert counts["EXPIRED"] == 2 + len(slow_ids)
    assert counts["CANCELLED"] == 1 + len(paid_ids)
    assert counts["REJECTED"] == 1
