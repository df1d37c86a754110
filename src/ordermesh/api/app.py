"""The orders HTTP API: routes, request checks and the app's lifespan.

Answers come only after the fact they report: 202 for an order once Kafka acknowledged
its ``OrderPlaced``, a status from the tracker's store. Bad input is always a 4xx
problem: malformed JSON 400, schema violations 422, bodies over 64 KiB 413.

With API keys configured, every ``/orders`` endpoint (reads included: an order names its
customer and items) requires one; ``/health``, ``/metrics`` and ``/openapi.json`` stay
open for probes, scrapers and client generators, and reveal no order. Each key is a
client that gets, lists and cancels only the orders it placed, an operator key every
order (``api/access.py``); idempotency keys are scoped per API key
(``api/idempotency.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import uuid
from typing import Any, Final
from urllib.parse import quote, urlencode

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ordermesh import lifecycle, schema
from ordermesh.api.access import OPEN, ApiKeys, Caller
from ordermesh.api.bodies import REQUEST_FIELDS, CancelAccepted, CancelRequest, OrderAccepted
from ordermesh.api.delivery import AsyncProducer
from ordermesh.api.health import HealthChecks
from ordermesh.api.http import JSON, int_param, json_response, lifespan_app, metrics_response
from ordermesh.api.idempotency import order_id_for_key, valid_key
from ordermesh.api.metrics import ApiMetrics, MetricsMiddleware
from ordermesh.api.openapi import MAX_WAIT_S, build_openapi
from ordermesh.api.problems import HTTPProblem, exception_handlers
from ordermesh.api.tracking import OrderReader, decided
from ordermesh.config import Settings
from ordermesh.errors import DecodeError, DeliveryError, StoreError
from ordermesh.kafka.admin import Admin
from ordermesh.kafka.client import make_admin
from ordermesh.kafka.producer import ProducerClient
from ordermesh.repeats import Repeats
from ordermesh.stores.factory import open_idempotency_store, open_order_queries
from ordermesh.stores.idempotency import IdempotencyStore
from ordermesh.stores.tracker import MAX_PAGE, ORDER_STATUSES, OrderStatus
from ordermesh.topics import COMMANDS, ORDERS

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = schema.MAX_MESSAGE_BYTES
# A cancel of an order still PLACED first waits this long for the inventory's decision.
CANCEL_DECISION_WAIT_S: Final = 5.0
# Where a CancelOrder applies: the sources of the lifecycle's OrderCancelled.
# the API answers 409 with the inventory's reason rather than send a command bound to be
# refused
CANCELLABLE: Final = lifecycle.CANCELLABLE
CANCEL_REFUSALS: Final = lifecycle.CANCEL_REFUSALS
HEALTH_PING_TIMEOUT_S: Final = 2.0

_untyped_json = msgspec.json.Decoder()
_cancel_decoder = msgspec.json.Decoder(CancelRequest)


def order_location(order_id: str) -> str:
    return "/orders/" + quote(order_id, safe="")


# --- request checks -------------------------------------------------------------------


def require_json_body(request: Request) -> None:
    """415 unless the Content-Type (when given) is JSON."""
    ctype = request.headers.get("content-type")
    if ctype is None:
        return  # no type given: the body must still parse as JSON
    media = ctype.split(";", 1)[0].strip().lower()
    if media != JSON and not (media.startswith("application/") and media.endswith("+json")):
        raise HTTPProblem(415, "unsupported-media-type", f"expected {JSON}, got {media!r}")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, or 413 once it is over ``limit`` (declared or actually streamed)."""
    declared = request.headers.get("content-length")
    too_large = HTTPProblem(413, "payload-too-large", f"request body over {limit} bytes")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise HTTPProblem(400, "bad-request", "invalid Content-Length") from None
    chunks: list[bytes] = []
    size = 0
    # chunked bodies declare no length: count what actually arrives
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """Untyped JSON: 400 for malformed input, 422 for JSON that cannot be held."""
    if not raw:
        raise HTTPProblem(400, "bad-request", "empty body: expected a JSON object")
    try:
        return _untyped_json.decode(raw)
    except msgspec.ValidationError as exc:  # valid JSON, e.g. a number out of range
        raise HTTPProblem(422, "validation-error", f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise HTTPProblem(400, "bad-request", f"malformed JSON: {exc}") from None
    except RecursionError:
        raise HTTPProblem(400, "bad-request", "malformed JSON: nested too deeply") from None


def number_param(request: Request, name: str, low: float, high: float, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise HTTPProblem(422, "validation-error", f"{name} must be a number in {low}..{high}")
    return value


def status_param(request: Request, name: str = "status") -> OrderStatus | None:
    """A status of ``lifecycle.STATUSES`` (422 for anything else), or None if absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    for status in ORDER_STATUSES:
        if raw == status:
            return status
    raise HTTPProblem(422, "validation-error", f"{name} must be one of {', '.join(ORDER_STATUSES)}")


def body_hash(order: schema.OrderPlaced) -> str:
    """Hash of what the client asked for: the validated order without server fields."""
    # api_client unset: the hash of a body stays what it was before orders had owners
    canonical = msgspec.structs.replace(
        order, order_id="", created_at=0.0, api_client=msgspec.UNSET
    )
    return hashlib.sha256(schema.encode(canonical)).hexdigest()


# --- the API ---------------------------------------------------------------------------


class OrdersApi:
    """Endpoints of one app; its resources open in ``start`` and close in ``stop``."""

    def __init__(
        self, settings: Settings, metrics: ApiMetrics, producer: ProducerClient | None = None
    ) -> None:
        self.settings = settings
        self._kafka_producer = producer
        self.metrics = metrics
        self.api_keys = ApiKeys.from_settings(settings)
        self.orders_topic = settings.topic(ORDERS)
        self.commands_topic = settings.topic(COMMANDS)
        self.openapi = msgspec.json.encode(build_openapi(authenticated=self.api_keys.enabled))
        self._producer: AsyncProducer | None = None
        self._reader: OrderReader | None = None
        self._keys: IdempotencyStore | None = None
        self._health: HealthChecks | None = None
        self._admin: Admin | None = None
        self._failures = Repeats(every=1000)  # produce failures since start

    # --- lifespan ----------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        self._keys = open_idempotency_store(settings)
        # read-only and lazy: the API may start before the tracker created its DB
        self._reader = OrderReader(open_order_queries(settings))
        self._producer = AsyncProducer(settings, producer=self._kafka_producer)
        self._producer.start()
        self._admin = make_admin(settings)
        self._health = HealthChecks(settings, self._admin)
        log.info(
            "orders API up: orders -> %s, commands -> %s, tracker db %s, api db %s, auth %s",
            self.orders_topic,
            self.commands_topic,
            settings.tracker_db_path(),
            settings.api_db_path(),
            self.api_keys.describe(),
        )

    async def stop(self) -> None:
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close)
        if self._reader is not None:
            self._reader.close()
        if self._keys is not None:
            self._keys.close()
        log.info("orders API stopped")

    @property
    def producer(self) -> AsyncProducer:
        assert self._producer is not None, "app not started"
        return self._producer

    @property
    def reader(self) -> OrderReader:
        assert self._reader is not None, "app not started"
        return self._reader

    @property
    def keys(self) -> IdempotencyStore:
        assert self._keys is not None, "app not started"
        return self._keys

    @property
    def health_checks(self) -> HealthChecks:
        assert self._health is not None, "app not started"
        return self._health

    # --- shared steps ------------------------------------------------------------------

    def authorize(self, request: Request) -> Caller:
        """401 unless the request carries a configured API key; its caller (``OPEN``
        without keys)."""
        if not self.api_keys.enabled:
            return OPEN
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer":
                given = token.strip()
        if given:
            caller = self.api_keys.identify(given.encode("latin-1"))  # the raw header bytes
            if caller is not None:
                return caller
        raise HTTPProblem(
            401,
            "unauthorized",
            "a valid API key is required (X-API-Key or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def produce(self, topic: str, key: str, value: bytes) -> None:
        try:
            await self.producer.produce(topic, key.encode(), value)
        except DeliveryError as exc:
            self.metrics.produce_failures.labels(topic).inc()
            if self._failures.failed():
                log.warning("%s (%d produce failures so far)", exc, self._failures.count)
            raise HTTPProblem(
                503,
                "kafka-unavailable",
                f"Kafka did not acknowledge the record for {key}: {exc}",
                headers={"Retry-After": "1"},
            ) from exc

    # --- endpoints ---------------------------------------------------------------------

    async def orders(self, request: Request) -> Response:
        # one route for both methods, so a 405 on /orders lists both in its Allow header
        if request.method == "POST":
            return await self.place_order(request)
        return await self.list_orders(request)

    async def place_order(self, request: Request) -> Response:
        caller = self.authorize(request)
        client = caller.client
        require_json_body(request)
        key = request.headers.get("idempotency-key")
        if key is not None and not valid_key(key):
            raise HTTPProblem(
                422, "validation-error", "Idempotency-Key must be 1..255 visible ASCII characters"
            )
        body = parse_json(await read_body(request))
        if not isinstance(body, dict):
            raise HTTPProblem(422, "validation-error", "body must be a JSON object")
        unknown = sorted(set(body) - set(REQUEST_FIELDS))
        if unknown:
            raise HTTPProblem(
                422,
                "validation-error",
                f"unknown field(s) {', '.join(map(repr, unknown))[:300]}; allowed: "
                f"{', '.join(REQUEST_FIELDS)} (the server sets order_id and created_at)",
            )
        order_id = order_id_for_key(key, client) if key is not None else "ord-" + uuid.uuid4().hex
        body.update(order_id=order_id, created_at=schema.now())
        try:
            # the shared decoder: exactly the checks every consumer of `orders` applies
            order = schema.decode_order(msgspec.json.encode(body))
        except DecodeError as exc:
            if exc.kind == "size":
                raise HTTPProblem(413, "payload-too-large", str(exc)) from None
            detail = str(exc).removeprefix("bad order: ")
            raise HTTPProblem(422, "validation-error", f"invalid order: {detail}") from None
        # bound to its client (a server field: a body naming one was refused above)
        order = msgspec.structs.replace(order, api_client=caller.owner)
        location = {"Location": order_location(order_id)}
        if key is None:
            await self.produce(self.orders_topic, order_id, schema.encode(order))
            self.metrics.orders_accepted.inc()
            return json_response(OrderAccepted(order_id), 202, location)

        digest = body_hash(order)
        record = await asyncio.to_thread(
            self.keys.reserve, client, key, digest, order_id, order.created_at
        )
        if record.body_hash != digest:
            # no order id here: without API keys every caller shares one key space, and
            # the key's order need not be this caller's
            raise HTTPProblem(
                409,
                "idempotency-conflict",
                "Idempotency-Key already used for another body; use a new key",
            )
        if record.acked_at is not None:
            self.metrics.idempotent_replays.inc()
            headers = {**location, "Idempotent-Replayed": "true"}
            return json_response(OrderAccepted(record.order_id), 200, headers)
        # first attempt, or a retry of one that got no ack (Kafka failed, the API crashed)
        # or a concurrent twin: produce the reserved record; identical bytes every time,
        # decided once by the inventory
        order = msgspec.structs.replace(order, created_at=record.created_at)
        await self.produce(self.orders_topic, order_id, schema.encode(order))
        if await asyncio.to_thread(self.keys.mark_acked, client, key, schema.now()):
            self.metrics.orders_accepted.inc()
            return json_response(OrderAccepted(order_id), 202, location)
        self.metrics.idempotent_replays.inc()  # a concurrent twin was acknowledged first
        return json_response(OrderAccepted(order_id), 200, location)

    async def get_order(self, request: Request) -> Response:
        sees = self.authorize(request).sees
        order_id: str = request.path_params["order_id"]
        wait = number_param(request, "wait", 0.0, MAX_WAIT_S, 0.0)
        # what ?wait= waits for (default: the decision)
        target = status_param(request)
        if not 0 < len(order_id) <= 64:
            raise HTTPProblem(404, "not-found", "unknown order")
        # another client's order reads as None: the same 404 as an unknown one
        if wait > 0:
            view = await self.reader.wait_for(order_id, wait, target, sees)
        else:
            view = await self.reader.get(order_id, sees)
        if view is None:
            raise HTTPProblem(
                404,
                "not-found",
                f"unknown order {order_id!r} (an order just accepted shows up within "
                "moments; ?wait=SECONDS waits for it)",
            )
        return json_response(view)

    async def list_orders(self, request: Request) -> Response:
        sees = self.authorize(request).sees
        params = request.query_params
        status = status_param(request)
        limit = int_param(request, "limit", 1, MAX_PAGE, 50)
        cursor = params.get("cursor")
        customer_id = params.get("customer_id")
        try:
            page = await self.reader.list_orders(
                status=status, customer_id=customer_id, limit=limit, cursor=cursor, api_client=sees
            )
        except ValueError as exc:
            raise HTTPProblem(400, "bad-request", str(exc)) from None
        headers = None
        if page.next_cursor is not None:
            query = {k: v for k, v in params.items() if k != "cursor"}
            query["cursor"] = page.next_cursor
            headers = {"Link": f'</orders?{urlencode(query)}>; rel="next"'}
        return json_response(page, headers=headers)

    async def cancel_order(self, request: Request) -> Response:
        sees = self.authorize(request).sees
        order_id: str = request.path_params["order_id"]
        raw = await read_body(request)
        reason = ""
        if raw.strip():
            require_json_body(request)
            parse_json(raw)  # 400 for malformed JSON before the typed decode
            try:
                reason = _cancel_decoder.decode(raw).reason
            except msgspec.ValidationError as exc:
                raise HTTPProblem(422, "validation-error", f"invalid body: {exc}") from None
        if not 0 < len(order_id) <= 64:
            raise HTTPProblem(404, "not-found", "unknown order")
        # another client's order reads as None: the same 404 as an unknown one, nothing sent
        view = await self.reader.get(order_id, sees)
        if view is None:
            raise HTTPProblem(404, "not-found", f"unknown order {order_id!r}")
        if not decided(view):
            view = await self.reader.wait_decided(order_id, CANCEL_DECISION_WAIT_S, sees)
            if view is None or not decided(view):
                raise HTTPProblem(
                    409,
                    "decision-pending",
                    f"order {order_id!r} is still PLACED (not yet decided); retry shortly",
                    headers={"Retry-After": "1"},
                )
        status = view.status
        location = {"Location": order_location(order_id)}
        if status == "CANCELLED":
            # idempotent: the cancel asked for is done, whoever asked first
            return json_response(
                CancelAccepted(order_id, status, "ALREADY_CANCELLED"), 200, location
            )
        if status not in CANCELLABLE:
            refusal = CANCEL_REFUSALS.get(status, "ALREADY_ENDED")
            raise HTTPProblem(
                409,
                "order-state-conflict",
                f"order {order_id!r} is {status}: it cannot be cancelled ({refusal})",
            )
        command = schema.CancelOrder(order_id=order_id, requested_at=schema.now(), reason=reason)
        await self.produce(self.commands_topic, order_id, schema.encode(command))
        self.metrics.cancels_requested.inc()
        return json_response(CancelAccepted(order_id, status), 202, location)

    async def health(self, _request: Request) -> Response:
        checks = self.health_checks
        kafka_ok, kafka = await checks.kafka_report()
        tracker: dict[str, Any] = {"ok": True, "error": None}
        try:
            await self.reader.ping()
        except StoreError as exc:
            tracker = {"ok": False, "error": str(exc)}
        api_db: dict[str, Any] = {"ok": True, "error": None}
        try:
            await asyncio.wait_for(asyncio.to_thread(self.keys.ping), HEALTH_PING_TIMEOUT_S)
        except (StoreError, TimeoutError) as exc:
            api_db = {"ok": False, "error": str(exc) or "timed out"}
        lag = await checks.lag_report()
        if checks.lag.snapshot.value is not None:
            self.metrics.set_lag(checks.lag.snapshot.value)
        healthy = kafka_ok and tracker["ok"] and api_db["ok"]
        body = {
            "status": "ok" if healthy else "unhealthy",
            "checks": {"kafka": kafka, "tracker_db": tracker, "api_db": api_db},
            "consumer_lag": lag,
        }
        return json_response(body, 200 if healthy else 503)

    async def metrics_endpoint(self, _request: Request) -> Response:
        await self.health_checks.kafka.get(wait_s=1.0)  # lag is skipped while Kafka is down
        snap = await self.health_checks.lag.get(wait_s=1.0)
        if snap.value is not None:
            self.metrics.set_lag(snap.value)
        return metrics_response(self.metrics.render())

    async def openapi_endpoint(self, _request: Request) -> Response:
        return Response(self.openapi, media_type=JSON)


def create_app(settings: Settings, *, producer: ProducerClient | None = None) -> Starlette:
    """The ASGI app; Kafka clients and databases open when it starts (lifespan).

    ``producer`` replaces the idempotent producer built from ``settings`` (unit tests
    pass a stand-in; it must call each ``on_delivery`` from its ``poll``).
    """
    metrics = ApiMetrics()
    api = OrdersApi(settings, metrics, producer)
    routes = [
        Route("/orders", api.orders, methods=["GET", "POST"]),
        Route("/orders/{order_id}", api.get_order, methods=["GET"]),
        Route("/orders/{order_id}/cancel", api.cancel_order, methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", api.openapi_endpoint, methods=["GET"]),
    ]

    app = lifespan_app(
        routes,
        start=api.start,
        stop=api.stop,
        exception_handlers=exception_handlers(
            log, store_kind="store-unavailable", store="database", store_in_log="tracker/api db"
        ),
        middleware=[Middleware(MetricsMiddleware, metrics=metrics, routes=routes)],
    )
    app.state.api = api
    return app
