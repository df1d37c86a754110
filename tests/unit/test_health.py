"""``/health`` of a service process and the ``ordermesh health`` command that asks it."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from ordermesh.cli import app
from ordermesh.kafka.metrics import STALE_AFTER_S, RunnerMetrics, health_of
from ordermesh.kafka.runner import RunnerStats


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served() -> Iterator[tuple[RunnerMetrics, RunnerStats, int]]:
    metrics = RunnerMetrics("inventory", "inventory")
    stats = RunnerStats()
    metrics.watch(stats)
    port = metrics.serve(0)
    try:
        yield metrics, stats, port
    finally:
        metrics.stop()


def test_health_follows_the_runner_state() -> None:
    stats = RunnerStats()
    assert health_of("svc", "grp", None).status == "starting"
    assert health_of("svc", "grp", stats, now=100.0).status == "starting"

    stats.last_poll_at = 99.0
    stats.assigned |= {("orders", 1), ("orders", 0)}
    health = health_of("svc", "grp", stats, now=100.0)
    assert health.ok
    assert health.as_dict() == {
        "service": "svc",
        "group": "grp",
        "status": "ok",
        "assigned_partitions": ["orders[0]", "orders[1]"],
        "last_poll_age_s": 1.0,
        "last_commit_age_s": None,
        "blocked_partitions": {},
    }
    stats.last_commit_at = 95.0
    assert health_of("svc", "grp", stats, now=100.0).last_commit_age_s == 5.0
    # no commit for long is normal (nothing to do); no poll for long is not
    assert health_of("svc", "grp", stats, now=99.0 + STALE_AFTER_S + 1).status == "stale"

    stats.blocked[("orders", 1)] = 42
    health = health_of("svc", "grp", stats, now=100.0)
    assert health.status == "blocked"
    assert not health.ok
    assert health.blocked_partitions == {"orders[1]": 42}


def test_health_endpoint_beside_metrics(served: tuple[RunnerMetrics, RunnerStats, int]) -> None:
    _metrics, stats, port = served
    status, body = _get(f"http://127.0.0.1:{port}/health")
    assert status == 503
    assert json.loads(body)["status"] == "starting"

    stats.last_poll_at = time.monotonic()
    stats.assigned.add(("orders", 3))
    status, body = _get(f"http://127.0.0.1:{port}/health")
    report = json.loads(body)
    assert status == 200, report
    assert report["service"] == "inventory"
    assert report["group"] == "inventory"
    assert report["assigned_partitions"] == ["orders[3]"]
    assert 0 <= report["last_poll_age_s"] < STALE_AFTER_S

    status, text = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert 'ordermesh_partitions_blocked{service="inventory"} 0.0' in text

    stats.blocked[("orders", 3)] = 7
    status, body = _get(f"http://127.0.0.1:{port}/health")
    assert status == 503
    assert json.loads(body)["blocked_partitions"] == {"orders[3]": 7}


def test_health_command_exit_codes(
    served: tuple[RunnerMetrics, RunnerStats, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _metrics, stats, port = served
    runner = CliRunner()
    monkeypatch.delenv("ORDERMESH_METRICS_PORT", raising=False)

    out = runner.invoke(app, ["health", "--port", str(port)])
    assert out.exit_code == 1, out.output
    assert "starting" in out.output

    stats.last_poll_at = time.monotonic()
    out = runner.invoke(app, ["health", "--port", str(port), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["status"] == "ok"

    # the port a container's service serves on comes from its environment
    monkeypatch.setenv("ORDERMESH_METRICS_PORT", str(port))
    assert runner.invoke(app, ["health"]).exit_code == 0
    monkeypatch.delenv("ORDERMESH_METRICS_PORT")

    out = runner.invoke(app, ["health", "--url", f"http://127.0.0.1:{_free_port()}/health"])
    assert out.exit_code == 1
    assert "unreachable" in out.output

    out = runner.invoke(app, ["health"])
    assert out.exit_code == 2
    assert "--url" in out.output
