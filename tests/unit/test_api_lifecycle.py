"""The HTTP API over an order's whole life, without a broker: the tracker store is a real
SQLite file written by the real tracker core, Kafka the acknowledging stand-in."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ordermesh import lifecycle, schema
from ordermesh.api import app as app_module
from ordermesh.api.server import ThreadedServer
from ordermesh.api.tracking import OrderReader, reached
from ordermesh.lifecycle import STATUSES, Status
from ordermesh.stores.sqlite_tracker import SqliteOrderQueries, SqliteTrackerStore
from ordermesh.stores.tracker import OrderView
from tests.unit.test_api_access import problem, start
from tests.unit.test_api_props import AckingProducer
from tests.unit.test_tracker_lifecycle import event, path_to, placed, service_for


@dataclass
class Api:
    client: httpx.Client
    producer: AckingProducer
    tracker: SqliteTrackerStore
    server: ThreadedServer

    def drive(self, order_id: str, names: list[str], first_at: float = 200.0) -> None:
        """Record the order and these events of it, as the tracker would."""
        records = [placed(order_id)]
        records += [event(name, first_at + 100 * i, order_id) for i, name in enumerate(names)]
        service_for(self.tracker).handle(records)

    def commands_for(self, order_id: str) -> list[bytes]:
        return [value for topic, key, value in self.producer.records if key == order_id.encode()]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data = tmp_path_factory.mktemp("life")
    server, producer = start(data)
    # a client timeout far below MAX_WAIT_S: a wait that does not end when it should fails
    with (
        server,
        httpx.Client(base_url=server.url, timeout=10) as client,
        SqliteTrackerStore(data / "tracker.db") as tracker,
    ):
        yield Api(client, producer, tracker, server)


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


# --- reading a life ------------------------------------------------------------------------


def test_get_shows_the_whole_life(api: Api) -> None:
    api.drive(
        "life-1",
        [
            "OrderReserved",
            "PaymentAuthorized",
            "OrderPaid",
            "ShipmentReady",
            "OrderShipped",
            "PaymentCaptured",
        ],
    )
    order = ok(api.client.get("/orders/life-1"))
    assert (order["status"], order["terminal"], order["shipment_id"]) == (
        "SHIPPED",
        True,
        "shp-1",
    )
    assert (order["decided_at"], order["paid_at"], order["shipped_at"], order["ended_at"]) == (
        200.0,
        400.0,
        600.0,
        600.0,
    )
    assert order["payment"] == {
        "authorization_id": "auth-1",
        "authorized": 15.0,
        "captured": 15.0,
        "voided": 0.0,
        "refunded": 0.0,
        "net": 15.0,
    }
    assert [(t["source"], t["target"], t["event"]) for t in order["transitions"]] == [
        ("PLACED", "RESERVED", "OrderReserved"),
        ("RESERVED", "PAID", "OrderPaid"),
        ("PAID", "SHIPPED", "OrderShipped"),
    ]
    assert [h["event"] for h in order["history"]][-1] == "PaymentCaptured"
    listed = ok(api.client.get("/orders", params={"status": "SHIPPED"}))
    assert [o["order_id"] for o in listed["orders"]] == ["life-1"]
    assert listed["orders"][0]["payment"]["captured"] == 15.0


def test_an_unknown_status_is_refused(api: Api) -> None:
    for path in ("/orders/life-1", "/orders"):
        found = problem(api.client.get(path, params={"status": "LOST"}), 422)
        assert all(status in found["detail"] for status in STATUSES)


# --- waiting for a status --------------------------------------------------------------


@pytest.mark.parametrize("target", STATUSES)
@pytest.mark.parametrize("status", STATUSES)
def test_a_wait_ends_at_the_target_past_it_or_at_an_end(target: Status, status: Status) -> None:
    view: Any = type("View", (), {"status": status})()
    expected = (
        status == target
        or status in lifecycle.TERMINAL
        or lifecycle.RANK[status] > lifecycle.RANK[target]
    )
    assert reached(view, target) is expected
    assert reached(None, target) is False
    assert reached(view, None) is (status != "PLACED")  # no target: the decision


def test_get_waits_for_the_status_asked_for(api: Api) -> None:
    api.drive("wait-1", ["OrderReserved", "OrderPaid"])
    # already past RESERVED, and an end is as good as the target: both answer at once
    assert (
        ok(api.client.get("/orders/wait-1", params={"wait": 30, "status": "RESERVED"}))["status"]
        == "PAID"
    )
    api.drive("wait-2", ["OrderRejected"])
    assert (
        ok(api.client.get("/orders/wait-2", params={"wait": 30, "status": "SHIPPED"}))["status"]
        == "REJECTED"
    )
    # not there yet: the wait runs out and answers the order as it is
    assert (
        ok(api.client.get("/orders/wait-1", params={"wait": 0.2, "status": "SHIPPED"}))["status"]
        == "PAID"
    )


class SeenQueries(SqliteOrderQueries):
    """The API's read-only queries, remembering each status they read."""

    seen: list[str]

    def get_order(self, order_id: str, *, api_client: str | None = None) -> OrderView | None:
        view = super().get_order(order_id, api_client=api_client)
        self.seen.append(view.status if view else "-")
        return view


def test_a_waiter_for_shipped_sleeps_through_paid(tmp_path: Path) -> None:
    path = tmp_path / "tracker.db"
    writer = SqliteTrackerStore(path)
    queries = SeenQueries(path)
    queries.seen = []
    reader = OrderReader(queries, poll_interval_s=0.01)
    service = service_for(writer)

    async def until(condition: Any, what: str) -> None:
        for _ in range(2000):
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}")

    async def scenario() -> None:
        service.handle([placed("w"), event("OrderReserved", 200.0, "w")])
        waiter = asyncio.create_task(reader.wait_for("w", 30.0, "SHIPPED"))
        await until(lambda: reader.waiting == 1, "the waiter")
        service.handle([event("OrderPaid", 300.0, "w")])
        await until(lambda: "PAID" in queries.seen, "the poller to read PAID")
        assert not waiter.done()  # PAID is not SHIPPED, nor an end
        service.handle([event("ShipmentReady", 350.0, "w"), event("OrderShipped", 400.0, "w")])
        view = await asyncio.wait_for(waiter, 10.0)
        assert view is not None and view.status == "SHIPPED" and view.shipment_id == "shp-1"

    try:
        asyncio.run(scenario())
    finally:
        reader.close()
        writer.close()


# --- cancel at every stage ---------------------------------------------------------------

# status -> (HTTP status, what the answer says)
CANCEL_ANSWERS: dict[Status, tuple[int, str]] = {
    "PLACED": (409, "decision-pending"),
    "RESERVED": (202, "REQUESTED"),
    "PAID": (202, "REQUESTED"),
    "SHIPPED": (409, "ALREADY_SHIPPED"),
    "REJECTED": (409, "ORDER_REJECTED"),
    "PAYMENT_FAILED": (409, "ALREADY_ENDED"),
    "EXPIRED": (409, "ALREADY_ENDED"),
    "CANCELLED": (200, "ALREADY_CANCELLED"),
}


def test_every_status_has_a_cancel_answer() -> None:
    assert set(CANCEL_ANSWERS) == set(STATUSES)
    assert set(app_module.CANCEL_REFUSALS) | app_module.CANCELLABLE | {"PLACED", "CANCELLED"} == (
        set(STATUSES)
    )


@pytest.mark.parametrize("status", STATUSES)
def test_cancel_answers_each_stage(
    api: Api, status: Status, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "CANCEL_DECISION_WAIT_S", 0.05)
    order_id = f"cancel-{status.lower()}"
    api.drive(order_id, path_to(status))
    code, says = CANCEL_ANSWERS[status]

    response = api.client.post(f"/orders/{order_id}/cancel", json={"reason": "no longer"})

    if code >= 400:
        found = problem(response, code)
        assert says in found["type"] + found["detail"]
        assert api.commands_for(order_id) == []
        return
    assert ok(response, code) == {"order_id": order_id, "status": status, "cancel": says}
    assert response.headers["location"] == f"/orders/{order_id}"
    commands = [schema.decode_command(value) for value in api.commands_for(order_id)]
    if says == "REQUESTED":
        assert [(type(c).__name__, getattr(c, "reason", None)) for c in commands] == [
            ("CancelOrder", "no longer")
        ]
    else:
        assert commands == []  # already cancelled: nothing to send


def test_the_document_declares_the_life(api: Api) -> None:
    doc = ok(api.client.get("/openapi.json"))
    get = doc["paths"]["/orders/{order_id}"]["get"]
    (wanted,) = [p for p in get["parameters"] if p["name"] == "status"]
    assert wanted["schema"]["enum"] == list(STATUSES)
    view = doc["components"]["schemas"]["OrderView"]
    assert {"payment", "shipment_id", "transitions", "paid_at", "ended_at"} <= set(
        view["properties"]
    )
    assert set(view["properties"]["status"]["enum"]) == set(STATUSES)
    cancel = doc["paths"]["/orders/{order_id}/cancel"]["post"]["responses"]
    assert {"200", "202", "409"} <= set(cancel)
