"""SIGKILL the inventory service mid-stream: nothing lost, nothing double-reserved."""

from __future__ import annotations

import signal
from collections.abc import Callable

from ordermesh.config import Settings
from ordermesh.kafka.lag import group_lag
from ordermesh.loadgen import run_load
from ordermesh.topics import COMMANDS, ORDERS
from ordermesh.verify import verify
from tests.conftest import ServiceProcess, wait_for
from tests.integration.test_inventory_pipeline import _events, drained, seed


def test_sigkill_mid_stream_then_restart(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    # scarce stock, so a double reservation would show up as broken conservation
    seed(settings, skus=300, stock=80)
    summary = run_load(
        settings, count=40_000, duration=None, rate=None, malformed_ratio=0.03, seed=21, skus=320
    )
    victim = service_factory(["inventory", "run"], settings, "inv-victim")
    wait_for(lambda: _events(settings) > 5_000, 90, "the service to be mid-stream")
    victim.signal(signal.SIGKILL)
    assert victim.wait(30) == -signal.SIGKILL
    lag = group_lag(settings, "inventory", [settings.topic(ORDERS), settings.topic(COMMANDS)])
    assert sum(lag.values()) > 0, "killed too late: nothing left to redeliver"

    survivor = service_factory(["inventory", "run"], settings, "inv-restarted")
    wait_for(lambda: drained(settings), 120, "the restarted service to drain the topic")
    assert survivor.stop() == 0, survivor.log_text()[-3000:]

    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    assert report.orders_records == 40_000
    assert report.invalid_records == summary.malformed_sent
