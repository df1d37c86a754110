"""HTTP plumbing of the apps served with Starlette (the orders API, the payment gateway).

JSON answers, integer query parameters, the Prometheus page, and the app itself: its
resources open and close with its lifespan, and every error it answers is a problem
(``api/problems.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from ordermesh.api.problems import ExceptionHandler, HTTPProblem

JSON: Final = "application/json"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type=JSON, headers=headers)


def metrics_response(page: bytes) -> Response:
    """A rendered Prometheus registry as ``/metrics`` answers it."""
    return Response(page, media_type=CONTENT_TYPE_LATEST)


def int_param(request: Request, name: str, low: int, high: int, default: int) -> int:
    """The query parameter ``name`` as an integer in ``low..high`` (422 otherwise)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise HTTPProblem(422, "validation-error", f"{name} must be an integer in {low}..{high}")
    return value


def lifespan_app(
    routes: Sequence[BaseRoute],
    *,
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    exception_handlers: Mapping[Any, ExceptionHandler],
    middleware: Sequence[Middleware] | None = None,
) -> Starlette:
    """A Starlette app that awaits ``start`` before serving and ``stop`` once it ends."""

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await start()
        try:
            yield
        finally:
            await stop()

    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=exception_handlers,
        lifespan=lifespan,
    )
