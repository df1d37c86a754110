"""A real service process answers ``/health`` on its metrics port with its own state."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from ordermesh.config import Settings
from ordermesh.topics import DLQ
from tests.conftest import ServiceProcess, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(port: int) -> tuple[int, dict[str, object]]:
    """Exit code and report of ``ordermesh health --port`` (what a healthcheck runs)."""
    proc = subprocess.run(
        [sys.executable, "-m", "ordermesh", "health", "--port", str(port), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout or "{}")


def test_a_consumer_service_reports_its_partitions_and_polls(
    settings_factory: Callable[..., Settings], service_factory: Callable[..., ServiceProcess]
) -> None:
    port = _free_port()
    settings = settings_factory(metrics_port=port)
    logger = service_factory(["dlq", "run"], settings, "dlq-logger")

    def assigned() -> dict[str, object] | None:
        code, report = _health(port)
        partitions = report.get("assigned_partitions")
        healthy = code == 0 and isinstance(partitions, list) and len(partitions) == 3
        return report if healthy else None

    report = wait_for(assigned, 60, "the DLQ logger healthy with every DLQ partition")
    dlq = settings.topic(DLQ)
    assert report["assigned_partitions"] == [f"{dlq}[{p}]" for p in range(3)]
    assert report["service"] == "dlq-logger"
    assert report["group"] == settings.group("dlq-logger")
    assert report["blocked_partitions"] == {}

    logger.signal(signal.SIGTERM)
    assert logger.wait(60) == 0, logger.log_text()[-3000:]
    code, report = _health(port)
    assert code == 1
    assert report["status"] == "unreachable"
