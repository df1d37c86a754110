"""The real ``ordermesh gateway`` process, driven through ``HttpGateway``: operations,
idempotency across lost replies and errors, runtime faults, and a ledger that outlives
a ``kill -9``."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import pytest

from ordermesh.broker.local import free_ports
from ordermesh.config import Settings
from ordermesh.errors import GatewayUnavailableError, GatewayUnknownOutcomeError
from ordermesh.gateway.client import HttpGateway, open_gateway, read_ledger_summary
from ordermesh.gateway.protocol import Outcome, operation_key
from tests.conftest import ServiceProcess, wait_for

T = TypeVar("T")
CARD = "4242424242424242"


def start(
    service_factory: Callable[..., ServiceProcess], settings: Settings, *flags: str
) -> ServiceProcess:
    proc = service_factory(["gateway", *flags], settings, "gateway")

    def up() -> bool:
        assert proc.alive(), proc.log_text()[-2000:]
        try:
            url = settings.gateway_base_url() + "/health"
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 30, "the gateway to answer /health")
    return proc


def run(settings: Settings, scenario: Callable[[HttpGateway], Awaitable[T]]) -> T:
    async def main() -> T:
        gateway = open_gateway(settings)
        assert isinstance(gateway, HttpGateway)
        try:
            return await scenario(gateway)
        finally:
            await gateway.close()

    return asyncio.run(main())


async def authorize(gw: HttpGateway, order_id: str, customer: str = "cust-1") -> Outcome:
    return await gw.authorize(
        operation_key(order_id, "authorize"),
        order_id=order_id,
        amount_cents=2050,
        currency="EUR",
        customer_id=customer,
        card=CARD,
    )


@pytest.fixture
def gateway_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", gateway_port=free_ports(1)[0], payments_timeout_s=2.0
    )


def test_the_gateway_process_keeps_money_exact_through_faults_and_a_kill(
    gateway_settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    settings = gateway_settings
    first = start(service_factory, settings)

    async def operations(gw: HttpGateway) -> dict[str, Any]:
        out: dict[str, Any] = {}
        ship = await authorize(gw, "ship")
        out["ship_again"] = (ship, await authorize(gw, "ship"))
        out["capture"] = await gw.capture(
            operation_key("ship", "capture"),
            authorization_id=ship.authorization_id,
            amount_cents=2050,
        )
        out["refund"] = await gw.refund(
            operation_key("ship", "refund"), authorization_id=ship.authorization_id, amount_cents=50
        )
        cancel = await authorize(gw, "cancel")
        out["void"] = await gw.void(
            operation_key("cancel", "void"), authorization_id=cancel.authorization_id
        )
        out["cancel_auth"] = cancel

        # a lost reply: applied, found by its key, and a retry does not charge again
        await gw.faults({"lost_response_rate": 1.0})
        with pytest.raises(GatewayUnknownOutcomeError):
            await authorize(gw, "lost")
        await gw.faults({"lost_response_rate": 0.0})
        out["lost_lookup"] = await gw.lookup(operation_key("lost", "authorize"))
        out["lost_retry"] = await authorize(gw, "lost")

        # a 503: not applied, nothing to find, the retry applies it once
        await gw.faults({"error_rate": 1.0})
        with pytest.raises(GatewayUnavailableError):
            await authorize(gw, "refused")
        await gw.faults({"error_rate": 0.0})
        out["refused_lookup"] = await gw.lookup(operation_key("refused", "authorize"))
        out["refused_summary"] = await gw.order_summary("refused")
        out["refused_retry"] = await authorize(gw, "refused")
        return out

    out = run(settings, operations)
    ship, ship_again = out["ship_again"]
    assert ship.approved and ship_again == ship
    assert out["capture"].approved and out["refund"].approved and out["void"].approved
    assert out["lost_lookup"] is not None and out["lost_lookup"].approved
    assert out["lost_retry"] == out["lost_lookup"]
    assert out["refused_lookup"] is None and out["refused_summary"] is None
    assert out["refused_retry"].approved

    before = read_ledger_summary(settings)
    assert before["lost"].authorizations == 1 and before["refused"].authorizations == 1
    assert (before["ship"].captured_cents, before["ship"].refunded_cents) == (2050, 50)
    assert before["cancel"].voided_cents == 2050

    # kill -9: every answered operation is in the ledger when the gateway comes back, and
    # it decides as before (the repeat, the refused capture of a voided authorization);
    # a fault given at start applies from the first call
    first.signal(signal.SIGKILL)
    first.wait(30)
    start(service_factory, settings, "--decline-customers", "cust-9")

    async def after_restart(gw: HttpGateway) -> dict[str, Any]:
        cancel: Outcome = out["cancel_auth"]
        return {
            "entries": [e.key async for e in gw.ledger(page_size=3)],
            "repeat": await authorize(gw, "ship"),
            "capture_voided": await gw.capture(
                operation_key("cancel", "capture"),
                authorization_id=cancel.authorization_id,
                amount_cents=1,
            ),
            "blocked": await authorize(gw, "blocked", customer="cust-9"),
            "faults": await gw.faults(),
        }

    later = run(settings, after_restart)
    assert later["entries"][:7] == [
        "ship:authorize",
        "ship:capture",
        "ship:refund",
        "cancel:authorize",
        "cancel:void",
        "lost:authorize",
        "refused:authorize",
    ]
    assert later["repeat"] == ship
    assert (later["capture_voided"].approved, later["capture_voided"].reason) == (
        False,
        "authorization_voided",
    )
    assert (later["blocked"].approved, later["blocked"].reason) == (False, "customer_blocked")
    assert later["faults"]["decline_customers"] == ["cust-9"]
    after = read_ledger_summary(settings)
    # the money is as it was; the refused capture counts as a decline of its order
    assert after["cancel"] == msgspec.structs.replace(before["cancel"], declines=1)
    assert {k: after[k] for k in before if k != "cancel"} == {
        k: v for k, v in before.items() if k != "cancel"
    }
