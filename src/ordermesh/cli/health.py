"""`ordermesh health`: ask a running service's ``/health`` and exit 0 (healthy) or 1.

What container healthchecks run (the image's ``HEALTHCHECK``, compose's ``healthcheck``):
a consumer service answers on its metrics port (``ORDERMESH_METRICS_PORT``), the API and
the dashboard on their own ``--port`` (``--url``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Annotated, Any

import typer
from rich.markup import escape

from ordermesh.cli.common import (
    EXIT_CHECK_FAILED,
    EXIT_USAGE,
    AsJson,
    app,
    console,
    err_console,
)

DEFAULT_TIMEOUT_S = 5.0


def probe(url: str, timeout_s: float) -> tuple[bool, dict[str, Any]]:
    """(healthy, the JSON body or what went wrong) of one GET ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:  # 503 and friends still carry the report
        status, raw = exc.code, exc.read()
    except (OSError, ValueError) as exc:  # refused, timed out, a bad URL
        return False, {"status": "unreachable", "error": str(getattr(exc, "reason", exc))}
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"body": raw[:200].decode(errors="replace")}
    if not isinstance(body, dict):
        body = {"body": body}
    body.setdefault("http_status", status)
    return status == 200, body


@app.command("health")
def health(
    url: Annotated[
        str | None,
        typer.Option(help="The health URL to ask, e.g. http://127.0.0.1:8080/health (the API)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Ask http://HOST:PORT/health: a consumer service's metrics port.",
            envvar="ORDERMESH_METRICS_PORT",
            show_envvar=True,
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Host of --port.")] = "127.0.0.1",
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the answer.", min=0.1)
    ] = DEFAULT_TIMEOUT_S,
    as_json: AsJson = False,
) -> None:
    """Ask a running service's /health; exit 0 when it is healthy, 1 when not."""
    if url is None:
        if not port:
            err_console.print(
                "[red]error:[/red] nothing to ask: give --url, or --port"
                " (or ORDERMESH_METRICS_PORT) of a service's metrics port"
            )
            raise typer.Exit(EXIT_USAGE)
        url = f"http://{host}:{port}/health"
    healthy, body = probe(url, timeout)
    if as_json:
        print(json.dumps(body))
    else:
        status = body.get("status", "unknown")
        summary = f"{url}: {status}"
        if "error" in body:
            summary += f" ({body['error']})"
        console.print(escape(summary), style=None if healthy else "red", soft_wrap=True)
    if not healthy:
        raise typer.Exit(EXIT_CHECK_FAILED)
