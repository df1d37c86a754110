"""`ordermesh gateway`: the simulated card processor (its ledger, its faults) under uvicorn."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ordermesh.cli.common import DataDir, app, fail, make_settings
from ordermesh.errors import ConfigError


def _fault(help_text: str, name: str) -> Any:
    return typer.Option(help=help_text, envvar=f"ORDERMESH_GATEWAY_{name}", show_envvar=True)


@app.command("gateway")
def gateway_cmd(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Port to listen on.",
            envvar="ORDERMESH_GATEWAY_PORT",
            show_envvar=True,
        ),
    ] = None,
    data_dir: DataDir = None,
    latency_p50_ms: Annotated[
        float | None, _fault("Median latency of a call, ms (0: none).", "LATENCY_P50_MS")
    ] = None,
    latency_p99_ms: Annotated[
        float | None, _fault("99th percentile latency, ms (a lognormal fit).", "LATENCY_P99_MS")
    ] = None,
    decline_rate: Annotated[
        float | None, _fault("Share of authorizations declined (do_not_honor).", "DECLINE_RATE")
    ] = None,
    decline_customers: Annotated[
        str | None,
        _fault("Comma-separated customer ids whose authorizations decline.", "DECLINE_CUSTOMERS"),
    ] = None,
    error_rate: Annotated[
        float | None, _fault("Share of calls answered 503, not applied.", "ERROR_RATE")
    ] = None,
    timeout_rate: Annotated[
        float | None, _fault("Share of calls held --hang-s, not applied.", "TIMEOUT_RATE")
    ] = None,
    lost_response_rate: Annotated[
        float | None,
        _fault("Share of calls applied, then cut with no reply.", "LOST_RESPONSE_RATE"),
    ] = None,
    hang_s: Annotated[
        float | None, _fault("How long a timed-out call is held (default 300).", "HANG_S")
    ] = None,
    seed: Annotated[int | None, _fault("Seed of the fault draws (reproducible).", "SEED")] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve the payment gateway: authorize, capture, void, refund, look-up, the ledger.

    The faults given here change at runtime with POST /admin/faults (docs/payments.md).
    """
    from ordermesh.api.server import serve_in_foreground, uvicorn_config
    from ordermesh.gateway.faults import config_from_settings
    from ordermesh.gateway.server import create_gateway_app

    settings = make_settings(
        data_dir=data_dir,
        gateway_port=port,
        gateway_latency_p50_ms=latency_p50_ms,
        gateway_latency_p99_ms=latency_p99_ms,
        gateway_decline_rate=decline_rate,
        gateway_decline_customers=decline_customers,
        gateway_error_rate=error_rate,
        gateway_timeout_rate=timeout_rate,
        gateway_lost_response_rate=lost_response_rate,
        gateway_hang_s=hang_s,
        gateway_seed=seed,
    )
    try:
        faults = config_from_settings(settings)
    except ValueError as exc:
        raise fail(ConfigError(f"gateway faults: {exc}")) from None
    config = uvicorn_config(
        create_gateway_app(settings.gateway_db_path(), faults),
        host=host,
        port=settings.gateway_port,
        access_log=access_log,
        # payments keeps its pooled connections open between bursts
        timeout_keep_alive=30,
        # calls held by the timeout fault must not hold a stop for long
        timeout_graceful_shutdown=5,
        backlog=4096,
    )
    if not serve_in_foreground(config):
        raise typer.Exit(code=1)
