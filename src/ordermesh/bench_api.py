"""Benchmarks of the orders HTTP API against a running instance (``ordermesh api-bench``).

- ``bench_api``: POST /orders requests/s with ``concurrency`` requests in flight; every
  answer means Kafka acknowledged the order (the API answers only then).
- ``bench_latency``: orders POSTed at a steady ``rate``, each followed by
  ``GET /orders/{id}?wait=10``; the time from sending the POST to the GET returning the
  decided order is the end-to-end latency API -> Kafka -> inventory -> Kafka -> tracker
  -> API, reported as p50/p99 over the orders that reached RESERVED.

The client is httpx on the same machine as the server, so on a small box it competes
with the API for CPU: the numbers are a floor, not the server's ceiling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

import httpx
import msgspec

from ordermesh.api.bodies import REQUEST_FIELDS
from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError
from ordermesh.loadgen import OrderGenerator

log = logging.getLogger(__name__)

WAIT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 30.0


def order_bodies(count: int, *, skus: int = 1000, seed: int = 1) -> list[bytes]:
    """``count`` valid POST /orders bodies (the load generator's orders, server fields cut)."""
    gen = OrderGenerator(seed, skus=skus)
    bodies = []
    for _ in range(count):
        order = msgspec.to_builtins(gen.next_order())
        bodies.append(msgspec.json.encode({k: order[k] for k in REQUEST_FIELDS}))
    return bodies


def _headers(settings: Settings) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    keys = sorted(settings.api_key_set())
    if keys:
        headers["x-api-key"] = keys[0]
    return headers


def percentiles_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max of ``values`` (seconds) in milliseconds, nearest rank."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        index = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))
        return round(ordered[index] * 1000, 2)

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": rank(1.0)}


def _client(base_url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_S)


async def _throughput(
    base_url: str, bodies: list[bytes], concurrency: int, headers: dict[str, str]
) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(bodies):
            body = bodies[next_index]
            next_index += 1
            start = time.perf_counter()
            try:
                response = await client.post("/orders", content=body, headers=headers)
                statuses[str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - start)

    async with _client(base_url, concurrency) as client:
        # one request first: connection setup and a cold producer are not throughput
        warm = await client.post("/orders", content=bodies[0], headers=headers)
        if warm.status_code != 202:
            raise OrderMeshError(f"POST /orders answered {warm.status_code}: {warm.text[:300]}")
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "requests": len(bodies),
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(bodies) / elapsed, 1),
        "accepted_per_s": round(statuses["202"] / elapsed, 1),
        "statuses": dict(statuses),
        "latency_ms": percentiles_ms(latencies),
    }


def bench_api(
    settings: Settings,
    base_url: str,
    *,
    requests: int,
    concurrency: int,
    skus: int = 1000,
    seed: int = 101,
) -> dict[str, Any]:
    """POST /orders requests/s (answers are 202 only after Kafka's ack)."""
    bodies = order_bodies(requests, skus=skus, seed=seed)
    result = asyncio.run(_throughput(base_url, bodies, concurrency, _headers(settings)))
    log.info(
        "POST /orders: %.0f req/s at concurrency %d, p50 %s ms, p99 %s ms",
        result["requests_per_s"],
        concurrency,
        result["latency_ms"]["p50"],
        result["latency_ms"]["p99"],
    )
    return result


async def _latency(
    base_url: str, bodies: list[bytes], rate: float, headers: dict[str, str]
) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    acked: list[float] = []
    reserved: list[float] = []
    decided: list[float] = []

    async def one(client: httpx.AsyncClient, body: bytes) -> None:
        start = time.perf_counter()
        try:
            posted = await client.post("/orders", content=body, headers=headers)
            if posted.status_code != 202:
                outcomes[f"post_{posted.status_code}"] += 1
                return
            acked.append(time.perf_counter() - start)
            order_id = posted.json()["order_id"]
            got = await client.get(f"/orders/{order_id}", params={"wait": WAIT_S})
        except httpx.HTTPError as exc:
            outcomes[type(exc).__name__] += 1
            return
        took = time.perf_counter() - start
        if got.status_code != 200:
            outcomes[f"get_{got.status_code}"] += 1
            return
        status = got.json()["status"]
        outcomes[status] += 1
        if status != "PLACED":
            decided.append(took)
        if status == "RESERVED":
            reserved.append(took)

    async with _client(base_url, 512) as client:
        tasks = []
        start = time.perf_counter()
        for i, body in enumerate(bodies):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, body)))
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return {
        "count": len(bodies),
        "rate": rate,
        "achieved_rate": round(len(bodies) / sent_s, 1) if sent_s > 0 else None,
        "outcomes": dict(outcomes),
        "post_ack_ms": percentiles_ms(acked),
        "post_to_reserved_ms": percentiles_ms(reserved),
        "post_to_decided_ms": percentiles_ms(decided),
    }


def bench_latency(
    settings: Settings,
    base_url: str,
    *,
    rate: float,
    count: int,
    skus: int = 1000,
    seed: int = 202,
) -> dict[str, Any]:
    """p50/p99 from POST to RESERVED visible through ``GET ?wait=``, at ``rate`` orders/s."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    bodies = order_bodies(count, skus=skus, seed=seed)
    result = asyncio.run(_latency(base_url, bodies, rate, _headers(settings)))
    log.info(
        "POST -> RESERVED at %.0f/s: p50 %s ms, p99 %s ms",
        rate,
        result["post_to_reserved_ms"]["p50"],
        result["post_to_reserved_ms"]["p99"],
    )
    return result
