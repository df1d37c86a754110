"""`ordermesh broker up/status/down` by their CLI: idempotent up, recorded PIDs only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ordermesh.broker.local import free_port_run, pid_alive


def ordermesh(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ORDERMESH_BOOTSTRAP_SERVERS"}
    env["ORDERMESH_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "ordermesh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_up_status_down_and_second_up_starts_nothing(tmp_path: Path) -> None:
    port = free_port_run(2)  # the broker's port and its controller's
    first = ordermesh("broker", "up", "--port", str(port), data_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    try:
        state = json.loads((tmp_path / "broker" / "cluster.json").read_text())
        pid = state["nodes"][0]["pid"]
        assert pid_alive(pid)

        second = ordermesh("broker", "up", "--port", str(port), data_dir=tmp_path)
        assert second.returncode == 0, second.stderr
        assert "already up" in second.stdout and "started nothing" in second.stdout
        assert (
            json.loads((tmp_path / "broker" / "cluster.json").read_text())["nodes"][0]["pid"] == pid
        )

        status = ordermesh("broker", "status", "--json", data_dir=tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
        info = json.loads(status.stdout)
        assert info["healthy"] is True and info["controller"] == 1
        assert info["nodes"][0]["port"] == port
    finally:
        down = ordermesh("broker", "down", data_dir=tmp_path)
    assert down.returncode == 0, down.stderr
    assert "stopped 1" in down.stdout
    assert not pid_alive(pid)
    after = ordermesh("broker", "status", data_dir=tmp_path)
    assert after.returncode == 1  # not healthy once stopped


def test_stale_pid_is_detected_and_replaced(tmp_path: Path) -> None:
    port = free_port_run(2)  # the broker's port and its controller's
    assert ordermesh("broker", "up", "--port", str(port), data_dir=tmp_path).returncode == 0
    state_file = tmp_path / "broker" / "cluster.json"
    try:
        assert ordermesh("broker", "down", data_dir=tmp_path).returncode == 0
        # a stale pid (a process that is not our broker) must be ignored, not signalled
        state = json.loads(state_file.read_text())
        state["nodes"][0]["pid"] = os.getpid()
        state_file.write_text(json.dumps(state))
        again = ordermesh("broker", "up", "--port", str(port), data_dir=tmp_path)
        assert again.returncode == 0, again.stderr
        new_pid = json.loads(state_file.read_text())["nodes"][0]["pid"]
        assert new_pid != os.getpid() and pid_alive(new_pid)
    finally:
        ordermesh("broker", "down", data_dir=tmp_path)
    assert pid_alive(os.getpid())
