"""``ordermesh gateway``: a card processor's API over HTTP, with faults on demand.

Operations (each needs an ``Idempotency-Key`` header; a key is applied at most once, a
repeat with the same parameters answers the first answer, other parameters are a 409):

- ``POST /v1/authorizations`` {order_id, amount_cents, currency, customer_id, card}
- ``POST /v1/authorizations/{id}/capture`` {amount_cents}
- ``POST /v1/authorizations/{id}/void`` {} (or no body)
- ``POST /v1/authorizations/{id}/refund`` {amount_cents}

each answering 200 with a ``wire.OperationBody``, approved or declined, and
``POST /v1/batch`` {operations: [{key, operation, ...that call's body, authorization_id}]}
answering 200 with one result per operation, in order (``wire.BatchReply``): the status
its own call would have had, and its outcome. Reads:
``GET /v1/operations/{key}`` (404: never applied), ``GET /v1/ledger?after=&limit=``,
``GET /v1/ledger/orders?after=&limit=&order_id=``, ``GET /health``, ``GET /metrics``.
Faults: ``GET``/``POST /admin/faults`` (``gateway.faults``). Bad input is a 4xx problem.

One process, one event loop, and the decision of a call (read its key, read its
authorization, append) has no ``await`` inside: calls never interleave there, so two
concurrent calls with one key cannot both apply, and no lock is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter as Tally
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ordermesh.api.http import int_param, json_response, lifespan_app, metrics_response
from ordermesh.api.idempotency import valid_key
from ordermesh.api.problems import HTTPProblem, exception_handlers
from ordermesh.errors import StoreError
from ordermesh.gateway.faults import Fate, FaultConfig, Faults, merged
from ordermesh.gateway.ledger import Ledger
from ordermesh.gateway.rules import Call, Decision, decide_followup, fingerprint, fold
from ordermesh.gateway.wire import (
    DEFAULT_PAGE,
    MAX_BATCH,
    MAX_PAGE,
    AmountBody,
    AuthorizeBody,
    BatchBody,
    BatchItem,
    BatchReply,
    BatchResult,
    OperationBody,
    VoidBody,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 16 * 1024
MAX_BATCH_BYTES: Final = MAX_BATCH * 1024
SUMMARY_EVERY_S: Final = 10.0
# how long a dropped connection waits for the server to notice it is gone
DROP_WAIT_S: Final = 1.0
TRANSPORT_SCOPE_KEY: Final = "ordermesh.transport"

_B = TypeVar("_B")
_untyped = msgspec.json.Decoder()


class GatewayMetrics:
    """Calls per operation and outcome, in a registry of this app's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = Counter(
            "ordermesh_gateway_calls",
            "Gateway calls by operation (or lookup) and outcome: approved, declined, replayed,"
            " conflict, invalid, error (503 fault), timeout (hung, not applied), lost (applied,"
            " no reply), found, unknown.",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ordermesh_gateway_calls_in_flight",
            "Operation calls received and not yet answered (delayed or held by a fault).",
            registry=self.registry,
        )
        self.batch_requests = Counter(
            "ordermesh_gateway_batch_requests",
            "Batch requests (POST /v1/batch) received.",
            registry=self.registry,
        )
        self.batch_operations = Counter(
            "ordermesh_gateway_batch_operations",
            "Operations received in batch requests.",
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], Any] = {}
        # since the last summary log line
        self.window: Tally[tuple[str, str]] = Tally()

    def count(self, operation: str, outcome: str) -> None:
        pair = (operation, outcome)
        child = self._children.get(pair)
        if child is None:
            child = self._children[pair] = self.calls.labels(operation, outcome)
        child.inc()
        self.window[pair] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DropResponse(Response):
    """No answer at all: the connection is closed under the request (a lost reply)."""

    def __init__(self) -> None:
        super().__init__(b"", status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = scope.get(TRANSPORT_SCOPE_KEY)
        if transport is None:
            # not under uvicorn: start a reply and never finish it, which the server
            # ends by closing the connection
            await send({"type": "http.response.start", "status": 200, "headers": []})
            return
        transport.close()
        # once the server saw the connection go it sends nothing more
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DROP_WAIT_S):
                while (await receive())["type"] != "http.disconnect":
                    pass


class ExposeTransport:
    """Outermost ASGI layer: puts uvicorn's transport of the connection in the scope, so
    ``DropResponse`` can cut it (ASGI has no message for "close without answering")."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # uvicorn's send is a method of the request cycle that owns the transport
            cycle = getattr(send, "__self__", None)
            scope[TRANSPORT_SCOPE_KEY] = getattr(cycle, "transport", None)
        await self.app(scope, receive, send)


class GroupCommit:
    """Commits the ledger once for all the calls that appended in one turn of the loop.

    A call appends its row (no ``await``), then waits here; the commit runs once the
    calls already scheduled ran, so under load many rows share one commit and at low
    load a call waits for nothing but its own. A failed commit fails every waiting call
    with a 500: whether SQLite kept the rows is not certain, so the outcome is unknown
    (the caller looks its key up)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._waiting: list[asyncio.Future[None]] = []

    async def durable(self) -> None:
        """Return once nothing appended so far is uncommitted."""
        if not self._ledger.pending:
            return
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._commit)
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append(future)
        await future

    def _commit(self) -> None:
        waiting, self._waiting = self._waiting, []
        try:
            self._ledger.commit()
        except StoreError as exc:
            log.error("%s: %d calls answered 500 (outcome unknown)", exc, len(waiting))
            failure = HTTPProblem(
                500, "ledger-commit-failed", f"the ledger commit failed, outcome unknown: {exc}"
            )
            for future in waiting:
                if not future.done():
                    future.set_exception(failure)
            return
        for future in waiting:
            if not future.done():  # a caller that went away cancelled its wait
                future.set_result(None)


class Gateway:
    """The endpoints of one gateway; the ledger opens in ``start``, closes in ``stop``."""

    def __init__(self, db_path: Path, faults: FaultConfig | None = None) -> None:
        self.db_path = db_path
        self.faults = Faults(faults)
        self.metrics = GatewayMetrics()
        self._ledger: Ledger | None = None
        self._commits: GroupCommit | None = None
        self._summary: asyncio.Task[None] | None = None
        self._window_started = time.monotonic()

    # --- lifespan ----------------------------------------------------------------------

    async def start(self) -> None:
        self._ledger = Ledger(self.db_path)
        self._commits = GroupCommit(self._ledger)
        self._summary = asyncio.create_task(self._log_summaries(), name="gateway-summary")
        log.info(
            "payment gateway up: ledger %s (%d entries), faults %s",
            self.db_path,
            self._ledger.last_seq(),
            _describe(self.faults.config),
        )

    async def stop(self) -> None:
        if self._summary is not None:
            self._summary.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._summary
        self._log_window()
        if self._ledger is not None:
            if self._ledger.pending:
                self._ledger.commit()  # rows whose callers left before their commit ran
            self._ledger.close()
        log.info("payment gateway stopped")

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "gateway not started"
        return self._ledger

    @property
    def commits(self) -> GroupCommit:
        assert self._commits is not None, "gateway not started"
        return self._commits

    async def _log_summaries(self) -> None:
        while True:
            await asyncio.sleep(SUMMARY_EVERY_S)
            self._log_window()

    def _log_window(self) -> None:
        """One line of what the calls since the last one came to (none: no line)."""
        window = self.metrics.window
        total = sum(window.values())
        now = time.monotonic()
        elapsed_s, self._window_started = max(now - self._window_started, 1e-3), now
        if not total:
            return
        parts = ", ".join(f"{op} {outcome} {n}" for (op, outcome), n in sorted(window.items()))
        log.info(
            "gateway: %d calls in %.0fs (%.0f/s): %s", total, elapsed_s, total / elapsed_s, parts
        )
        window.clear()

    # --- operations --------------------------------------------------------------------

    async def authorize(self, request: Request) -> Response:
        body = await _decode(request, AuthorizeBody)
        call = Call(
            "authorize",
            order_id=body.order_id,
            amount_cents=body.amount_cents,
            currency=body.currency,
            customer_id=body.customer_id,
            card=body.card,
        )
        return await self._operate(request, call)

    async def capture(self, request: Request) -> Response:
        body = await _decode(request, AmountBody)
        auth_id = request.path_params["authorization_id"]
        return await self._operate(
            request, Call("capture", authorization_id=auth_id, amount_cents=body.amount_cents)
        )

    async def void(self, request: Request) -> Response:
        await _decode(request, VoidBody, empty_ok=True)
        auth_id = request.path_params["authorization_id"]
        return await self._operate(request, Call("void", authorization_id=auth_id))

    async def refund(self, request: Request) -> Response:
        body = await _decode(request, AmountBody)
        auth_id = request.path_params["authorization_id"]
        return await self._operate(
            request, Call("refund", authorization_id=auth_id, amount_cents=body.amount_cents)
        )

    async def batch(self, request: Request) -> Response:
        """Many operations in one request, each decided as its own call would be."""
        body = await _decode(request, BatchBody, limit=MAX_BATCH_BYTES)
        items = body.operations
        self.metrics.batch_requests.inc()
        self.metrics.batch_operations.inc(len(items))
        self.metrics.in_flight.inc(len(items))
        try:
            return await self._batch(request, items)
        finally:
            self.metrics.in_flight.dec(len(items))

    async def _batch(self, request: Request, items: list[BatchItem]) -> Response:
        whole = self.faults.request_fate()
        if whole.hang:
            for item in items:
                self.metrics.count(item.operation, "timeout")
            await _hold(request, self.faults.config.hang_s)
            raise _unavailable("injected fault: the batch hung and was not applied")
        fates = [self.faults.item_fate() for _ in items]
        delay = max(fate.delay_s for fate in fates)
        if delay > 0:
            # an answer for all once the slowest is decided
            await asyncio.sleep(delay)
        results = [self._batch_item(item, fate) for item, fate in zip(items, fates, strict=True)]
        await self.commits.durable()
        if whole.lose_reply:
            for result in results:
                if result.outcome is not None:
                    self.metrics.count(result.outcome.operation, "lost")
            return DropResponse()
        return json_response(BatchReply(results))

    def _batch_item(self, item: BatchItem, fate: Fate) -> BatchResult:
        op = item.operation
        if not valid_key(item.key):
            self.metrics.count(op, "invalid")
            return BatchResult(item.key, 400, detail="a key of 1..255 visible ASCII characters")
        try:
            call = _batch_call(item)
        except msgspec.ValidationError as exc:
            self.metrics.count(op, "invalid")
            return BatchResult(item.key, 422, detail=f"invalid operation: {exc}")
        if fate.error:
            self.metrics.count(op, "error")
            return BatchResult(item.key, 503, detail="injected fault: nothing was applied")
        try:
            body, replayed = self._apply(item.key, call, fate)
        except HTTPProblem as problem:
            return BatchResult(item.key, problem.status_code, detail=str(problem.detail))
        if replayed:
            self.metrics.count(op, "replayed")
        else:
            self.metrics.count(op, "approved" if body.approved else "declined")
        return BatchResult(item.key, 200, outcome=body, replayed=replayed)

    async def _operate(self, request: Request, call: Call) -> Response:
        op = call.operation
        key = request.headers.get("idempotency-key")
        if key is None or not valid_key(key):
            self.metrics.count(op, "invalid")
            raise HTTPProblem(
                400,
                "bad-request",
                "an Idempotency-Key header of 1..255 visible ASCII characters is required",
            )
        self.metrics.in_flight.inc()
        try:
            return await self._decide(request, call, key)
        finally:
            self.metrics.in_flight.dec()

    async def _decide(self, request: Request, call: Call, key: str) -> Response:
        op = call.operation
        fate = self.faults.operation_fate()
        if fate.error:
            self.metrics.count(op, "error")
            raise _unavailable("injected fault: the gateway is unavailable; nothing was applied")
        if fate.hang:
            self.metrics.count(op, "timeout")
            await _hold(request, self.faults.config.hang_s)
            raise _unavailable("injected fault: the call hung and was not applied")
        if fate.delay_s > 0:
            await asyncio.sleep(fate.delay_s)
        body, replayed = self._apply(key, call, fate)
        # a replay may be of a row appended in this turn: it is answered once committed too
        await self.commits.durable()
        if fate.lose_reply:
            self.metrics.count(op, "lost")
            return DropResponse()
        if replayed:
            self.metrics.count(op, "replayed")
            return json_response(body, headers={"Idempotent-Replayed": "true"})
        self.metrics.count(op, "approved" if body.approved else "declined")
        return json_response(body)

    def _apply(self, key: str, call: Call, fate: Fate) -> tuple[OperationBody, bool]:
        """The ledger row of ``key``: the one recorded, or the one this call appends.

        Synchronous on purpose: nothing else runs between the read and the append."""
        ledger = self.ledger
        digest = fingerprint(call)
        found = ledger.get(key)
        if found is not None:
            recorded_digest, recorded = found
            if recorded_digest != digest:
                self.metrics.count(call.operation, "conflict")
                raise HTTPProblem(
                    409,
                    "idempotency-conflict",
                    f"Idempotency-Key {key!r} was applied to another call ({recorded.operation}"
                    " with other parameters); a key is one operation: use a new key",
                )
            return recorded, True
        if call.operation == "authorize":
            reason = self.faults.decline_reason(call.card, call.customer_id, fate)
            auth_id = "" if reason else "auth_" + secrets.token_hex(12)
            decision = Decision(
                not reason, reason, call.order_id, auth_id, call.amount_cents, call.currency
            )
        else:
            state = fold(ledger.history(call.authorization_id))
            decision = decide_followup(call, state)
        return ledger.append(key, digest, call.operation, decision, time.time()), False

    # --- reads -------------------------------------------------------------------------

    async def lookup(self, request: Request) -> Response:
        key: str = request.path_params["key"]
        fate = self.faults.lookup_fate()
        if fate.error:
            self.metrics.count("lookup", "error")
            raise _unavailable("injected fault: the gateway is unavailable")
        if fate.delay_s > 0:
            await asyncio.sleep(fate.delay_s)
        found = self.ledger.get(key) if valid_key(key) else None
        await self.commits.durable()
        if found is None:
            self.metrics.count("lookup", "unknown")
            raise HTTPProblem(404, "unknown-key", f"no operation was applied under key {key!r}")
        self.metrics.count("lookup", "found")
        return json_response(found[1])

    async def ledger_page(self, request: Request) -> Response:
        after = int_param(request, "after", 0, 2**63 - 1, 0)
        limit = int_param(request, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
        page = await asyncio.to_thread(self.ledger.page, after, limit)
        return json_response(page)

    async def order_summaries(self, request: Request) -> Response:
        after = request.query_params.get("after", "")
        order_id = request.query_params.get("order_id")
        limit = int_param(request, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
        page = await asyncio.to_thread(self.ledger.summaries, after, limit, order_id)
        return json_response(page)

    async def health(self, _request: Request) -> Response:
        try:
            last = await asyncio.to_thread(self.ledger.last_seq)
        except StoreError as exc:
            return json_response(
                {"status": "unhealthy", "ledger": {"ok": False, "error": str(exc)}}, 503
            )
        body = {
            "status": "ok",
            "ledger": {"ok": True, "path": str(self.db_path), "entries": last},
            "faults": self.faults.config,
        }
        return json_response(body)

    async def metrics_endpoint(self, _request: Request) -> Response:
        return metrics_response(self.metrics.render())

    async def admin_faults(self, request: Request) -> Response:
        if request.method == "POST":
            raw = await _read_body(request)
            try:
                changes = _untyped.decode(raw) if raw.strip() else {}
                config = merged(self.faults.config, changes)
            except msgspec.DecodeError as exc:
                raise HTTPProblem(400, "bad-request", f"malformed JSON: {exc}") from None
            except ValueError as exc:
                raise HTTPProblem(422, "validation-error", f"invalid faults: {exc}") from None
            self.faults.configure(config)
            log.info("faults changed: %s", _describe(config))
        return json_response(self.faults.config)


def _describe(config: FaultConfig) -> str:
    defaults = FaultConfig()
    changed = {
        name: getattr(config, name)
        for name in config.__struct_fields__
        if getattr(config, name) != getattr(defaults, name)
    }
    return (
        ", ".join(f"{k}={sorted(v) if isinstance(v, frozenset) else v}" for k, v in changed.items())
        or "none"
    )


async def _hold(request: Request, seconds: float) -> None:
    """Wait ``seconds``, or until the caller hangs up (it gave up: hold it no longer)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass


def _unavailable(detail: str) -> HTTPProblem:
    return HTTPProblem(503, "unavailable", detail, headers={"Retry-After": "1"})


async def _read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, "payload-too-large", f"request body over {limit} bytes")
    raw = await request.body()
    if len(raw) > limit:
        raise HTTPProblem(413, "payload-too-large", f"request body over {limit} bytes")
    return raw


def _batch_call(item: BatchItem) -> Call:
    """The call one operation of a batch stands for, validated as that call's body is
    (``msgspec.ValidationError`` otherwise)."""
    op = item.operation
    if op == "authorize":
        auth = msgspec.convert(
            {
                "order_id": item.order_id,
                "amount_cents": item.amount_cents,
                "currency": item.currency,
                "customer_id": item.customer_id,
                "card": item.card,
            },
            AuthorizeBody,
        )
        return Call(
            op,
            order_id=auth.order_id,
            amount_cents=auth.amount_cents,
            currency=auth.currency,
            customer_id=auth.customer_id,
            card=auth.card,
        )
    if not 1 <= len(item.authorization_id) <= 64:
        raise msgspec.ValidationError("authorization_id: 1..64 characters")
    if op == "void":
        return Call(op, authorization_id=item.authorization_id)
    amount = msgspec.convert({"amount_cents": item.amount_cents}, AmountBody)
    return Call(op, authorization_id=item.authorization_id, amount_cents=amount.amount_cents)


async def _decode(
    request: Request, kind: type[_B], *, empty_ok: bool = False, limit: int = MAX_BODY_BYTES
) -> _B:
    raw = await _read_body(request, limit)
    if not raw.strip():
        if empty_ok:
            raw = b"{}"
        else:
            raise HTTPProblem(400, "bad-request", "empty body: expected a JSON object")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise HTTPProblem(422, "validation-error", f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise HTTPProblem(400, "bad-request", f"malformed JSON: {exc}") from None


def create_gateway_app(db_path: Path, faults: FaultConfig | None = None) -> ASGIApp:
    """The gateway's ASGI app; the ledger opens when it starts (lifespan)."""
    gateway = Gateway(db_path, faults)
    by_id = "/v1/authorizations/{authorization_id}"
    endpoints: list[tuple[str, Callable[[Request], Any], list[str]]] = [
        ("/v1/authorizations", gateway.authorize, ["POST"]),
        (by_id + "/capture", gateway.capture, ["POST"]),
        (by_id + "/void", gateway.void, ["POST"]),
        (by_id + "/refund", gateway.refund, ["POST"]),
        ("/v1/batch", gateway.batch, ["POST"]),
        ("/v1/operations/{key:path}", gateway.lookup, ["GET"]),
        ("/v1/ledger", gateway.ledger_page, ["GET"]),
        ("/v1/ledger/orders", gateway.order_summaries, ["GET"]),
        ("/admin/faults", gateway.admin_faults, ["GET", "POST"]),
        ("/health", gateway.health, ["GET"]),
        ("/metrics", gateway.metrics_endpoint, ["GET"]),
    ]
    routes = [Route(path, endpoint, methods=methods) for path, endpoint, methods in endpoints]

    app = lifespan_app(
        routes,
        start=gateway.start,
        stop=gateway.stop,
        # a failed ledger append did not happen (a SQLite statement is atomic): not applied
        exception_handlers=exception_handlers(
            log, store_kind="ledger-unavailable", store="ledger", store_in_log="gateway ledger"
        ),
    )
    app.state.gateway = gateway
    return ExposeTransport(app)
