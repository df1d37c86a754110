"""SIGKILL the inventory at each point of the commit path (ORDERMESH_FAULT), under load.

``after-handle``: the DB transaction is committed, nothing is produced yet;
``after-produce``: every output is acknowledged, the offsets are not committed. Either way
the restarted service redoes the batch: nothing may be lost and no order may end up with
two different outcomes.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from ordermesh.config import Settings
from ordermesh.kafka.lag import group_lag
from ordermesh.loadgen import run_load
from ordermesh.topics import COMMANDS, ORDERS
from ordermesh.verify import verify
from tests.conftest import ServiceProcess, wait_for
from tests.integration.test_inventory_pipeline import drained, seed

ORDERS_SENT = 15_000


@pytest.mark.parametrize("point", ["after-handle", "after-produce"])
def test_kill_at_fault_point_then_restart(
    point: str,
    settings_factory: Callable[..., Settings],
    service_factory: Callable[..., ServiceProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # small batches, so the kill lands mid-stream with batches left to redeliver
    settings = settings_factory(batch_max=1000)
    # scarce stock, so a double reservation would show up as broken conservation
    seed(settings, skus=200, stock=60)
    summary = run_load(
        settings,
        count=ORDERS_SENT,
        duration=None,
        rate=None,
        malformed_ratio=0.03,
        seed=31,
        skus=210,
    )
    monkeypatch.setenv("ORDERMESH_FAULT", point)
    monkeypatch.setenv("ORDERMESH_FAULT_AFTER", "4")
    victim = service_factory(["inventory", "run"], settings, f"inv-{point}")
    monkeypatch.delenv("ORDERMESH_FAULT")
    monkeypatch.delenv("ORDERMESH_FAULT_AFTER")
    assert victim.wait(120) == -signal.SIGKILL, victim.log_text()[-3000:]
    assert f"ORDERMESH_FAULT={point} reached" in victim.log_text()
    lag = group_lag(settings, "inventory", [settings.topic(ORDERS), settings.topic(COMMANDS)])
    assert sum(lag.values()) > 0, "killed too late: nothing left to redeliver"

    survivor = service_factory(["inventory", "run"], settings, "inv-restarted")
    wait_for(lambda: drained(settings), 120, "the restarted service to drain the topic")
    assert survivor.stop() == 0, survivor.log_text()[-3000:]

    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    assert report.orders_records == ORDERS_SENT
    assert report.invalid_records == summary.malformed_sent
    assert sum(report.outcomes.values()) == report.valid_orders
