"""The gateway's HTTP rules, on the real app under uvicorn in a thread, through
``HttpGateway``: idempotency, state rules, faults, bad input and the ledger's reads.

Every test runs twice: with a request per operation, and with the client batching the
operations called together (``POST /v1/batch``), which must answer each call alike."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from ordermesh.api.server import ThreadedServer
from ordermesh.errors import GatewayError, GatewayUnavailableError, GatewayUnknownOutcomeError
from ordermesh.gateway.client import HttpGateway
from ordermesh.gateway.faults import FaultConfig
from ordermesh.gateway.protocol import operation_key
from ordermesh.gateway.server import create_gateway_app
from tests.conftest import wait_for

T = TypeVar("T")
CARD = "4242424242424242"
# operations per request of ``run``'s client (set per test by ``batch_max``)
BATCH_MAX = 1


@pytest.fixture(autouse=True, params=[1, 100], ids=["a-request-each", "batched"])
def batch_max(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys.modules[__name__], "BATCH_MAX", request.param)
    return int(request.param)


@pytest.fixture
def gateway_url(tmp_path: Path) -> Iterator[str]:
    app = create_gateway_app(tmp_path / "gateway.db", FaultConfig(seed=1))
    with ThreadedServer(app) as server:
        yield server.url


def run(
    url: str,
    scenario: Callable[[HttpGateway], Awaitable[T]],
    timeout_s: float = 5.0,
    max_connections: int = 16,
) -> T:
    async def main() -> T:
        gateway = HttpGateway(
            url, timeout_s=timeout_s, max_connections=max_connections, batch_max=BATCH_MAX
        )
        try:
            return await scenario(gateway)
        finally:
            await gateway.close()

    return asyncio.run(main())


async def authorize(gw: HttpGateway, order_id: str, cents: int = 1000, card: str = CARD) -> Any:
    return await gw.authorize(
        operation_key(order_id, "authorize"),
        order_id=order_id,
        amount_cents=cents,
        currency="EUR",
        customer_id="cust-1",
        card=card,
    )


def test_a_repeated_key_answers_the_first_answer_and_applies_once(gateway_url: str) -> None:
    async def scenario(gw: HttpGateway) -> Any:
        first = await authorize(gw, "o1")
        again = await authorize(gw, "o1")
        # concurrent repeats of a new key: one applies, all agree
        twins = await asyncio.gather(*(authorize(gw, "o2") for _ in range(20)))
        with pytest.raises(GatewayError, match="409"):
            await authorize(gw, "o1", cents=999)
        looked = await gw.lookup(operation_key("o1", "authorize"))
        entries = [e async for e in gw.ledger()]
        return first, again, twins, looked, entries

    first, again, twins, looked, entries = run(gateway_url, scenario)
    assert first.approved and first.authorization_id.startswith("auth_")
    assert again == first == looked
    assert len({t.authorization_id for t in twins}) == 1
    assert [e.order_id for e in entries] == ["o1", "o2"]


def test_capture_void_refund_follow_the_rules(gateway_url: str) -> None:
    async def scenario(gw: HttpGateway) -> dict[str, Any]:
        a = (await authorize(gw, "ship")).authorization_id
        b = (await authorize(gw, "cancel")).authorization_id
        out = {
            "over": await gw.capture("ship:capture-over", authorization_id=a, amount_cents=1001),
            "capture": await gw.capture("ship:capture", authorization_id=a, amount_cents=900),
            "capture2": await gw.capture("ship:capture2", authorization_id=a, amount_cents=10),
            "void_captured": await gw.void("ship:void", authorization_id=a),
            "refund": await gw.refund("ship:refund", authorization_id=a, amount_cents=600),
            "refund_over": await gw.refund("ship:refund2", authorization_id=a, amount_cents=301),
            "void": await gw.void("cancel:void", authorization_id=b),
            "capture_voided": await gw.capture(
                "cancel:capture", authorization_id=b, amount_cents=1
            ),
            "refund_uncaptured": await gw.refund(
                "cancel:refund", authorization_id=b, amount_cents=1
            ),
            "unknown": await gw.capture("x:capture", authorization_id="auth_nope", amount_cents=1),
            "declined": await authorize(gw, "poor", card="4000000000009995"),
        }
        out["summary"] = await gw.ledger_summary(page_size=1)
        out["one"] = await gw.order_summary("ship")
        out["none"] = await gw.order_summary("ghost")
        return out

    out = run(gateway_url, scenario)
    decided = {name: (o.approved, o.reason) for name, o in out.items() if hasattr(o, "reason")}
    assert decided == {
        "over": (False, "amount_exceeds_authorization"),
        "capture": (True, ""),
        "capture2": (False, "already_captured"),
        "void_captured": (False, "already_captured"),
        "refund": (True, ""),
        "refund_over": (False, "amount_exceeds_captured"),
        "void": (True, ""),
        "capture_voided": (False, "authorization_voided"),
        "refund_uncaptured": (False, "not_captured"),
        "unknown": (False, "authorization_not_found"),
        "declined": (False, "insufficient_funds"),
    }
    assert out["declined"].authorization_id == ""
    assert out["void"].amount_cents == 1000
    summary = out["summary"]
    assert sorted(summary) == ["cancel", "poor", "ship"]  # paged one order at a time
    ship = summary["ship"]
    assert (ship.authorizations, ship.captures, ship.refunds, ship.declines) == (1, 1, 1, 4)
    assert (ship.captured_cents, ship.refunded_cents, ship.kept_cents) == (900, 600, 300)
    assert summary["cancel"].voided_cents == 1000 and summary["cancel"].declines == 2
    assert summary["poor"].authorizations == 0 and summary["poor"].declines == 1
    assert out["one"] == ship and out["none"] is None


def test_faults_change_at_runtime_and_map_to_the_seam_errors(gateway_url: str) -> None:
    async def scenario(gw: HttpGateway) -> dict[str, Any]:
        out: dict[str, Any] = {}
        await gw.faults({"error_rate": 1.0})
        with pytest.raises(GatewayUnavailableError, match="503"):
            await authorize(gw, "err")
        # look-ups fail alike
        with pytest.raises(GatewayUnavailableError, match="503"):
            await gw.lookup("err:authorize")
        await gw.faults({"error_rate": 0.0, "lost_response_rate": 1.0})
        out["err_applied"] = await gw.lookup("err:authorize") is None
        with pytest.raises(GatewayUnknownOutcomeError):
            await authorize(gw, "lost")
        out["lost_lookup"] = await gw.lookup("lost:authorize")
        await gw.faults({"lost_response_rate": 0.0, "timeout_rate": 1.0, "hang_s": 30.0})
        with pytest.raises(GatewayUnknownOutcomeError):
            await asyncio.wait_for(authorize(gw, "hung"), 10)
        out["hung_lookup"] = await gw.lookup("hung:authorize")
        out["faults"] = await gw.faults({"timeout_rate": 0.0, "decline_customers": ["cust-1"]})
        out["blocked"] = await authorize(gw, "blocked")
        out["retry"] = await authorize(gw, "lost")
        return out

    out = run(gateway_url, scenario, timeout_s=0.5)
    assert out["err_applied"]
    assert out["lost_lookup"] is not None and out["lost_lookup"].approved
    assert out["hung_lookup"] is None
    assert out["faults"]["decline_customers"] == ["cust-1"] and out["faults"]["hang_s"] == 30.0
    assert (out["blocked"].approved, out["blocked"].reason) == (False, "customer_blocked")
    assert out["retry"] == out["lost_lookup"]


def test_latency_delays_every_call(gateway_url: str) -> None:
    async def scenario(gw: HttpGateway) -> list[float]:
        await gw.faults({"latency_p50_ms": 200.0, "latency_p99_ms": 200.0})
        loop = asyncio.get_running_loop()

        async def timed(i: int) -> float:
            start = loop.time()
            await authorize(gw, f"slow-{i}")
            return loop.time() - start

        return list(await asyncio.gather(*(timed(i) for i in range(8))))

    # a constant latency: no call can come back sooner
    assert min(run(gateway_url, scenario)) >= 0.2


def _in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("ordermesh_gateway_calls_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge")


def test_held_calls_do_not_stop_the_gateway_serving(gateway_url: str) -> None:
    """Many calls held at once (the timeout fault) while others are answered; a held
    call ends when its caller hangs up."""

    async def scenario(gw: HttpGateway) -> tuple[float, Any]:
        await gw.faults({"timeout_rate": 1.0, "hang_s": 600.0})
        held = [asyncio.create_task(authorize(gw, f"held-{i}")) for i in range(50)]
        deadline = asyncio.get_running_loop().time() + 30
        while (count := await asyncio.to_thread(_in_flight, gw.base_url)) < 50:
            assert asyncio.get_running_loop().time() < deadline, f"only {count} in flight"
            await asyncio.sleep(0.05)
        await gw.faults({"timeout_rate": 0.0})
        answered = await authorize(gw, "meanwhile")
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        return count, answered

    count, answered = run(gateway_url, scenario, timeout_s=60.0, max_connections=64)
    assert count == 50 and answered.approved
    wait_for(lambda: _in_flight(gateway_url) == 0, 30, "the held calls to end")


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("POST", "/v1/authorizations", {}, b'{"order_id":"o"}', 422),
        ("POST", "/v1/authorizations", {"Idempotency-Key": "k"}, b'{"order_id":', 400),
        ("POST", "/v1/authorizations", {"Idempotency-Key": "k"}, b"", 400),
        (
            "POST",
            "/v1/authorizations",
            {},
            b'{"order_id":"o","amount_cents":1,"currency":"EUR","customer_id":"c"}',
            400,
        ),
        (
            "POST",
            "/v1/authorizations",
            {"Idempotency-Key": "k"},
            b'{"order_id":"o","amount_cents":-5,"currency":"EUR","customer_id":"c"}',
            422,
        ),
        (
            "POST",
            "/v1/authorizations",
            {"Idempotency-Key": "k"},
            b'{"order_id":"o","amount_cents":5,"currency":"eur","customer_id":"c","x":1}',
            422,
        ),
        ("POST", "/v1/authorizations/a/capture", {"Idempotency-Key": "k"}, b"[1]", 422),
        ("POST", "/v1/authorizations/a/void", {"Idempotency-Key": "k"}, b'{"x":1}', 422),
        ("GET", "/v1/ledger?limit=0", {}, b"", 422),
        ("GET", "/v1/ledger?after=x", {}, b"", 422),
        ("POST", "/admin/faults", {}, b'{"error_rate":2}', 422),
        ("POST", "/admin/faults", {}, b"{", 400),
        ("POST", "/v1/authorizations", {"Idempotency-Key": "k"}, b"x" * 20_000, 413),
        ("GET", "/v1/authorizations", {}, b"", 405),
        ("GET", "/nowhere", {}, b"", 404),
    ],
)
def test_bad_input_is_a_problem_never_a_crash(
    gateway_url: str, method: str, path: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    response = httpx.request(method, gateway_url + path, headers=headers, content=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status


def test_health_metrics_and_ledger_paging(gateway_url: str) -> None:
    async def scenario(gw: HttpGateway) -> list[int]:
        for i in range(5):
            await authorize(gw, f"p{i}")
        return [e.seq async for e in gw.ledger(after=1, page_size=2)]

    assert run(gateway_url, scenario) == [2, 3, 4, 5]
    health = httpx.get(gateway_url + "/health").json()
    assert health["status"] == "ok" and health["ledger"]["entries"] == 5
    metrics = httpx.get(gateway_url + "/metrics").text
    assert 'ordermesh_gateway_calls_total{operation="authorize",outcome="approved"} 5.0' in metrics


def test_a_refused_connection_is_unavailable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # nothing listens on the port once the socket closed
    with pytest.raises(GatewayUnavailableError, match="unreachable"):
        run(f"http://127.0.0.1:{port}", lambda gw: authorize(gw, "o1"))


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_calls_made_together_share_a_request_and_each_gets_its_own_answer(
    gateway_url: str, batch_max: int
) -> None:
    async def scenario(gw: HttpGateway) -> list[Any]:
        cards = [CARD if i % 10 else "4000000000000002" for i in range(250)]
        return list(
            await asyncio.gather(
                *(authorize(gw, f"b{i}", cents=100 + i, card=card) for i, card in enumerate(cards))
            )
        )

    outcomes = run(gateway_url, scenario, max_connections=64)
    assert [o.key for o in outcomes] == [f"b{i}:authorize" for i in range(250)]
    assert [o.amount_cents for o in outcomes] == [100 + i for i in range(250)]
    assert [o.approved for o in outcomes] == [i % 10 != 0 for i in range(250)]
    requests = _metric(gateway_url, "ordermesh_gateway_batch_requests_total")
    # made in one turn of the loop: 100, 100 and 50 operations
    assert requests == (3 if batch_max == 100 else 0)


def test_a_batch_answers_each_operation_with_its_own_status(gateway_url: str) -> None:
    auth = {
        "operation": "authorize",
        "order_id": "m1",
        "amount_cents": 500,
        "currency": "EUR",
        "customer_id": "c1",
    }
    first = httpx.post(
        gateway_url + "/v1/batch",
        json={
            "operations": [
                {"key": "m1:authorize", **auth},
                {"key": "m1:authorize", **auth},  # the same key again: its first answer
                {"key": "m1:authorize", **auth, "amount_cents": 501},  # other parameters
                {"key": "m2:authorize", **auth, "order_id": "m2", "amount_cents": -1},
                {"key": "", **auth},
                {"key": "m3:capture", "operation": "capture", "amount_cents": 5},
                {"key": "m4:void", "operation": "void", "authorization_id": "auth_nope"},
            ]
        },
    )
    assert first.status_code == 200, first.text
    results = first.json()["results"]
    assert [r["status"] for r in results] == [200, 200, 409, 422, 400, 422, 200]
    assert results[0]["outcome"]["approved"] and results[1]["replayed"]
    assert results[1]["outcome"] == results[0]["outcome"]
    assert not results[6]["outcome"]["approved"]  # an unknown authorization: refused
    auth_id = results[0]["outcome"]["authorization_id"]
    follow = httpx.post(
        gateway_url + "/v1/batch",
        json={
            "operations": [
                {
                    "key": "m1:capture",
                    "operation": "capture",
                    "authorization_id": auth_id,
                    "amount_cents": 500,
                },
                {
                    "key": "m1:refund",
                    "operation": "refund",
                    "authorization_id": auth_id,
                    "amount_cents": 200,
                },
            ]
        },
    ).json()["results"]
    assert [(r["status"], r["outcome"]["approved"]) for r in follow] == [(200, True), (200, True)]
    entries = httpx.get(gateway_url + "/v1/ledger").json()["entries"]
    assert [(e["key"], e["approved"]) for e in entries] == [
        ("m1:authorize", True),
        ("m4:void", False),
        ("m1:capture", True),
        ("m1:refund", True),
    ]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"operations": []}, 422),
        ({"operations": [{"key": "k", "operation": "pay"}]}, 422),
        ({"operations": [{"key": "k", "operation": "void", "extra": 1}]}, 422),
        ({"ops": []}, 422),
        ({"operations": [{"key": "k", "operation": "void"}] * 1001}, 422),
    ],
)
def test_a_malformed_batch_is_a_problem(gateway_url: str, body: Any, status: int) -> None:
    response = httpx.post(gateway_url + "/v1/batch", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
