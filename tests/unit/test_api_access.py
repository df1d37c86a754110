"""Who may read and write what through the HTTP API, and how many may wait; no broker.

Kafka is the acknowledging stand-in of ``test_api_props``; the tracker store is a real
SQLite file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ordermesh.api import create_app
from ordermesh.api.idempotency import client_for_api_key, order_id_for_key
from ordermesh.api.problems import HTTPProblem
from ordermesh.api.server import ThreadedServer
from ordermesh.api.tracking import OrderReader
from ordermesh.config import Settings
from ordermesh.stores.sqlite_idempotency import SqliteIdempotencyStore
from ordermesh.stores.sqlite_tracker import SqliteOrderQueries, SqliteTrackerStore
from ordermesh.stores.tracker import TrackedOrder
from tests.unit.test_api_props import AckingProducer

PROBLEM = "application/problem+json"
A = {"X-API-Key": "key-a"}
B = {"Authorization": "Bearer key-b"}


def body(quantity: int = 1) -> dict[str, Any]:
    return {
        "customer_id": "cust-1",
        "items": [{"sku": "SKU-00001", "quantity": quantity, "unit_price": 2.5}],
        "currency": "USD",
        "total": quantity * 2.5,
    }


def start(data: Path, **settings: Any) -> tuple[ThreadedServer, AckingProducer]:
    SqliteTrackerStore(data / "tracker.db").close()
    # a port nothing listens on: the admin client (health) must never be needed here
    app_settings = Settings(data_dir=data, bootstrap_servers="127.0.0.1:9", **settings)
    producer = AckingProducer()
    app = create_app(app_settings, producer=producer)  # type: ignore[arg-type]
    return ThreadedServer(app), producer


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[httpx.Client, AckingProducer]]:
    server, producer = start(tmp_path, api_keys="key-a, key-b")
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, producer


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    found: dict[str, Any] = response.json()
    return found


def test_idempotency_keys_are_scoped_per_api_key(
    keyed: tuple[httpx.Client, AckingProducer],
) -> None:
    client, producer = keyed
    key = {"Idempotency-Key": "checkout-1"}
    first = client.post("/orders", json=body(), headers=A | key)
    assert first.status_code == 202, first.text
    a_order = first.json()["order_id"]
    assert a_order == order_id_for_key("checkout-1", client_for_api_key(b"key-a"))

    # client B picks the same key for another body: its own order, nothing of A's shows,
    # and B's retry is B's replay
    for status in (202, 200):
        other = client.post("/orders", json=body(2), headers=B | key)
        assert a_order not in other.text
        assert other.status_code == status, other.text
        b_order = other.json()["order_id"]
        assert b_order == order_id_for_key("checkout-1", client_for_api_key(b"key-b"))
    assert b_order != a_order
    assert [record_key for _, record_key, _ in producer.records] == [
        a_order.encode(),
        b_order.encode(),
    ]

    # A's own replay and conflict behave as before; the conflict names no order id
    replay = client.post("/orders", json=body(), headers=A | key)
    assert (replay.status_code, replay.json()["order_id"]) == (200, a_order)
    conflict = problem(client.post("/orders", json=body(3), headers=A | key), 409)
    assert "idempotency" in conflict["type"]
    assert "ord-" not in conflict["detail"]


def test_reads_need_an_api_key_when_keys_are_configured(
    keyed: tuple[httpx.Client, AckingProducer],
) -> None:
    client, _producer = keyed
    for path in ("/orders", "/orders/ord-x", "/orders/ord-x?wait=1"):
        missing = problem(client.get(path), 401)
        assert "unauthorized" in missing["type"]
        problem(client.get(path, headers={"X-API-Key": "key-c"}), 401)
    assert client.get("/orders", headers=A).json() == {"orders": [], "next_cursor": None}
    problem(client.get("/orders/ord-x", headers=B), 404)
    # the document stays open, and says which operations need a key
    doc = client.get("/openapi.json").json()
    for path, method in (("/orders", "get"), ("/orders/{order_id}", "get")):
        operation = doc["paths"][path][method]
        assert operation["security"] and "401" in operation["responses"], (path, method)


def test_without_api_keys_reads_and_keys_work_as_before(tmp_path: Path) -> None:
    server, _producer = start(tmp_path)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/orders").status_code == 200
        placed = client.post("/orders", json=body(), headers={"Idempotency-Key": "k1"})
        assert placed.json()["order_id"] == order_id_for_key("k1")


def test_unscoped_idempotency_db_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "api.db"
    with sqlite3.connect(path) as conn:  # the table as the first release created it
        conn.execute(
            "CREATE TABLE idempotency_keys (idempotency_key TEXT PRIMARY KEY,"
            " body_hash TEXT NOT NULL, order_id TEXT NOT NULL, created_at REAL NOT NULL,"
            " acked_at REAL)"
        )
        conn.execute("INSERT INTO idempotency_keys VALUES ('k1', 'h1', 'ord-1', 1.0, 2.0)")
    for _ in range(2):  # a second open finds it upgraded
        store = SqliteIdempotencyStore(path)
        record = store.get("", "k1")
        assert record is not None and (record.order_id, record.acked_at) == ("ord-1", 2.0)
        assert store.get("key-x", "k1") is None
        store.close()
    store = SqliteIdempotencyStore(path)
    assert store.reserve("key-x", "k1", "h2", "ord-2", 3.0).order_id == "ord-2"
    assert store.reserve("", "k1", "h2", "ord-3", 3.0).order_id == "ord-1"
    store.close()


# --- long-poll waiters ------------------------------------------------------------------


def test_waiters_are_capped(tmp_path: Path) -> None:
    store = SqliteTrackerStore(tmp_path / "tracker.db")
    reader = OrderReader(store, poll_interval_s=0.01, max_waiters=2)

    async def scenario() -> None:
        waiting = [asyncio.create_task(reader.wait_decided(f"o{i}", 0.5)) for i in range(2)]
        while reader.waiting < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(HTTPProblem) as full:
            await reader.wait_decided("o3", 0.5)
        assert full.value.status_code == 503
        assert full.value.headers == {"Retry-After": "1"}
        assert await asyncio.gather(*waiting) == [None, None]
        assert reader.waiting == 0
        assert await reader.wait_decided("o3", 0.05) is None  # room again

    try:
        asyncio.run(scenario())
    finally:
        reader.close()


def test_full_waiters_answer_503_with_retry_after(tmp_path: Path) -> None:
    server, _producer = start(tmp_path)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        server_app: Any = server
        api = server_app.app.state.api
        api.reader.max_waiters = 0
        response = client.get("/orders/ord-x", params={"wait": "1"})
        found = problem(response, 503)
        assert "too-many-waiters" in found["type"]
        assert response.headers["retry-after"] == "1"
        problem(client.get("/orders/ord-x"), 404)  # a plain read never waits


def test_a_tracker_commit_wakes_waiters_before_the_poll_interval(tmp_path: Path) -> None:
    """Over SQLite the poller watches ``data_version``: with a poll interval far longer
    than the wait, only the commit itself can answer the waiter in time."""
    writer = SqliteTrackerStore(tmp_path / "tracker.db")
    placed = TrackedOrder(
        "ord-1",
        "cust-1",
        "PLACED",
        "[]",
        1.0,
        "USD",
        1.0,
        1.0,
        None,
        None,
        None,
        None,
        1.0,
        1,
        None,
    )
    with writer.transaction():
        writer.insert_orders([placed])
    reader = OrderReader(SqliteOrderQueries(tmp_path / "tracker.db"), poll_interval_s=600.0)

    async def scenario() -> None:
        waiter = asyncio.create_task(reader.wait_decided("ord-1", 30.0))
        while reader.waiting < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the poller has read the order PLACED at least once
        assert not waiter.done()
        with writer.transaction():
            writer.update_orders([placed._replace(status="RESERVED", decided_at=2.0, seq=2)])
        view = await asyncio.wait_for(waiter, 10.0)
        assert view is not None and view.status == "RESERVED"

    try:
        asyncio.run(scenario())
    finally:
        reader.close()
        writer.close()
