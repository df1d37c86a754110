"""The orders HTTP API on the real broker, with inventory and tracker as child processes.

The API runs in-process under uvicorn on a free loopback port, so acknowledgements,
long polls and the tracker DB are all real.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from ordermesh.api import create_app
from ordermesh.api.idempotency import order_id_for_key
from ordermesh.api.server import ThreadedServer
from ordermesh.config import Settings
from ordermesh.kafka.reader import read_topic
from ordermesh.loadgen import sku_name
from ordermesh.stores.factory import open_inventory_store, open_tracker_store
from ordermesh.stores.inventory import StockRow
from ordermesh.topics import COMMANDS, ORDERS
from tests.conftest import ServiceProcess, SettingsFactory, wait_for

PROBLEM = "application/problem+json"
SKUS = 20
STOCK = 1_000


def api_server(settings: Settings) -> ThreadedServer:
    return ThreadedServer(create_app(settings))


@dataclass
class Stack:
    settings: Settings
    api: ThreadedServer
    client: httpx.Client
    inventory: ServiceProcess
    tracker: ServiceProcess


def body(*items: tuple[str, int, float], customer: str = "cust-1") -> dict[str, Any]:
    cents = sum(round(price * 100) * qty for _sku, qty, price in items)
    return {
        "customer_id": customer,
        "items": [{"sku": s, "quantity": q, "unit_price": p} for s, q, p in items],
        "currency": "USD",
        "total": cents / 100,
    }


def stock_of(settings: Settings, sku: str) -> StockRow:
    with open_inventory_store(settings) as store:
        (row,) = store.stock(sku)
    return row


def place(client: httpx.Client, payload: dict[str, Any], **headers: str) -> str:
    response = client.post("/orders", json=payload, headers=headers)
    assert response.status_code == 202, response.text
    order_id: str = response.json()["order_id"]
    assert response.headers["location"] == f"/orders/{order_id}"
    return order_id


def wait_status(client: httpx.Client, order_id: str, status: str, deadline_s: float = 30) -> Any:
    def check() -> Any:
        response = client.get(f"/orders/{order_id}")
        return (
            response.json()
            if response.status_code == 200 and (response.json()["status"] == status)
            else None
        )

    return wait_for(check, deadline_s, f"order {order_id} to be {status}", interval=0.05)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = response.json()
    assert set(problem) == {"type", "title", "status", "detail"}
    assert problem["status"] == status
    assert problem["type"].startswith("urn:ordermesh:problem:")
    return problem


@pytest.fixture
def stack(
    settings_factory: SettingsFactory, service_factory: Callable[..., ServiceProcess]
) -> Iterator[Stack]:
    settings = settings_factory()
    with open_inventory_store(settings) as store:
        store.seed({sku_name(i): STOCK for i in range(1, SKUS + 1)})
    inventory = service_factory(["inventory", "run"], settings, "inventory")
    tracker = service_factory(["tracker", "run"], settings, "tracker")
    with api_server(settings) as api, httpx.Client(base_url=api.url, timeout=60) as client:
        # a first order through the whole pipeline: both consumer groups have joined
        warm = place(client, body((sku_name(SKUS), 1, 1.0)))
        got = client.get(f"/orders/{warm}", params={"wait": 30})
        assert got.status_code == 200 and got.json()["status"] == "RESERVED", (
            got.text,
            inventory.log_text()[-2000:],
            tracker.log_text()[-2000:],
        )
        yield Stack(settings, api, client, inventory, tracker)
    assert inventory.stop() == 0, inventory.log_text()[-3000:]
    assert tracker.stop() == 0, tracker.log_text()[-3000:]


def test_post_reaches_reserved_and_long_poll_returns_at_once(stack: Stack) -> None:
    client = stack.client
    before = stock_of(stack.settings, sku_name(1))
    order_id = place(client, body((sku_name(1), 2, 12.5), (sku_name(2), 1, 3.99)))

    start = time.monotonic()
    response = client.get(f"/orders/{order_id}", params={"wait": 10})
    took = time.monotonic() - start
    assert response.status_code == 200, response.text
    order = response.json()
    assert order["status"] == "RESERVED"
    # the long poll answered as soon as the decision was visible, not at the 10 s mark
    assert took < 5, took
    assert order["order_id"] == order_id
    assert order["total"] == 28.99 and order["currency"] == "USD"
    assert order["items"] == [
        {"sku": sku_name(1), "quantity": 2, "unit_price": 12.5},
        {"sku": sku_name(2), "quantity": 1, "unit_price": 3.99},
    ]
    assert order["reason"] is None
    events = [(h["event"], h["status"]) for h in order["history"]]
    assert events == [("OrderPlaced", "PLACED"), ("OrderReserved", "RESERVED")]
    assert all(h["at"] >= order["created_at"] - 1 for h in order["history"])
    after = stock_of(stack.settings, sku_name(1))
    assert (after.available, after.reserved) == (before.available - 2, before.reserved + 2)

    # an order the inventory rejects: the decision carries its reason
    rejected = place(client, body(("SKU-NOPE", 1, 1.0)))
    response = client.get(f"/orders/{rejected}", params={"wait": 10})
    assert response.json()["status"] == "REJECTED"
    assert response.json()["reason"] == "UNKNOWN_SKU"

    # the list, filtered and paginated (keyset: next_cursor + Link header)
    listed = client.get("/orders", params={"status": "RESERVED", "limit": 1})
    assert listed.status_code == 200
    page = listed.json()
    assert len(page["orders"]) == 1 and page["next_cursor"] is not None
    assert 'rel="next"' in listed.headers["link"]
    seen = [o["order_id"] for o in page["orders"]]
    while page["next_cursor"] is not None:
        page = client.get(
            "/orders", params={"status": "RESERVED", "limit": 1, "cursor": page["next_cursor"]}
        ).json()
        seen += [o["order_id"] for o in page["orders"]]
    assert order_id in seen and rejected not in seen
    assert seen == sorted(seen)
    by_customer = client.get("/orders", params={"customer_id": "cust-1"}).json()
    assert {order_id, rejected} <= {o["order_id"] for o in by_customer["orders"]}

    # metrics count what happened; health sees Kafka, the tracker DB and the lag
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "ordermesh_api_orders_accepted_total 3.0" in metrics.text
    assert 'ordermesh_api_requests_total{method="POST",route="/orders",status="202"} 3.0' in (
        metrics.text
    )
    assert "ordermesh_api_request_duration_seconds_bucket" in metrics.text
    # lag is computed in the background and cached: it shows up within moments
    wait_for(
        lambda: 'ordermesh_consumer_lag{group="inventory"' in client.get("/metrics").text,
        10,
        "the consumer lag gauge",
    )
    health = client.get("/health")
    assert health.status_code == 200, health.text
    report = health.json()
    assert report["status"] == "ok"
    assert report["checks"]["kafka"]["ok"] and report["checks"]["tracker_db"]["ok"]
    # every consumer group of the topology; these two are running here
    assert {"inventory", "tracker"} <= set(report["consumer_lag"]["groups"])


def test_get_wait_bridges_the_gap_until_the_tracker_sees_the_order(stack: Stack) -> None:
    # the tracker is paused: an accepted order is unknown to it, so 404 without ?wait
    stack.tracker.signal(19)  # SIGSTOP
    try:
        order_id = place(stack.client, body((sku_name(3), 1, 2.0)))
        assert_problem(stack.client.get(f"/orders/{order_id}"), 404)
        result: dict[str, Any] = {}

        def long_poll() -> None:
            result["response"] = stack.client.get(f"/orders/{order_id}", params={"wait": 20})

        poller = threading.Thread(target=long_poll)
        poller.start()
        reader = stack.api.app.state.api.reader
        wait_for(lambda: reader.waiting_for(order_id) == 1, 10, "the long poll to wait")
        assert poller.is_alive() and "response" not in result
    finally:
        stack.tracker.signal(18)  # SIGCONT
    poller.join(25)
    assert result["response"].status_code == 200
    assert result["response"].json()["status"] == "RESERVED"


def test_idempotency_key_replay_and_conflict(stack: Stack) -> None:
    client = stack.client
    key = "checkout-7f3a"
    payload = body((sku_name(4), 1, 5.0), customer="cust-idem")
    first = client.post("/orders", json=payload, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    order_id = first.json()["order_id"]
    assert order_id == order_id_for_key(key)

    # same key, same body (keys reordered, whitespace): the same order, 200
    replay = client.post(
        "/orders",
        content=json.dumps(dict(reversed(payload.items())), indent=2),
        headers={"Idempotency-Key": key, "content-type": "application/json"},
    )
    assert replay.status_code == 200, replay.text
    assert replay.json() == {"order_id": order_id, "status": "PLACED"}
    assert replay.headers["location"] == f"/orders/{order_id}"

    # same key, another body: 409, and nothing is produced
    other = body((sku_name(4), 2, 5.0), customer="cust-idem")
    conflict = client.post("/orders", json=other, headers={"Idempotency-Key": key})
    assert "idempotency" in assert_problem(conflict, 409)["type"]
    assert order_id not in conflict.text  # the key's order may be another caller's

    wait_status(client, order_id, "RESERVED")
    records = [
        r
        for r in read_topic(stack.settings, stack.settings.topic(ORDERS))
        if r.key == order_id.encode()
    ]
    assert len(records) == 1  # the replay answered from the API DB, it did not produce

    # a key of another length limit is refused before anything happens
    assert_problem(
        client.post("/orders", json=payload, headers={"Idempotency-Key": "k" * 300}), 422
    )


def test_cancel_releases_stock_exactly_once(stack: Stack) -> None:
    client = stack.client
    sku = sku_name(5)
    before = stock_of(stack.settings, sku)
    order_id = place(client, body((sku, 7, 1.25)))
    assert client.get(f"/orders/{order_id}", params={"wait": 10}).json()["status"] == "RESERVED"
    held = stock_of(stack.settings, sku)
    assert (held.available, held.reserved) == (before.available - 7, before.reserved + 7)

    # two cancels back to back: the second may still see RESERVED and send a second
    # CancelOrder; the inventory must release the stock once all the same
    first = client.post(f"/orders/{order_id}/cancel", json={"reason": "changed my mind"})
    assert first.status_code == 202, first.text
    assert first.json() == {"order_id": order_id, "status": "RESERVED", "cancel": "REQUESTED"}
    second = client.post(f"/orders/{order_id}/cancel")
    assert second.status_code in (202, 409), second.text

    order = wait_status(client, order_id, "CANCELLED")
    assert order["detail"] == "changed my mind"
    assert [h["event"] for h in order["history"]][-2:] == ["StockReleased", "OrderCancelled"]
    wait_for(
        lambda: (lambda r: (r.available, r.reserved) == (before.available, before.reserved))(
            stock_of(stack.settings, sku)
        ),
        10,
        "the stock to be released",
    )
    # once CANCELLED, a cancel is answered as done, and sends nothing
    again = client.post(f"/orders/{order_id}/cancel")
    assert again.status_code == 200, again.text
    assert again.json() == {
        "order_id": order_id,
        "status": "CANCELLED",
        "cancel": "ALREADY_CANCELLED",
    }
    # let any duplicate command be processed, then check the stock did not move twice
    cancels = sum(
        1
        for r in read_topic(stack.settings, stack.settings.topic(COMMANDS))
        if r.key == order_id.encode()
    )
    assert cancels == (2 if second.status_code == 202 else 1)
    wait_for(
        lambda: client.get("/health").json()["consumer_lag"]["groups"]["inventory"]["total"] == 0,
        20,
        "the inventory to consume every command",
    )
    after = stock_of(stack.settings, sku)
    assert (after.available, after.reserved) == (before.available, before.reserved)

    # a REJECTED order cannot be cancelled
    rejected = place(client, body((sku, STOCK * 10, 1.0)))
    response = client.get(f"/orders/{rejected}", params={"wait": 10})
    assert response.json()["reason"] == "OUT_OF_STOCK"
    refused = assert_problem(client.post(f"/orders/{rejected}/cancel"), 409)
    assert "order-state-conflict" in refused["type"] and "ORDER_REJECTED" in refused["detail"]


def test_bad_input_answers_4xx_problems(stack: Stack) -> None:
    client = stack.client
    valid = body((sku_name(6), 1, 9.99))
    json_type = {"content-type": "application/json"}

    # 400: malformed JSON, empty body, bad cursor
    assert_problem(client.post("/orders", content=b'{"customer_id": ', headers=json_type), 400)
    assert_problem(client.post("/orders", content=b"", headers=json_type), 400)
    assert_problem(client.post("/orders", content=b"\xff\xfe{}", headers=json_type), 400)
    assert_problem(client.get("/orders", params={"cursor": "%%%not-ours"}), 400)
    # 404: unknown order, unknown route; 405 names what is allowed
    assert_problem(client.get("/orders/ord-unknown"), 404)
    assert_problem(client.get("/orders/" + "x" * 200), 404)
    assert_problem(client.post("/orders/ord-unknown/cancel"), 404)
    assert_problem(client.get("/nowhere"), 404)
    not_allowed = assert_problem(client.delete("/orders"), 405)
    assert not_allowed["status"] == 405
    assert set(client.delete("/orders").headers["allow"].split(", ")) >= {"GET", "POST"}
    # 413: declared length over 64 KiB, and a chunked body that turns out too large
    big = {**valid, "customer_id": "x" * (70 * 1024)}
    assert_problem(client.post("/orders", json=big), 413)

    def chunks() -> Iterator[bytes]:
        yield b'{"customer_id": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'

    assert_problem(client.post("/orders", content=chunks(), headers=json_type), 413)
    # 415: not JSON
    assert_problem(
        client.post("/orders", content=b"a=b", headers={"content-type": "text/plain"}), 415
    )
    # 422: valid JSON that is not a valid order, per the shared schema
    invalid = [
        [],
        "order",
        {k: v for k, v in valid.items() if k != "items"},
        {**valid, "total": valid["total"] + 1},
        {**valid, "currency": "XXX"},
        {**valid, "items": []},
        {**valid, "items": [{"sku": sku_name(6), "quantity": 0, "unit_price": 9.99}]},
        {**valid, "items": [{"sku": sku_name(6), "quantity": "1", "unit_price": 9.99}]},
        {**valid, "total": 1e400},
        {**valid, "order_id": "ord-mine"},
        {**valid, "extra": True},
    ]
    for payload in invalid:
        response = client.post(
            "/orders", content=json.dumps(payload).replace("Infinity", "1e400"), headers=json_type
        )
        assert_problem(response, 422)
    detail = assert_problem(client.post("/orders", json={**valid, "total": 1.0}), 422)["detail"]
    assert "total" in detail
    for params in ({"wait": "31"}, {"wait": "-1"}, {"wait": "nan"}, {"wait": "soon"}):
        assert_problem(client.get("/orders/ord-x", params=params), 422)
    for params in ({"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"status": "DONE"}):
        assert_problem(client.get("/orders", params=params), 422)
    assert_problem(client.post("/orders/ord-x/cancel", json={"reason": 1}), 422)
    # nothing of it reached Kafka: only the warm-up order is on the topic
    assert len(list(read_topic(stack.settings, stack.settings.topic(ORDERS)))) == 1


def test_api_keys_guard_every_orders_endpoint(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(api_keys="key-one, key-two")
    open_tracker_store(settings).close()  # an empty tracker DB: reads answer
    payload = body((sku_name(1), 1, 1.0))
    with api_server(settings) as api, httpx.Client(base_url=api.url, timeout=30) as client:
        missing = client.post("/orders", json=payload)
        assert_problem(missing, 401)
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_problem(
            client.post("/orders", json=payload, headers={"X-API-Key": "key-three"}), 401
        )
        assert_problem(
            client.post("/orders", json=payload, headers={"Authorization": "Bearer key-on"}), 401
        )
        assert_problem(client.post("/orders/ord-x/cancel"), 401)
        place(client, payload, **{"X-API-Key": "key-one"})
        place(client, payload, Authorization="Bearer key-two")
        # reads need a key too; the OpenAPI document stays open
        assert_problem(client.get("/orders"), 401)
        assert_problem(client.get("/orders/ord-x"), 401)
        listed = client.get("/orders", headers={"X-API-Key": "key-one"})
        assert listed.json() == {"orders": [], "next_cursor": None}
        doc = client.get("/openapi.json").json()
        assert doc["paths"]["/orders"]["post"]["security"]
        assert doc["paths"]["/orders"]["get"]["security"]
        assert "apiKey" in doc["components"]["securitySchemes"]
    records = list(read_topic(settings, settings.topic(ORDERS)))
    assert len(records) == 2


def test_kafka_down_answers_503_and_a_keyed_retry_is_accepted_once(
    settings_factory: SettingsFactory,
) -> None:
    live = settings_factory()
    # a closed port: nothing listens there, so nothing can acknowledge
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    key = "retry-after-outage"
    payload = body((sku_name(1), 1, 1.0))
    down = live.model_copy(update={"bootstrap_servers": dead})
    with api_server(down) as api, httpx.Client(base_url=api.url, timeout=60) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["checks"]["kafka"]["ok"] is False
        response = client.post("/orders", json=payload, headers={"Idempotency-Key": key})
        assert "kafka-unavailable" in assert_problem(response, 503)["type"]
        assert "ordermesh_api_produce_failures_total{topic=" in client.get("/metrics").text

    # Kafka is back (same API DB): the retry with the same key and body is accepted now,
    # under the id derived from the key, and a second retry is a replay
    with api_server(live) as api, httpx.Client(base_url=api.url, timeout=60) as client:
        first = client.post("/orders", json=payload, headers={"Idempotency-Key": key})
        assert first.status_code == 202, first.text
        assert first.json()["order_id"] == order_id_for_key(key)
        again = client.post("/orders", json=payload, headers={"Idempotency-Key": key})
        assert again.status_code == 200 and again.json() == first.json()
    records = list(read_topic(live, live.topic(ORDERS)))
    assert [r.key for r in records] == [order_id_for_key(key).encode()]


# --- property-based: schemathesis against the app's own OpenAPI document ----------------

EXAMPLES_PER_OPERATION_AND_MODE = 25  # ~200 requests over 7 operations x 2 modes


def test_generated_requests_never_get_a_server_error(stack: Stack) -> None:
    calls = generated_requests(stack.api.url, EXAMPLES_PER_OPERATION_AND_MODE)
    assert sum(calls.values()) >= 100, calls


def generated_requests(
    url: str, examples: int, headers: Callable[[int], dict[str, str]] | None = None
) -> Counter[str]:
    """Run schemathesis over every operation of the app's document at ``url``, the n-th
    request with ``headers(n)``; fails on a server error or a nonconforming answer."""
    doc = httpx.get(f"{url}/openapi.json", timeout=30).json()
    # bounded run: a generated ?wait= on an unknown order would otherwise last up to 30 s
    for param in doc["paths"]["/orders/{order_id}"]["get"]["parameters"]:
        if param["name"] == "wait":
            param["schema"]["maximum"] = 0.2
    schema = schemathesis.openapi.from_dict(doc)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    calls: Counter[str] = Counter()
    skipped: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis_settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                extra = headers(sum(calls.values())) if headers is not None else None
                response = case.call(base_url=url, headers=extra, timeout=30)
                calls[f"{case.method} {case.path} {response.status_code}"] += 1
                case.validate_response(response, checks=checks)

            try:
                run()
            except Unsatisfiable:
                # nothing to negate: an operation without parameters or body
                assert mode is GenerationMode.NEGATIVE, operation.label
                skipped.append(operation.label)
    assert sorted(skipped) == ["GET /health", "GET /metrics", "GET /openapi.json"][: len(skipped)]
    assert not [c for c in calls if c.endswith((" 500", " 502", " 503", " 504"))], calls
    return calls
