"""`ordermesh api` (the orders HTTP API under uvicorn) and `ordermesh api-bench`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ordermesh.cli.common import (
    BootstrapServer,
    CommandConfig,
    DataDir,
    app,
    console,
    fail,
    make_settings,
)
from ordermesh.errors import OrderMeshError


@app.command("api")
def api_cmd(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve the orders HTTP API (POST /orders, GET /orders/{id}?wait=, /health, /metrics).

    Set ORDERMESH_API_KEYS=key1,key2 to require one of them on every /orders endpoint:
    each key sees only the orders it placed. ORDERMESH_API_OPERATOR_KEYS=key3 names keys
    that see every order.
    """
    from ordermesh.api import create_app
    from ordermesh.api.server import serve_in_foreground, uvicorn_config

    settings = make_settings(
        data_dir=data_dir, bootstrap_servers=bootstrap_server, command_config=command_config
    )
    config = uvicorn_config(create_app(settings), host=host, port=port, access_log=access_log)
    if not serve_in_foreground(config):
        raise typer.Exit(code=1)


@app.command("api-bench")
def api_bench_cmd(
    url: Annotated[str, typer.Option(help="Base URL of a running API.")] = "http://127.0.0.1:8080",
    requests: Annotated[int, typer.Option(min=1, help="POSTs of the throughput run.")] = 20_000,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 64,
    rate: Annotated[float, typer.Option(min=0.1, help="Orders/s of the latency run.")] = 200.0,
    count: Annotated[int, typer.Option(min=1, help="Orders of the latency run.")] = 2_000,
    skus: Annotated[int, typer.Option(min=1, help="Order SKU-00001..SKU-N.")] = 1000,
) -> None:
    """POST /orders throughput, then POST -> RESERVED latency through GET ?wait=."""
    from ordermesh.bench.api import bench_api, bench_latency

    settings = make_settings()
    try:
        throughput = bench_api(settings, url, requests=requests, concurrency=concurrency, skus=skus)
        latency = bench_latency(settings, url, rate=rate, count=count, skus=skus)
    except OrderMeshError as exc:
        raise fail(exc) from None
    console.print_json(json.dumps({"throughput": throughput, "latency": latency}))
