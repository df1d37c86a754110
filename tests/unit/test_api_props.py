"""Property tests of the HTTP API's input handling, without a broker.

Kafka is replaced by a stand-in producer that acknowledges every record on its next
``poll`` (the real ack path is covered in tests/integration/test_api.py); the tracker
store is a real, empty SQLite file. Whatever the body, path or query, the API answers
below 500, errors are problem documents, and every valid order is produced as exactly
the bytes the shared schema decodes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ordermesh import schema
from ordermesh.api import create_app
from ordermesh.api.bodies import REQUEST_FIELDS
from ordermesh.api.server import ThreadedServer
from ordermesh.config import Settings
from ordermesh.stores.sqlite_tracker import SqliteTrackerStore

PROBLEM = "application/problem+json"
EXAMPLES = 50  # x 4 properties = 200 requests, a few seconds


class AckingProducer:
    """Stands in for confluent_kafka.Producer: every record is acknowledged on poll."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self._pending: list[Callable[[Any, Any], None]] = []
        self._ready = threading.Condition()

    def produce(
        self, topic: str, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]
    ) -> None:
        with self._ready:
            self.records.append((topic, key, value))
            self._pending.append(on_delivery)
            self._ready.notify()

    def poll(self, timeout: float) -> int:
        with self._ready:
            if not self._pending:
                self._ready.wait(timeout)
            callbacks, self._pending = self._pending, []
        for callback in callbacks:
            callback(None, None)
        return len(callbacks)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return 0


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, AckingProducer]]:
    data = tmp_path_factory.mktemp("api")
    SqliteTrackerStore(data / "tracker.db").close()
    # a port nothing listens on: the admin client (health) must never be needed here
    app_settings = Settings(data_dir=Path(data), bootstrap_servers="127.0.0.1:9")
    producer = AckingProducer()
    app = create_app(app_settings, producer=producer)  # type: ignore[arg-type]
    with ThreadedServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, producer


def check_answer(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert problem["status"] == response.status_code
        assert set(problem) == {"type", "title", "status", "detail"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)

# order-shaped bodies whose fields are anything: mostly invalid, in every field
order_shaped = st.fixed_dictionaries(
    {},
    optional={
        "customer_id": json_values,
        "items": st.lists(
            st.fixed_dictionaries(
                {},
                optional={"sku": json_values, "quantity": json_values, "unit_price": json_values},
            ),
            max_size=3,
        )
        | json_values,
        "currency": st.sampled_from(["USD", "EUR", "usd", "XXX", ""]) | json_values,
        "total": json_values,
        "order_id": json_values,
    },
)


@st.composite
def valid_orders(draw: st.DrawFn) -> dict[str, Any]:
    items = draw(
        st.lists(
            st.tuples(
                st.text(st.characters(codec="utf-8"), min_size=1, max_size=64),
                st.integers(1, 10_000),
                st.integers(0, 10_000_00),
            ),
            min_size=1,
            max_size=5,
        )
    )
    total_cents = sum(qty * cents for _sku, qty, cents in items)
    return {
        "customer_id": draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=64)),
        "items": [{"sku": s, "quantity": q, "unit_price": c / 100} for s, q, c in items],
        "currency": draw(st.sampled_from(sorted(schema.CURRENCIES))),
        "total": total_cents / 100,
    }


# what a client can send in a header: visible ASCII and inner blanks (HTTP trims the ends)
header_values = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.sampled_from(" \t"), max_size=300
).map(str.strip)

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(raw=st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_gets_an_answer_below_500(
    api: tuple[httpx.Client, AckingProducer], raw: bytes
) -> None:
    client, _ = api
    check_answer(client.post("/orders", content=raw, headers={"content-type": "application/json"}))
    check_answer(client.post("/orders/ord-1/cancel", content=raw))


@SETTINGS
@given(order=order_shaped, key=st.none() | header_values)
def test_order_shaped_bodies_are_valid_or_rejected_4xx(
    api: tuple[httpx.Client, AckingProducer], order: dict[str, Any], key: str | None
) -> None:
    client, producer = api
    before = len(producer.records)
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["idempotency-key"] = key
    response = client.post("/orders", content=json.dumps(order).encode(), headers=headers)
    check_answer(response)
    if response.status_code >= 400:
        assert len(producer.records) == before  # nothing produced for a refused order


@SETTINGS
@given(order=valid_orders())
def test_valid_orders_are_produced_as_the_schema_decodes_them(
    api: tuple[httpx.Client, AckingProducer], order: dict[str, Any]
) -> None:
    client, producer = api
    response = client.post("/orders", json=order)
    assert response.status_code == 202, response.text
    order_id = response.json()["order_id"]
    topic, key, value = producer.records[-1]
    assert (topic, key) == ("orders", order_id.encode())
    placed = schema.decode_order(value)
    assert {f: getattr(placed, f) for f in REQUEST_FIELDS} == {
        "customer_id": order["customer_id"],
        "items": tuple(schema.OrderItem(**item) for item in order["items"]),
        "currency": order["currency"],
        "total": order["total"],
        "card": "",  # not given: the customer's default
    }


def _positive(text: str | None) -> bool:
    try:
        return text is not None and float(text) > 0.05
    except ValueError:
        return False


@SETTINGS
@given(
    order_id=st.text(max_size=100),
    query=st.dictionaries(
        st.sampled_from(["wait", "limit", "status", "cursor", "customer_id", "other"]),
        st.text(max_size=30),
        max_size=4,
    ),
)
def test_any_path_and_query_gets_an_answer_below_500(
    api: tuple[httpx.Client, AckingProducer], order_id: str, query: dict[str, str]
) -> None:
    client, _ = api
    if _positive(query.get("wait")):
        query["wait"] = "0.05"  # a valid long poll of an unknown order lasts its full wait
    check_answer(client.get("/orders/" + quote(order_id, safe=""), params=query))
    check_answer(client.get("/orders", params=query))
