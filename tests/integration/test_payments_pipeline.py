"""Payments on the real broker against the real ``ordermesh gateway`` process: events in,
payment facts out, the gateway's ledger as the ground truth for money."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from ordermesh import schema
from ordermesh.broker.local import free_ports
from ordermesh.config import Settings
from ordermesh.gateway.client import HttpGateway, read_ledger_summary
from ordermesh.kafka.producer import deliver
from ordermesh.kafka.reader import read_topic
from ordermesh.records import OutRecord
from ordermesh.schema import (
    ItemQty,
    OrderCancelled,
    OrderReserved,
    OrderShipped,
    ReservationExpired,
)
from ordermesh.topics import EVENTS
from tests.conftest import ServiceProcess, SettingsFactory, wait_for

FACTS = (
    "PaymentAuthorized",
    "PaymentDeclined",
    "PaymentCaptured",
    "PaymentVoided",
    "PaymentRefunded",
)


def produce(settings: Settings, *events: msgspec.Struct) -> None:
    topic = settings.topic(EVENTS)
    records = [OutRecord(topic, e.order_id.encode(), schema.encode(e)) for e in events]  # type: ignore[attr-defined]
    assert all(r is not None and r.error is None for r in deliver(settings, records))


def reserved(order_id: str, total: float = 20.5, card: str = "4242424242424242") -> OrderReserved:
    now = schema.now()
    return OrderReserved(
        order_id, (ItemQty("SKU-1", 1),), total, "EUR", now, now, now + 600, "cust-1", card
    )


def facts(settings: Settings) -> dict[str, list[Any]]:
    """order_id -> the payment facts on the topic, in order."""
    found: dict[str, list[Any]] = {}
    for record in read_topic(settings, settings.topic(EVENTS)):
        event = schema.decode_event(record.value)
        if type(event).__name__ in FACTS:
            found.setdefault(event.order_id, []).append(event)
    return found


def kinds(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


def start_gateway(
    settings_factory: SettingsFactory,
    service_factory: Callable[..., ServiceProcess],
    **overrides: Any,
) -> tuple[Settings, ServiceProcess]:
    port = free_ports(1)[0]
    settings = settings_factory(gateway_port=port, payments_timeout_s=1.0, **overrides)
    gateway = service_factory(["gateway"], settings, "gateway")

    def up() -> bool:
        try:
            return (
                httpx.get(f"{settings.gateway_base_url()}/health", timeout=1.0).status_code == 200
            )
        except httpx.HTTPError:
            return False

    wait_for(up, 30, "the gateway to answer /health")
    return settings, gateway


def set_faults(settings: Settings, **changes: Any) -> None:
    async def change() -> None:
        gateway = HttpGateway(settings.gateway_base_url())
        try:
            await gateway.faults(changes)
        finally:
            await gateway.close()

    asyncio.run(change())


def test_authorize_capture_void_refund_against_the_gateway(
    settings_factory: SettingsFactory, service_factory: Callable[..., ServiceProcess]
) -> None:
    settings, _gateway = start_gateway(settings_factory, service_factory)
    payments = service_factory(["payments", "run"], settings, "payments")
    produce(
        settings,
        reserved("ship"),
        reserved("cancel"),
        reserved("expire"),
        reserved("declined", card="4000000000000002"),
    )
    wait_for(lambda: len(facts(settings)) == 4, 60, "an authorization decision per order")
    produce(
        settings,
        OrderShipped("ship", "shp-ship", schema.now()),
        OrderCancelled("cancel", schema.now(), stage="PAID"),
        ReservationExpired("expire", 0.0, schema.now()),
        OrderCancelled("declined", schema.now(), stage="RESERVED"),
    )

    def settled() -> dict[str, list[Any]] | None:
        found = facts(settings)
        done = sum(len(v) for v in found.values()) == 7
        return found if done else None

    found = wait_for(settled, 60, "capture, void and void of the three orders")
    assert payments.stop() == 0, payments.log_text()[-3000:]
    assert kinds(found["ship"]) == ["PaymentAuthorized", "PaymentCaptured"]
    assert kinds(found["cancel"]) == ["PaymentAuthorized", "PaymentVoided"]
    assert kinds(found["expire"]) == ["PaymentAuthorized", "PaymentVoided"]
    assert kinds(found["declined"]) == ["PaymentDeclined"]
    assert found["cancel"][1].cause == "CANCELLED" and found["expire"][1].cause == "EXPIRED"
    assert found["ship"][1].amount == 20.5
    ledger = read_ledger_summary(settings)
    assert ledger["ship"].authorizations == 1 and ledger["ship"].captured_cents == 2050
    assert ledger["cancel"].voids == 1 and ledger["cancel"].captures == 0
    assert ledger["expire"].voids == 1
    assert ledger["declined"].authorizations == 0 and ledger["declined"].declines == 1


def test_kill_mid_stream_with_a_slow_gateway_authorizes_each_order_once(
    settings_factory: SettingsFactory, service_factory: Callable[..., ServiceProcess]
) -> None:
    # small batches, few in flight: the kill finds batches out and orders not yet sent
    settings, _gateway = start_gateway(
        settings_factory, service_factory, gateway_batch_max=10, payments_concurrency=40
    )
    # slow, with lost replies and hung calls: every unknown-outcome path runs
    set_faults(
        settings,
        latency_p50_ms=150.0,
        latency_p99_ms=400.0,
        lost_response_rate=0.05,
        timeout_rate=0.02,
        hang_s=3.0,
    )
    orders = [f"o{i:04d}" for i in range(400)]
    first = service_factory(["payments", "run"], settings, "payments-a")
    produce(settings, *(reserved(o) for o in orders))
    wait_for(lambda: len(facts(settings)) >= 40, 90, "payments to be mid-stream")
    first.signal(signal.SIGKILL)
    first.wait(30)
    assert len(facts(settings)) < len(orders)  # killed with authorizations outstanding
    set_faults(settings, latency_p50_ms=5.0, latency_p99_ms=20.0)
    second = service_factory(["payments", "run"], settings, "payments-b")
    wait_for(lambda: len(facts(settings)) == len(orders), 180, "every order to be authorized")
    assert second.stop() == 0, second.log_text()[-3000:]
    ledger = read_ledger_summary(settings)
    assert sorted(ledger) == orders
    assert all(ledger[o].authorizations == 1 for o in orders)
    assert all(ledger[o].captures == ledger[o].voids == 0 for o in orders)
    found = facts(settings)
    # at-least-once: a fact may be produced twice after the kill, never two decisions
    for order_id, events in found.items():
        ids = {e.authorization_id for e in events}
        assert kinds(events)[0] == "PaymentAuthorized" and len(ids) == 1, (order_id, events)
