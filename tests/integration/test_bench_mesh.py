"""``ordermesh bench mesh``'s drain on the real broker: the mesh as ``up`` runs it drains a
small backlog, and the result says what was measured and that ``verify`` passed."""

from __future__ import annotations

from pathlib import Path

import pytest

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
