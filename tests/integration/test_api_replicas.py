"""Two API replicas on one PostgreSQL: an Idempotency-Key holds across replicas.

Each replica is an ``ordermesh api`` process of its own (its own data dir, as if on its
own host); the idempotency keys in PostgreSQL are the only state they share. The POST
path needs Kafka and that store only; an inventory runs at the end, to show the order is
decided once.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ordermesh.api.idempotency import order_id_for_key
from ordermesh.config import Settings
from ordermesh.kafka.reader import read_topic
from ordermesh.loadgen import sku_name
from ordermesh.stores.factory import migrate, open_inventory_store
from ordermesh.topics import ORDERS
from ordermesh.verify import verify, wait_drained
from tests.conftest import ServiceProcess, SettingsFactory, wait_for
from tests.integration.test_api import assert_problem, body

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

REQUESTS = 10


@dataclass
class Replica:
    process: ServiceProcess
    url: str


def on_host(settings: Settings, tmp_path: Path, name: str) -> Settings:
    """``settings`` with a data dir of the instance's own, as if it ran on its own host."""
    return settings.model_copy(update={"data_dir": tmp_path / "hosts" / name})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serving(replica: Replica) -> bool:
    if not replica.process.alive():
        return True  # stop polling: the caller looks at why it exited
    try:
        return httpx.get(f"{replica.url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def start_replica(
    service_factory: Callable[..., ServiceProcess], settings: Settings, name: str
) -> Replica:
    """``ordermesh api`` on a free port, healthy (Kafka and both stores answer)."""
    for _attempt in range(2):
        # the port is free when picked, not necessarily when the process binds it:
        # another process may win the race, so a replica that exits gets one more port
        port = _free_port()
        process = service_factory(["api", "--port", str(port)], settings, name)
        replica = Replica(process, f"http://127.0.0.1:{port}")
        wait_for(lambda r=replica: _serving(r), 60, f"API replica {name} to be healthy")
        if process.alive():
            return replica
    pytest.fail(f"API replica {name} did not start:\n{process.log_text()[-3000:]}")


@pytest.fixture
def replicas(
    settings_factory: SettingsFactory,
    postgres_database: str,
    service_factory: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> Iterator[tuple[Settings, list[Replica]]]:
    settings = settings_factory(database_url=postgres_database)
    migrate(settings)
    with open_inventory_store(settings) as store:
        store.seed({sku_name(3): 100, sku_name(8): 100})
    started = [
        start_replica(service_factory, on_host(settings, tmp_path, name), name)
        for name in ("api-a", "api-b")
    ]
    yield settings, started
    for replica in started:
        assert replica.process.stop() == 0, replica.process.log_text()[-3000:]


def test_one_idempotency_key_sent_to_both_replicas_at_once_makes_one_order(
    replicas: tuple[Settings, list[Replica]],
    service_factory: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> None:
    settings, (a, b) = replicas
    key = "checkout-replicas-5d1c"
    payload = body((sku_name(3), 2, 7.25), (sku_name(8), 1, 19.99), customer="cust-replicas")
    targets = [(a, b)[i % 2] for i in range(REQUESTS)]
    clients = [httpx.Client(base_url=r.url, timeout=60) for r in targets]
    try:
        # open every connection first, so the requests leave together at the barrier
        for client in clients:
            assert client.get("/openapi.json").status_code == 200
        barrier = threading.Barrier(REQUESTS)
        responses: list[httpx.Response | None] = [None] * REQUESTS

        def post(i: int) -> None:
            barrier.wait(30)
            responses[i] = clients[i].post(
                "/orders", json=payload, headers={"Idempotency-Key": key}
            )

        threads = [threading.Thread(target=post, args=(i,)) for i in range(REQUESTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        for client in clients:
            client.close()

    got = [r for r in responses if r is not None]
    assert len(got) == REQUESTS
    assert all(r.status_code in (200, 202) for r in got), [(r.status_code, r.text) for r in got]
    # every answer names the one order the key stands for; exactly one was the first
    order_ids = {r.json()["order_id"] for r in got}
    assert order_ids == {order_id_for_key(key)}
    assert Counter(r.status_code for r in got)[202] == 1, [r.status_code for r in got]
    (order_id,) = order_ids
    assert {r.headers["location"] for r in got} == {f"/orders/{order_id}"}

    # Twins that reserved the key before the first one's ack each produce too (the API
    # does not wait on another request, which may never ack): one order, possibly
    # several copies, all the identical record, which the inventory decides once.
    records = list(read_topic(settings, settings.topic(ORDERS)))
    assert 1 <= len(records) <= REQUESTS
    assert {r.key for r in records} == {order_id.encode()}
    assert len({r.value for r in records}) == 1, "copies of one keyed order differ"

    # the key is now taken for that body: another body is refused by either replica
    other = body((sku_name(3), 3, 7.25), customer="cust-replicas")
    for replica in (b, a):
        conflict = httpx.post(
            f"{replica.url}/orders", json=other, headers={"Idempotency-Key": key}, timeout=30
        )
        problem = assert_problem(conflict, 409)
        assert problem["type"].endswith("idempotency-conflict"), problem
        assert order_id not in conflict.text  # the key's order may be another caller's
    # a replay of the same body from either replica: the same order, nothing new produced
    for replica in (a, b):
        replay = httpx.post(
            f"{replica.url}/orders", json=payload, headers={"Idempotency-Key": key}, timeout=30
        )
        assert replay.status_code == 200, replay.text
        assert replay.json()["order_id"] == order_id
        assert replay.headers["idempotent-replayed"] == "true"
    assert len(list(read_topic(settings, settings.topic(ORDERS)))) == len(records)

    # the inventory decides the order once: one outcome, its units reserved once
    inventory = service_factory(["inventory", "run"], on_host(settings, tmp_path, "inventory"))
    assert wait_drained(settings, ["inventory"], 60), inventory.log_text()[-3000:]
    assert inventory.stop() == 0, inventory.log_text()[-3000:]
    report = verify(settings, check_tracker=False)
    assert report.ok, (report.violation_counts, report.violations)
    assert report.valid_orders == 1
    assert report.outcomes == {"OrderReserved": 1}
    with open_inventory_store(settings, readonly=True) as store:
        held = {row.sku: row.reserved for row in store.stock()}
    assert held == {sku_name(3): 2, sku_name(8): 1}
