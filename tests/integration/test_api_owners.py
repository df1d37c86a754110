"""Each API client sees only its own orders; operators see all. On the real broker, with
inventory and tracker as child processes, over each store backend.

Alice and Bob hold client keys, Ops an operator key; one order comes from a plain Kafka
producer (as the load generator's do) and belongs to no client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import httpx
import pytest

from ordermesh import schema
from ordermesh.api.idempotency import client_for_api_key
from ordermesh.config import Settings
from ordermesh.kafka.client import make_producer
from ordermesh.kafka.reader import read_topic
from ordermesh.loadgen import sku_name
from ordermesh.stores.factory import migrate, open_inventory_store, open_order_queries
from ordermesh.topics import COMMANDS, ORDERS
from tests.conftest import ServiceProcess, SettingsFactory, wait_for
from tests.integration.test_api import (
    api_server,
    assert_problem,
    body,
    generated_requests,
    stock_of,
)

pytestmark = pytest.mark.integration

KEYS = {"alice": "alice-key", "bob": "bob-key", "ops": "ops-key"}
STOCK = 1_000


@dataclass
class Owners:
    settings: Settings
    url: str
    alice: httpx.Client
    bob: httpx.Client
    ops: httpx.Client


def clients_for(url: str) -> dict[str, httpx.Client]:
    return {
        name: httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": key})
        for name, key in KEYS.items()
    }


KEYED: Final[dict[str, Any]] = {
    "api_keys": "alice-key, bob-key",
    "api_operator_keys": "ops-key",
}


@contextmanager
def owners_stack(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> Iterator[Owners]:
    """Inventory and tracker processes and the API in-process, a client for each key."""
    with open_inventory_store(settings) as store:
        store.seed({sku_name(i): STOCK for i in range(1, 6)})
    inventory = service_factory(["inventory", "run"], settings, "inventory")
    tracker = service_factory(["tracker", "run"], settings, "tracker")
    with api_server(settings) as api:
        clients = clients_for(api.url)
        try:
            yield Owners(settings, api.url, clients["alice"], clients["bob"], clients["ops"])
        finally:
            for client in clients.values():
                client.close()
    assert inventory.stop() == 0, inventory.log_text()[-3000:]
    assert tracker.stop() == 0, tracker.log_text()[-3000:]


@pytest.fixture(params=["sqlite", "postgres"])
def owners(
    request: pytest.FixtureRequest,
    settings_factory: SettingsFactory,
    service_factory: Callable[..., ServiceProcess],
) -> Iterator[Owners]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_database")
        settings = settings_factory(database_url=url, **KEYED)
        migrate(settings)
    else:
        settings = settings_factory(**KEYED)
    with owners_stack(settings, service_factory) as stack:
        yield stack


def place(
    client: httpx.Client, sku: int, quantity: int = 1, headers: dict[str, str] | None = None
) -> str:
    response = client.post("/orders", json=body((sku_name(sku), quantity, 2.0)), headers=headers)
    assert response.status_code == 202, response.text
    order_id: str = response.json()["order_id"]
    return order_id


def decided(client: httpx.Client, order_id: str) -> dict[str, Any]:
    response = client.get(f"/orders/{order_id}", params={"wait": 30})
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    assert found["status"] != "PLACED", found
    return found


def listed(client: httpx.Client, **params: Any) -> set[str]:
    """Every order id of every page the client gets."""
    seen: set[str] = set()
    query: dict[str, Any] = {"limit": 2, **params}
    while True:
        response = client.get("/orders", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        seen.update(o["order_id"] for o in page["orders"])
        if page["next_cursor"] is None:
            return seen
        query["cursor"] = page["next_cursor"]


def not_found(response: httpx.Response, order_id: str) -> dict[str, Any]:
    """A 404 problem, with the order id taken out (it names the id the caller asked for)."""
    problem = assert_problem(response, 404)
    return {**problem, "detail": problem["detail"].replace(order_id, "ID")}


def produce_foreign_order(settings: Settings, order_id: str) -> None:
    """An order from another producer than the API, as the load generator's."""
    order = schema.OrderPlaced(
        order_id=order_id,
        customer_id="load-1",
        items=(schema.OrderItem(sku_name(4), 1, 2.0),),
        currency="USD",
        total=2.0,
        created_at=time.time(),
    )
    producer = make_producer(settings)
    producer.produce(settings.topic(ORDERS), schema.encode(order), order_id.encode())
    assert producer.flush(30) == 0


def commands_for(settings: Settings, order_id: str) -> int:
    records = read_topic(settings, settings.topic(COMMANDS))
    return sum(1 for r in records if r.key == order_id.encode())


def test_each_client_gets_lists_and_cancels_only_its_own_orders(owners: Owners) -> None:
    alice, bob, ops, settings = owners.alice, owners.bob, owners.ops, owners.settings

    # --- POST: the order carries its client's opaque id, never the key ------------------
    a1 = place(alice, 1, 3)
    a2 = place(alice, 2)
    b1 = place(bob, 3)
    o1 = place(ops, 2)
    assert_problem(
        alice.post("/orders", json={**body((sku_name(1), 1, 2.0)), "api_client": "key-x"}),
        422,
    )
    load = "ord-load-0001"
    produce_foreign_order(settings, load)
    records = {r.key: r.value for r in read_topic(settings, settings.topic(ORDERS))}
    for order_id, key in ((a1, "alice-key"), (b1, "bob-key"), (o1, "ops-key")):
        raw = records[order_id.encode()]
        assert raw is not None and key.encode() not in raw
        assert schema.decode_order(raw).owner() == client_for_api_key(key.encode())
    assert schema.decode_order(records[load.encode()]).owner() is None
    # the same Idempotency-Key of two clients: two orders, each its owner's
    keyed = {"Idempotency-Key": "checkout-1"}
    ka, kb = place(alice, 1, headers=keyed), place(bob, 1, headers=keyed)
    assert ka != kb

    # --- GET /orders/{id}: another client's order is an unknown order -------------------
    for order_id in (a1, a2, ka):
        assert decided(alice, order_id)["status"] == "RESERVED"
    for order_id in (b1, kb):
        decided(bob, order_id)
    for order_id in (a1, b1, o1, load, ka, kb):
        decided(ops, order_id)  # the operator sees every order, the load generator's too
    unknown = "ord-" + "0" * 32
    assert not_found(bob.get(f"/orders/{a1}"), a1) == not_found(
        bob.get(f"/orders/{unknown}"), unknown
    )
    assert_problem(alice.get(f"/orders/{b1}"), 404)
    assert_problem(alice.get(f"/orders/{load}"), 404)
    # ?wait= on another client's (decided) order waits as long as on an unknown one
    for order_id in (a1, unknown):
        started = time.monotonic()
        response = bob.get(f"/orders/{order_id}", params={"wait": 1, "status": "RESERVED"})
        assert time.monotonic() - started >= 0.9, order_id
        assert_problem(response, 404)

    # --- GET /orders: one's own orders, every order for the operator -------------------
    assert listed(alice) == {a1, a2, ka}
    assert listed(bob) == {b1, kb}
    assert listed(ops) >= {a1, a2, b1, o1, load, ka, kb}
    assert listed(bob, status="RESERVED") == {b1, kb}
    assert listed(bob, customer_id="cust-1") == {b1, kb}
    assert listed(alice, customer_id="load-1") == set()
    assert listed(ops, customer_id="load-1") == {load}

    # --- cancel: another client's order is unknown, nothing is sent ---------------------
    before = stock_of(settings, sku_name(1))
    assert not_found(bob.post(f"/orders/{a1}/cancel"), a1) == not_found(
        bob.post(f"/orders/{unknown}/cancel"), unknown
    )
    assert_problem(bob.post(f"/orders/{load}/cancel"), 404)
    assert commands_for(settings, a1) == 0 and commands_for(settings, load) == 0
    assert decided(alice, a1)["status"] == "RESERVED"
    assert stock_of(settings, sku_name(1)) == before
    # its owner cancels it; the operator cancels anybody's
    accepted = alice.post(f"/orders/{a1}/cancel", json={"reason": "mine"})
    assert accepted.status_code == 202, accepted.text
    accepted = ops.post(f"/orders/{b1}/cancel")
    assert accepted.status_code == 202, accepted.text
    for client, order_id in ((alice, a1), (bob, b1)):
        wait_for(
            lambda c=client, o=order_id: c.get(f"/orders/{o}").json()["status"] == "CANCELLED",
            30,
            f"{order_id} CANCELLED",
        )
    # the stock of alice's order is released once, by her cancel
    wait_for(
        lambda: stock_of(settings, sku_name(1)).reserved == before.reserved - 3,
        30,
        "alice's stock released",
    )

    # --- the owner lives in the tracker's store: another API replica agrees ------------
    with api_server(settings) as replica:
        clients = clients_for(replica.url)
        try:
            assert_problem(clients["bob"].get(f"/orders/{a1}"), 404)
            assert clients["alice"].get(f"/orders/{a1}").json()["status"] == "CANCELLED"
            assert listed(clients["alice"]) == {a1, a2, ka}
            assert load in listed(clients["ops"])
        finally:
            for client in clients.values():
                client.close()
    # and the store says who owns what without any API around
    queries = open_order_queries(settings)
    try:
        assert queries.get_order(a1, api_client=client_for_api_key(b"alice-key")) is not None
        assert queries.get_order(a1, api_client=client_for_api_key(b"bob-key")) is None
    finally:
        queries.close()


def test_generated_requests_of_two_clients_never_see_each_others_orders(
    settings_factory: SettingsFactory, service_factory: Callable[..., ServiceProcess]
) -> None:
    """schemathesis with alice's and bob's keys in turn: no server error, every answer as
    documented, and afterwards each one's orders are still its own."""
    with owners_stack(settings_factory(**KEYED), service_factory) as stack:
        mine = {"alice": place(stack.alice, 1), "bob": place(stack.bob, 2)}
        for client, order_id in ((stack.alice, mine["alice"]), (stack.bob, mine["bob"])):
            decided(client, order_id)
        turns = [{"X-API-Key": KEYS["alice"]}, {"Authorization": f"Bearer {KEYS['bob']}"}]

        def headers(n: int) -> dict[str, str]:
            return turns[n % 2]

        calls = generated_requests(stack.url, 10, headers)
        assert sum(calls.values()) >= 50, calls
        alices, bobs = listed(stack.alice), listed(stack.bob)
        assert mine["alice"] in alices and mine["bob"] in bobs
        assert not alices & bobs
        assert alices | bobs <= listed(stack.ops)
        for order_id in alices:
            assert_problem(stack.bob.get(f"/orders/{order_id}"), 404)
