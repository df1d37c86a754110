"""``HttpGateway``: the ``PaymentGateway`` seam spoken to ``ordermesh gateway`` over HTTP.

The client is aiohttp's: with a hundred calls in flight on one loop, httpx's
``AsyncClient`` (measured here against the gateway, the machine equally busy) answered
24 calls/s at 32 in flight where aiohttp answered 229/s at 128, and httpx's throughput
fell as concurrency rose, the opposite of what payments needs.

How an HTTP result becomes an outcome (``gateway.protocol``):

- 200: an ``Outcome``, approved or declined;
- 503, a refused connection, a connect timeout or no free pooled connection in time:
  ``GatewayUnavailableError`` (the request never reached the gateway, or it said it
  applied nothing);
- a read or write timeout, a connection dropped or reset before the whole reply, any
  other 5xx: ``GatewayUnknownOutcomeError`` (it may have been applied: look the key up);
- any 4xx: ``GatewayError`` with the gateway's problem detail (a bug of the caller, such
  as a key reused with other parameters: retrying cannot help).

Batches: with ``batch_max`` > 1 the operations called in one turn of the event loop go
out together, up to ``batch_max`` per ``POST /v1/batch``, and each call still gets its
own answer: the item's status maps as above (200, 503, 4xx), and a batch that fails as
a whole (no answer, a 503, another 5xx) fails each of its calls as that call would have
failed alone. A batch costs the gateway and payments one request instead of a hundred:
measured in ``ordermesh bench mesh`` (docs/performance.md).

``open_gateway(settings)`` is the factory payments calls; a real provider's adapter is
another ``PaymentGateway`` it returns (docs/payments.md).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec

from ordermesh.config import Settings
from ordermesh.errors import GatewayError, GatewayUnavailableError, GatewayUnknownOutcomeError
from ordermesh.gateway.protocol import Operation, Outcome, PaymentGateway
from ordermesh.gateway.wire import (
    DEFAULT_PAGE,
    MAX_BATCH,
    BatchReply,
    BatchResult,
    LedgerPage,
    OperationBody,
    OrderSummary,
    SummaryPage,
)

# idle pooled connections are closed before the server's keep-alive ends theirs (30 s),
# so a call rarely picks a connection the server is closing
KEEPALIVE_EXPIRY_S: Final = 15.0
# requests in flight at most, whatever the concurrency of operations
MAX_CONNECTIONS: Final = 256

_T = TypeVar("_T")
_operation = msgspec.json.Decoder(OperationBody)
_ledger_page = msgspec.json.Decoder(LedgerPage)
_summary_page = msgspec.json.Decoder(SummaryPage)
_batch_reply = msgspec.json.Decoder(BatchReply)
_encode = msgspec.json.Encoder().encode


class _Reply(NamedTuple):
    """An HTTP answer, read whole (so its connection goes back to the pool at once)."""

    where: str
    status: int
    reason: str
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


def _problem_detail(reply: _Reply) -> str:
    try:
        detail = reply.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail or reply.content[:200].decode("utf-8", "replace") or reply.reason)


class _Queued(NamedTuple):
    """An operation waiting for the next batch, and where its answer goes."""

    item: dict[str, Any]
    answer: asyncio.Future[Outcome]


class HttpGateway:
    """An async ``PaymentGateway`` over one pooled ``aiohttp.ClientSession``.

    ``max_connections`` bounds the requests in flight on the wire (more wait for a free
    connection, up to ``timeout_s``); ``timeout_s`` bounds the connect and each read.
    ``batch_max``: operations per request (1: one request per operation, on the
    operation's own endpoint). The session opens on the first call, on the loop that
    makes it.
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 5.0,
        max_connections: int = 128,
        batch_max: int = 1,
    ) -> None:
        if not 1 <= batch_max <= MAX_BATCH:
            raise ValueError(f"batch_max must be in 1..{MAX_BATCH}, not {batch_max}")
        self.base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._batch_max = batch_max
        self._session: aiohttp.ClientSession | None = None
        self._queue: list[_Queued] = []
        self._batches: set[asyncio.Task[None]] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, keepalive_timeout=KEEPALIVE_EXPIRY_S
                ),
                # ``connect`` covers the wait for a pooled connection too: past it, the
                # request never left
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self._timeout_s, sock_read=self._timeout_s
                ),
                raise_for_status=False,
            )
        return self._session

    # --- the PaymentGateway protocol -----------------------------------------------------

    async def authorize(
        self,
        key: str,
        *,
        order_id: str,
        amount_cents: int,
        currency: str,
        customer_id: str,
        card: str,
    ) -> Outcome:
        body = {
            "order_id": order_id,
            "amount_cents": amount_cents,
            "currency": currency,
            "customer_id": customer_id,
            "card": card,
        }
        if self._batch_max > 1:
            return await self._batched({"key": key, "operation": "authorize", **body})
        return await self._operate("/v1/authorizations", key, body)

    async def capture(self, key: str, *, authorization_id: str, amount_cents: int) -> Outcome:
        return await self._followup("capture", key, authorization_id, amount_cents)

    async def void(self, key: str, *, authorization_id: str) -> Outcome:
        return await self._followup("void", key, authorization_id, None)

    async def refund(self, key: str, *, authorization_id: str, amount_cents: int) -> Outcome:
        return await self._followup("refund", key, authorization_id, amount_cents)

    async def lookup(self, key: str) -> Outcome | None:
        response = await self._send("GET", "/v1/operations/" + quote(key, safe=""), read_only=True)
        if response.status == 404:
            return None
        return self._decode(response, _operation).outcome()

    async def close(self) -> None:
        # nobody waits for a batch still out any more: its calls were given up
        for task in list(self._batches):
            task.cancel()
        if self._batches:
            await asyncio.wait(set(self._batches), timeout=self._timeout_s)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the ledger (what verify reads) --------------------------------------------------

    async def ledger(
        self, *, after: int = 0, page_size: int = DEFAULT_PAGE
    ) -> AsyncIterator[OperationBody]:
        """Every ledger entry with ``seq > after``, in order, a page at a time."""
        cursor: int | None = after
        while cursor is not None:
            params = {"after": cursor, "limit": page_size}
            page = self._decode(await self._read("/v1/ledger", params), _ledger_page)
            for entry in page.entries:
                yield entry
            cursor = page.next_after

    async def ledger_summary(self, *, page_size: int = DEFAULT_PAGE) -> dict[str, OrderSummary]:
        """The money of every order in the ledger, by order id."""
        found: dict[str, OrderSummary] = {}
        cursor: str | None = ""
        while cursor is not None:
            params = {"after": cursor, "limit": page_size}
            page = self._decode(await self._read("/v1/ledger/orders", params), _summary_page)
            found.update((summary.order_id, summary) for summary in page.orders)
            cursor = page.next_after
        return found

    async def order_summary(self, order_id: str) -> OrderSummary | None:
        """One order's money in the ledger (None: the ledger has nothing of it)."""
        response = await self._read("/v1/ledger/orders", {"order_id": order_id})
        orders = self._decode(response, _summary_page).orders
        return orders[0] if orders else None

    async def faults(self, changes: dict[str, Any] | None = None) -> dict[str, Any]:
        """The gateway's fault settings, after applying ``changes`` when given."""
        if changes is None:
            response = await self._read("/admin/faults", {})
        else:
            response = await self._send("POST", "/admin/faults", json=changes, read_only=True)
            self._check(response)
        result: dict[str, Any] = response.json()
        return result

    # --- batches -------------------------------------------------------------------------

    async def _followup(
        self, operation: Operation, key: str, authorization_id: str, amount_cents: int | None
    ) -> Outcome:
        body = {} if amount_cents is None else {"amount_cents": amount_cents}
        if self._batch_max > 1:
            item = {"key": key, "operation": operation, "authorization_id": authorization_id}
            return await self._batched({**item, **body})
        return await self._operate(f"{_auth_path(authorization_id)}/{operation}", key, body)

    async def _batched(self, item: dict[str, Any]) -> Outcome:
        """``item``'s outcome, sent with the other operations called in this loop turn."""
        loop = asyncio.get_running_loop()
        if not self._queue:
            # after the calls already scheduled in this turn have queued theirs
            loop.call_soon(self._flush)
        answer: asyncio.Future[Outcome] = loop.create_future()
        self._queue.append(_Queued(item, answer))
        return await answer

    def _flush(self) -> None:
        queued, self._queue = self._queue, []
        # a caller that gave up (its task cancelled) is not sent
        queued = [q for q in queued if not q.answer.done()]
        for start in range(0, len(queued), self._batch_max):
            task = asyncio.create_task(self._send_batch(queued[start : start + self._batch_max]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _send_batch(self, queued: list[_Queued]) -> None:
        try:
            reply = await self._send(
                "POST",
                "/v1/batch",
                data=_encode({"operations": [q.item for q in queued]}),
                headers={"Content-Type": "application/json"},
            )
            results = self._decode(reply, _batch_reply).results
            if len(results) != len(queued):
                raise GatewayUnknownOutcomeError(
                    f"{reply.where}: {len(results)} results for {len(queued)} operations"
                )
        except GatewayError as exc:
            # the batch failed as a whole: each call as it would have alone
            for q in queued:
                _answer(q.answer, exception=type(exc)(str(exc)))
            return
        except BaseException as exc:
            for q in queued:
                _answer(q.answer, exception=GatewayUnknownOutcomeError(f"batch failed: {exc!r}"))
            raise
        for q, result in zip(queued, results, strict=True):
            if result.key != q.item["key"]:
                _answer(
                    q.answer,
                    exception=GatewayUnknownOutcomeError(
                        f"{reply.where}: result for {result.key!r} where {q.item['key']!r} was"
                        " expected"
                    ),
                )
            else:
                _answer_result(q.answer, reply.where, result)

    # --- plumbing ------------------------------------------------------------------------

    async def _operate(self, path: str, key: str, body: dict[str, Any]) -> Outcome:
        response = await self._send("POST", path, json=body, headers={"Idempotency-Key": key})
        return self._decode(response, _operation).outcome()

    async def _read(self, path: str, params: dict[str, Any]) -> _Reply:
        response = await self._send("GET", path, params=params, read_only=True)
        self._check(response)
        return response

    async def _send(
        self, method: str, path: str, *, read_only: bool = False, **kwargs: Any
    ) -> _Reply:
        where = f"{method} {self.base_url}{path}"
        try:
            async with self._client().request(method, self.base_url + path, **kwargs) as answer:
                response = _Reply(where, answer.status, answer.reason or "", await answer.read())
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # the request never left: nothing can have been applied
            raise GatewayUnavailableError(f"{where}: gateway unreachable: {exc!r}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # a timeout or a cut after the request went out: it may have been applied
            cls = GatewayUnavailableError if read_only else GatewayUnknownOutcomeError
            raise cls(f"{where}: no answer: {exc!r}") from exc
        status = response.status
        if status == 503:
            raise GatewayUnavailableError(f"{where}: 503 not applied: {_problem_detail(response)}")
        if status >= 500:
            cls = GatewayUnavailableError if read_only else GatewayUnknownOutcomeError
            raise cls(f"{where}: {status}: {_problem_detail(response)}")
        return response

    def _check(self, response: _Reply) -> None:
        if response.status >= 400:
            raise GatewayError(f"{response.where}: {response.status}: {_problem_detail(response)}")

    def _decode(self, response: _Reply, decoder: msgspec.json.Decoder[_T]) -> _T:
        self._check(response)
        try:
            return decoder.decode(response.content)
        except msgspec.DecodeError as exc:
            # a 200 whose body is not ours (a proxy, a truncated reply): no known outcome
            raise GatewayUnknownOutcomeError(f"{response.where}: unreadable answer: {exc}") from exc


def _answer(
    future: asyncio.Future[Outcome],
    *,
    outcome: Outcome | None = None,
    exception: BaseException | None = None,
) -> None:
    if future.done():
        return  # its caller gave up waiting
    if exception is not None:
        future.set_exception(exception)
    elif outcome is not None:
        future.set_result(outcome)


def _answer_result(future: asyncio.Future[Outcome], where: str, result: BatchResult) -> None:
    """One operation's result in a batch, mapped as its own call's answer would be."""
    status = result.status
    if status == 200 and result.outcome is not None:
        _answer(future, outcome=result.outcome.outcome())
    elif status == 503:
        detail = f"{where} {result.key}: 503 not applied: {result.detail}"
        _answer(future, exception=GatewayUnavailableError(detail))
    elif 400 <= status < 500:
        _answer(future, exception=GatewayError(f"{where} {result.key}: {status}: {result.detail}"))
    else:
        detail = f"{where} {result.key}: {status}: {result.detail or 'no outcome'}"
        _answer(future, exception=GatewayUnknownOutcomeError(detail))


def _auth_path(authorization_id: str) -> str:
    return "/v1/authorizations/" + quote(authorization_id, safe="")


def open_gateway(settings: Settings) -> PaymentGateway:
    """The payment gateway payments talks to, as the settings name it."""
    return HttpGateway(
        settings.gateway_base_url(),
        timeout_s=settings.payments_timeout_s,
        max_connections=min(settings.payments_concurrency, MAX_CONNECTIONS),
        batch_max=settings.gateway_batch_max,
    )


def read_ledger_summary(settings: Settings) -> dict[str, OrderSummary]:
    """Every order's money in the gateway's ledger, from synchronous code (verify).

    Raises ``GatewayError`` (a subclass of it) when the gateway cannot answer.
    """

    async def read() -> dict[str, OrderSummary]:
        gateway = HttpGateway(
            settings.gateway_base_url(), timeout_s=max(settings.payments_timeout_s, 30.0)
        )
        try:
            return await gateway.ledger_summary()
        finally:
            await gateway.close()

    return asyncio.run(read())
