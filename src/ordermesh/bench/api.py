"""Benchmarks of the orders HTTP API against a running instance (``ordermesh api-bench``).

- ``bench_api``: POST /orders requests/s with ``concurrency`` requests in flight; every
  answer means Kafka acknowledged the order (the API answers only then).
- ``bench_latency``: orders POSTed at a steady ``rate``, each followed by
  ``GET /orders/{id}?wait=10``; the time from sending the POST to the GET returning the
  decided order is the end-to-end latency API -> Kafka -> inventory -> Kafka -> tracker
  -> API, reported as p50/p99 over the orders that reached RESERVED.

The client (``HttpConnection``, a bare keep-alive HTTP/1.1 client) runs on the same
machine as the server, so on a small box it competes with the API for CPU: the numbers
are a floor, not the server's ceiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from ordermesh.api.bodies import REQUEST_FIELDS
from ordermesh.config import Settings
from ordermesh.errors import OrderMeshError
from ordermesh.loadgen import OrderGenerator

log = logging.getLogger(__name__)

WAIT_S: Final = 10.0
IDLE_REUSE_S: Final = 2.0


def order_bodies(count: int, *, skus: int = 1000, seed: int = 1) -> list[bytes]:
    """``count`` valid POST /orders bodies (the load generator's orders, server fields cut)."""
    gen = OrderGenerator(seed, skus=skus)
    bodies = []
    for _ in range(count):
        order = msgspec.to_builtins(gen.next_order())
        bodies.append(msgspec.json.encode({k: order[k] for k in REQUEST_FIELDS}))
    return bodies


def api_headers(settings: Settings) -> dict[str, str]:
    """The headers of a benchmark's POST: JSON, and the first API key when keys are set."""
    headers = {"content-type": "application/json"}
    keys = sorted(settings.api_key_set())
    if keys:
        headers["x-api-key"] = keys[0]
    return headers


def percentiles_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p95/p99/max of ``values`` (seconds) in milliseconds, nearest rank."""
    if not values:
        return {"p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return round(ordered[index] * 1000, 2)

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": rank(1.0),
    }


class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client connection for the benchmark.

    httpx was measured against the API on this 2-core box: 580 req/s with 8 requests in
    flight, 217 with 64 (its pool costs more CPU as connections grow), while ``wrk`` got
    3100 req/s from the same server: the client, not the API, would have been measured.
    This speaks just what the API answers: a status line, headers, Content-Length.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host

    @classmethod
    async def open(cls, base_url: str) -> HttpConnection:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise OrderMeshError(f"need an http:// base URL, got {base_url!r}")
        port = url.port or 80
        reader, writer = await asyncio.open_connection(url.hostname, port)
        return cls(reader, writer, f"{url.hostname}:{port}")

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        lines = [f"{method} {path} HTTP/1.1", f"host: {self._host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method == "POST":
            lines.append(f"content-length: {len(body)}")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        length = None
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length is None:
            raise OrderMeshError(f"{method} {path}: answer without Content-Length")
        return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def _throughput(
    base_url: str, bodies: list[bytes], concurrency: int, headers: dict[str, str]
) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    next_index = 0

    async def worker(conn: HttpConnection) -> None:
        nonlocal next_index
        try:
            while next_index < len(bodies):
                body = bodies[next_index]
                next_index += 1
                start = time.perf_counter()
                status, _ = await conn.request("POST", "/orders", body, headers)
                statuses[str(status)] += 1
                latencies.append(time.perf_counter() - start)
        except (OSError, asyncio.IncompleteReadError) as exc:
            statuses[type(exc).__name__] += 1
        finally:
            await conn.close()

    conns = [await HttpConnection.open(base_url) for _ in range(concurrency)]
    # one request first: a cold producer (metadata, idempotence handshake) is not throughput
    status, answer = await conns[0].request("POST", "/orders", bodies[0], headers)
    if status != 202:
        raise OrderMeshError(f"POST /orders answered {status}: {answer[:300]!r}")
    start = time.perf_counter()
    await asyncio.gather(*(worker(conn) for conn in conns))
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
    result = asyncio.run(_throughput(base_url, bodies, concurrency, api_headers(settings)))
    log.info(
        "POST /orders: %.0f req/s at concurrency %d, p50 %s ms, p99 %s ms",
        result["requests_per_s"],
        concurrency,
        result["latency_ms"]["p50"],
        result["latency_ms"]["p99"],
    )
    return result


async def post_then_read(
    base_url: str, bodies: list[bytes], rate: float, headers: dict[str, str]
) -> dict[str, Any]:
    """POST each body at ``rate``/s, then read its order with ``GET ?wait=`` until it is
    decided: POST-ack, POST->RESERVED and POST->decided times, and the outcomes."""
    outcomes: Counter[str] = Counter()
    acked: list[float] = []
    reserved: list[float] = []
    decided: list[float] = []
    idle: list[tuple[float, HttpConnection]] = []

    async def connection() -> HttpConnection:
        # most recently used first; one idle longer than the server's keep-alive timeout
        # (uvicorn: 5 s) may be closed already
        while idle:
            used, conn = idle.pop()
            if time.monotonic() - used < IDLE_REUSE_S:
                return conn
            await conn.close()
        return await HttpConnection.open(base_url)

    async def one(body: bytes) -> None:
        conn = await connection()
        start = time.perf_counter()
        try:
            status, answer = await conn.request("POST", "/orders", body, headers)
            if status != 202:
                outcomes[f"post_{status}"] += 1
                idle.append((time.monotonic(), conn))
                return
            acked.append(time.perf_counter() - start)
            order_id = msgspec.json.decode(answer)["order_id"]
            status, answer = await conn.request("GET", f"/orders/{order_id}?wait={WAIT_S:g}")
        except (OSError, asyncio.IncompleteReadError) as exc:
            outcomes[type(exc).__name__] += 1
            await conn.close()
            return
        took = time.perf_counter() - start
        idle.append((time.monotonic(), conn))
        if status != 200:
            outcomes[f"get_{status}"] += 1
            return
        order_status = msgspec.json.decode(answer)["status"]
        outcomes[order_status] += 1
        if order_status != "PLACED":
            decided.append(took)
        if order_status == "RESERVED":
            reserved.append(took)

    tasks = []
    start = time.perf_counter()
    for i, body in enumerate(bodies):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body)))
    sent_s = time.perf_counter() - start
    await asyncio.gather(*tasks)
    for _, conn in idle:
        await conn.close()
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
    result = asyncio.run(post_then_read(base_url, bodies, rate, api_headers(settings)))
    log.info(
        "POST -> RESERVED at %.0f/s: p50 %s ms, p99 %s ms",
        rate,
        result["post_to_reserved_ms"]["p50"],
        result["post_to_reserved_ms"]["p99"],
    )
    return result
