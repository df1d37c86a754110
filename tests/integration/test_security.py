"""A secured cluster: ``broker up --security scram-tls`` (SASL_SSL, SCRAM-SHA-512, a CA of
its own), the mesh's topics, services and API on it, and a refused password."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ordermesh.broker.local import free_ports, pid_alive
from ordermesh.config import Settings, read_client_properties
from ordermesh.loadgen import sku_name
from ordermesh.stores.factory import open_inventory_store
from ordermesh.verify import verify
from tests.conftest import ServiceProcess, wait_for

pytestmark = pytest.mark.integration


def ordermesh(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERMESH_")}
    env["ORDERMESH_DATA_DIR"] = str(data_dir)
    env["ORDERMESH_BROKER_PORT"] = "0"  # any free ports
    return subprocess.run(
        [sys.executable, "-m", "ordermesh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A 1-node scram-tls cluster started by the CLI; its ``broker up --json`` answer."""
    data_dir = tmp_path_factory.mktemp("secured")
    up = ordermesh("broker", "up", "--security", "scram-tls", "--json", data_dir=data_dir)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        info: dict[str, Any] = json.loads(up.stdout)
        info["data_dir_root"] = data_dir
        yield info
    finally:
        down = ordermesh("broker", "down", data_dir=data_dir)
        assert down.returncode == 0, down.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_broker_up_writes_private_tls_files_and_client_properties(
    secured: dict[str, Any],
) -> None:
    assert secured["security"] == "scram-tls" and secured["started"] is True
    client_config = Path(secured["client_config"])
    ca = Path(secured["ca_location"])
    props = read_client_properties(client_config)
    assert props["security.protocol"] == "SASL_SSL"
    assert props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert props["sasl.username"] == "ordermesh" and len(props["sasl.password"]) >= 24
    assert props["ssl.ca.location"] == str(ca)
    root = Path(secured["data_dir"])
    secrets = [client_config, ca, *(root / "tls").iterdir(), root / "node-1" / "server.properties"]
    assert {p.name: mode(p) for p in secrets} == {p.name: 0o600 for p in secrets}
    assert not (root / "tls" / "ca.p12").exists()  # the CA's key is gone once it signed
    server = (root / "node-1" / "server.properties").read_text()
    assert f"SASL_SSL://{secured['bootstrap_servers']}" in server
    assert "inter.broker.listener.name=SASL_SSL" in server
    # no password in the broker's logs (the users went in salted and hashed, never on a
    # command line; Kafka hides its password settings)
    broker_password = server.split('username="ordermesh-broker" password="')[1].split('"')[0]
    logs = "".join((root / "node-1" / n).read_text() for n in ("kafka.log", "server.log"))
    assert props["sasl.password"] not in logs and broker_password not in logs

    status = ordermesh("broker", "status", "--json", data_dir=secured["data_dir_root"])
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["security"] == "scram-tls"
    again = ordermesh("broker", "up", "--security", "none", data_dir=secured["data_dir_root"])
    assert again.returncode == 4 and "formatted with security scram-tls" in again.stderr


def test_topics_services_and_api_on_the_secured_cluster(
    secured: dict[str, Any],
    tmp_path: Path,
    service_factory: Callable[..., ServiceProcess],
) -> None:
    bootstrap = secured["bootstrap_servers"]
    client_config = secured["client_config"]
    prefix = f"t{uuid.uuid4().hex[:10]}-"
    # --command-config, as with Kafka's own tools
    ensure = subprocess.run(
        [
            sys.executable,
            "-m",
            "ordermesh",
            "topics",
            "ensure",
            "--bootstrap-server",
            bootstrap,
            "--command-config",
            client_config,
            "--json",
        ],
        env={**os.environ, "ORDERMESH_TOPIC_PREFIX": prefix, "ORDERMESH_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ensure.returncode == 0, ensure.stderr
    assert {t["name"] for t in json.loads(ensure.stdout)} == {
        f"{prefix}{name}" for name in ("orders", "order-commands", "order-events", "orders-dlq")
    }

    # the services get the same access as settings plus an ORDERMESH_KAFKA_* property: both
    # must reach the child processes through Settings.as_env()
    props = read_client_properties(Path(client_config))
    settings = Settings(
        bootstrap_servers=bootstrap,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=props["sasl.username"],
        sasl_password=props["sasl.password"],
        ssl_ca_location=Path(props["ssl.ca.location"]),
        librdkafka_properties={"ssl.endpoint.identification.algorithm": "https"},
        client_id="secured-mesh",
        topic_prefix=prefix,
        data_dir=tmp_path / "data",
    )
    with open_inventory_store(settings) as store:
        store.seed({sku_name(1): 10})
    inventory = service_factory(["inventory", "run"], settings, "inventory")
    tracker = service_factory(["tracker", "run"], settings, "tracker")
    port = free_ports(1)[0]
    api = service_factory(["api", "--port", str(port)], settings, "api")

    def accepted() -> str | None:
        try:
            response = client.post(
                "/orders",
                json={
                    "customer_id": "c-1",
                    "items": [{"sku": sku_name(1), "quantity": 2, "unit_price": 5.0}],
                    "currency": "EUR",
                    "total": 10.0,
                },
            )
        except httpx.TransportError:
            return None  # not listening yet
        return str(response.json()["order_id"]) if response.status_code == 202 else None

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        order_id = wait_for(accepted, 60, "the API to accept an order")

        def reserved() -> bool:
            response = client.get(f"/orders/{order_id}", params={"wait": 5})
            return response.status_code == 200 and response.json()["status"] == "RESERVED"

        wait_for(reserved, 60, "the order to be RESERVED")
    for proc in (api, inventory, tracker):
        assert proc.stop() == 0, proc.log_text()[-3000:]
        assert props["sasl.password"] not in proc.log_text()
    report = verify(settings)
    assert report.ok and report.valid_orders == 1, report.violations


def test_a_wrong_password_is_one_error_line(secured: dict[str, Any], tmp_path: Path) -> None:
    wrong_password = "not-the-password-" + uuid.uuid4().hex
    good = read_client_properties(Path(secured["client_config"]))
    wrong = tmp_path / "wrong.properties"
    wrong.write_text(
        "".join(f"{k}={wrong_password if k == 'sasl.password' else v}\n" for k, v in good.items())
    )
    result = ordermesh(
        "topics",
        "ensure",
        "--bootstrap-server",
        secured["bootstrap_servers"],
        "--command-config",
        str(wrong),
        data_dir=tmp_path,
    )
    assert result.returncode == 4, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"error: Kafka at {secured['bootstrap_servers']} refused the credentials for user"
        " ordermesh (SASL SCRAM-SHA-512:"
    ), lines[0]
    assert "Traceback" not in result.stderr
    output = result.stdout + result.stderr
    assert wrong_password not in output and good["sasl.password"] not in output


def test_the_local_secured_cluster_needs_no_flags(secured: dict[str, Any]) -> None:
    """Commands of the cluster's own data dir find its client.properties by themselves."""
    result = ordermesh("topics", "ensure", "--json", data_dir=secured["data_dir_root"])
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 4
    state = json.loads((Path(secured["data_dir"]) / "cluster.json").read_text())
    assert pid_alive(state["nodes"][0]["pid"])
