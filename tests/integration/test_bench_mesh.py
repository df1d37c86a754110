"""``ordermesh bench mesh``'s drains on the real broker: the mesh as ``up`` runs it drains a
small backlog (reservation-only, and over the whole life of an order), and the result says
what was measured and that ``verify`` passed."""

from __future__ import annotations

from pathlib import Path

import pytest

from ordermesh.bench.lifecycle import lifecycle_drain
from ordermesh.bench.mesh import drain_mesh
from ordermesh.config import Settings

pytestmark = pytest.mark.integration

ORDERS = 3000


def test_the_mesh_drains_a_small_backlog_and_verifies(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = Settings(bootstrap_servers=kafka_bootstrap, data_dir=tmp_path / "data")
    steps: list[str] = []

    result = drain_mesh(settings, orders=ORDERS, workdir=tmp_path, on_step=steps.append)

    assert result["db"] == "sqlite" and result["inventory_instances"] == 1
    assert result["orders"] == ORDERS
    report = result["verify"]
    assert report["ok"], report["violations"]
    assert report["pending"] == 0
    assert report["orders_records"] == ORDERS
    assert report["valid_orders"] + report["invalid_records"] == ORDERS
    assert report["invalid_records"] == result["malformed"] == report["dlq_entries"]
    assert report["outcomes"] == {"OrderReserved": report["valid_orders"]}
    assert result["restarts"] == 0
    # the timeline is ordered; how fast it went is the benchmark's business, not a test's
    assert 0 < result["inventory_drained_s"] <= result["seconds"]
    assert result["orders_per_s"] > 0 and result["load"]["rate"] > 0
    assert any("drained" in step for step in steps)


LIFE_ORDERS = 200


def test_the_lifecycle_mesh_ships_a_small_backlog_and_verifies(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = Settings(bootstrap_servers=kafka_bootstrap, data_dir=tmp_path / "data")

    result = lifecycle_drain(settings, orders=LIFE_ORDERS, workdir=tmp_path, malformed_ratio=0.0)

    assert result["orders"] == result["valid_orders"] == LIFE_ORDERS
    # done means every order shipped, not merely the groups caught up
    assert result["shipped"] == LIFE_ORDERS
    assert result["statuses"] == {"SHIPPED": LIFE_ORDERS}
    report = result["verify"]
    assert report["ok"], report["violations"]
    assert report["pending"] == 0
    assert result["restarts"] == 0
    # the gateway's CPU is counted with the services'
    assert "gateway" in result["cpu"] and "payments-1" in result["cpu"]
    assert 0 < result["shipped_s"] <= result["seconds"]
