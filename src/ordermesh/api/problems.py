"""RFC 9457 problem details: every error of the HTTP API is ``application/problem+json``.

``HTTPProblem`` extends Starlette's ``HTTPException`` (the HTTP layer's own control flow,
not a failure of OrderMesh, hence not in ``ordermesh.errors``): a handler raises it and
the app's exception handler renders it. Problem ``type``\\ s are URNs, so they name the
kind of failure without pointing at a web page that does not exist.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, Final

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ordermesh.errors import StoreError

ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
TYPE_PREFIX: Final = "urn:ordermesh:problem:"


class Problem(msgspec.Struct, frozen=True):
    """The body of an error response."""

    type: str
    title: str
    status: int
    detail: str


class HTTPProblem(HTTPException):
    """An error answer: ``status`` with a problem ``kind`` (the last part of its type)."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.kind = kind
        self.title = title or HTTPStatus(status).phrase

    def response(self) -> Response:
        return problem_response(
            self.status_code, self.kind, self.detail, title=self.title, headers=self.headers
        )


def problem_response(
    status: int,
    kind: str,
    detail: str,
    *,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = Problem(
        type=TYPE_PREFIX + kind,
        title=title or HTTPStatus(status).phrase,
        status=status,
        detail=detail,
    )
    return Response(
        msgspec.json.encode(body),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=dict(headers) if headers else None,
    )


# Problem kinds of the HTTP statuses Starlette raises on its own (routing, methods).
STATUS_KINDS: Final[dict[int, str]] = {
    400: "bad-request",
    401: "unauthorized",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "validation-error",
    500: "internal-error",
    503: "unavailable",
}


def kind_for(status: int) -> str:
    return STATUS_KINDS.get(status, "about-blank")


async def _http_error(_request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPProblem):
        return exc.response()
    assert isinstance(exc, HTTPException)
    return problem_response(
        exc.status_code, kind_for(exc.status_code), exc.detail, headers=exc.headers
    )


def exception_handlers(
    log: logging.Logger, *, store_kind: str, store: str, store_in_log: str
) -> dict[Any, ExceptionHandler]:
    """An app's handlers: every error answered as a problem, logged to ``log``.

    ``HTTPProblem`` and Starlette's own errors answer as raised; a ``StoreError`` is a
    503 ``store_kind`` ("``store`` unavailable", retry after 1 s: the statement that
    failed changed nothing); anything else a 500, its traceback logged.
    """

    async def store_error(_request: Request, exc: Exception) -> Response:
        log.warning("%s unavailable: %s", store_in_log, exc)
        return problem_response(
            503, store_kind, f"{store} unavailable: {exc}", headers={"Retry-After": "1"}
        )

    async def server_error(_request: Request, exc: Exception) -> Response:
        log.error("unhandled error: %r", exc, exc_info=exc)
        return problem_response(500, "internal-error", "internal error")

    return {HTTPException: _http_error, StoreError: store_error, Exception: server_error}
