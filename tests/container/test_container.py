"""The image and compose.yaml for real: podman builds the images and runs the deployment.

Part of ``make test``; ``make container-test`` runs it alone. The first run builds the
stand-in base images from Debian packages (~2 min, then cached; docs/deploy.md). Kafka,
PostgreSQL, the setup job and every service run as containers on loopback
(``deploy/run_compose.py``, podman's host network); orders go in through the two API
containers, and ``ordermesh verify`` (run from the image) must pass.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ordermesh.loadgen import sku_name
from tests.conftest import wait_for

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "deploy" / "run_compose.py"
NEEDS = ("podman", "runc", "mmdebstrap")


@dataclass
class Deployment:
    project: str
    state: Path
    endpoints: dict[str, Any]
    containers: dict[str, str]  # name -> service
    ports: dict[str, dict[str, int]]

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return _compose(self.project, self.state, *args, timeout=timeout)

    def of(self, service: str) -> list[str]:
        return sorted(name for name, svc in self.containers.items() if svc == service)


def _compose(
    project: str, state: Path, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUNNER), "-p", project, "--state", str(state), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _request(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 30
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _order(*items: tuple[str, int, float], customer: str = "cust-c") -> dict[str, Any]:
    cents = sum(round(price * 100) * qty for _sku, qty, price in items)
    return {
        "customer_id": customer,
        "items": [{"sku": s, "quantity": q, "unit_price": p} for s, q, p in items],
        "currency": "USD",
        "total": cents / 100,
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    missing = [tool for tool in NEEDS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"the container test needs {', '.join(missing)}"
            " (apt-get install podman runc mmdebstrap)",
            pytrace=False,
        )
    project = f"omt{uuid.uuid4().hex[:8]}"
    state = tmp_path_factory.mktemp("compose") / "state.json"
    timings: dict[str, float] = {}
    started = time.monotonic()
    build = _compose(project, state, "build", timeout=1800)
    timings["build"] = time.monotonic() - started
    assert build.returncode == 0, build.stderr[-4000:]
    try:
        started = time.monotonic()
        up = _compose(project, state, "up", "--no-build", "--wait", timeout=900)
        timings["up"] = time.monotonic() - started
        assert up.returncode == 0, up.stderr[-6000:]
        saved = json.loads(state.read_text())
        yield Deployment(
            project,
            state,
            saved["endpoints"],
            saved["containers"],
            {name: {k: int(v) for k, v in ports.items()} for name, ports in saved["ports"].items()},
        )
    finally:
        print(f"\ncontainer test timings: {json.dumps({k: round(v) for k, v in timings.items()})}")
        ps = _compose(project, state, "ps", timeout=300)
        print(ps.stdout[-3000:])
        down = _compose(project, state, "down", "--volumes", timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]


def test_orders_through_the_api_containers_pass_verify(deployment: Deployment) -> None:
    apis = deployment.endpoints["api"]
    assert len(apis) == 2

    # every consumer container answers /health with its own state, and is healthy
    inventory = deployment.of("inventory")
    assert len(inventory) == 3
    assigned: list[str] = []
    for name in inventory:
        status, report = _request(
            "GET", f"http://127.0.0.1:{deployment.ports[name]['9100']}/health"
        )
        assert status == 200, report
        assert report["service"] == "inventory" and report["status"] == "ok"
        assigned += report["assigned_partitions"]
    # three members of one group share the 12 partitions of orders and order-commands
    # (a member may still be joining: the union is never more than 12, without overlap)
    assert len(assigned) == len(set(assigned)) <= 12

    placed: dict[str, str] = {}
    for i in range(20):
        api = apis[i % 2]
        items = (sku_name(1 + i % 5), 1 + i % 3, 2.5)
        if i == 7:
            items = ("SKU-NOPE", 1, 1.0)
        status, body = _request("POST", f"{api}/orders", _order(items))
        assert status == 202, body
        placed[body["order_id"]] = "REJECTED" if i == 7 else "RESERVED"

    # each API reads the status the tracker containers store, whichever API took the order
    for n, (order_id, expected) in enumerate(placed.items()):
        api = apis[(n + 1) % 2]
        status, order = _request("GET", f"{api}/orders/{order_id}?wait=30", timeout=60)
        assert status == 200, order
        assert order["status"] == expected, order

    cancel_id = next(oid for oid, st in placed.items() if st == "RESERVED")
    status, body = _request("POST", f"{apis[1]}/orders/{cancel_id}/cancel")
    assert status == 202, body

    # the load generator from the image, then the invariants from the image
    load = deployment.compose("run", "cli", "load", "--count=500", "--rate=500", "--seed=5")
    assert load.returncode == 0, load.stderr[-3000:]
    verify = deployment.compose("run", "cli", "verify", "--wait-drained", "120", "--json")
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]
    report = json.loads(verify.stdout)
    assert report["ok"] is True
    assert report["valid_orders"] == len(placed) + 500
    assert report["tracker_orders"] == len(placed) + 500
    assert report["cancelled"] == 1
    assert report["dlq_entries"] == 0

    # the dashboard container serves, and sees the same orders
    def placed_on_dashboard() -> int:
        status, snapshot = _request("GET", deployment.endpoints["dashboard"] + "snapshot")
        assert status == 200
        return int(snapshot["totals"]["placed"])

    wait_for(lambda: placed_on_dashboard() == len(placed) + 500, 60, "the dashboard's totals")
