"""A newcomer's first minutes: `ordermesh up` as the README runs it, and the errors a
person sees when Kafka isn't there."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from ordermesh.broker import local
from ordermesh.broker.jars import ensure_jars
from ordermesh.broker.local import LocalCluster, pid_alive
from ordermesh.config import Settings
from ordermesh.kafka.client import make_admin
from ordermesh.kafka.groups import describe_groups
from tests.conftest import wait_for


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def _ordermesh(
    args: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ordermesh", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["topics", "ensure"], 3),
        (["verify"], 3),
        (["dlq", "list"], 3),
        # reads only the local database: works without Kafka
        (["inventory", "stock"], 0),
    ],
)
def test_commands_against_a_closed_port_say_so_in_one_line(
    args: list[str], code: int, tmp_path: Path
) -> None:
    port = _closed_port()
    data = tmp_path / "data"
    # the stores exist, so verify gets as far as Kafka
    seeded = _ordermesh(["inventory", "seed", "--skus", "3", "--data-dir", str(data)], {}, 60)
    assert seeded.returncode == 0, seeded.stderr
    env = {"ORDERMESH_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "ORDERMESH_DATA_DIR": str(data)}
    # it gives up on its own (one metadata timeout), well within the 30 s it is allowed;
    # how fast is not asserted: a busy machine stretches it
    out = _ordermesh(args, env, timeout=30)
    assert out.returncode == code, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr
    if code == 3:
        assert f"error: cannot reach Kafka at 127.0.0.1:{port}" in out.stderr


def test_a_cluster_id_that_starts_with_a_dash_formats_and_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashed = base64.urlsafe_b64encode(b"\xf8" + os.urandom(15)).decode().rstrip("=")
    assert dashed.startswith("-")
    monkeypatch.setattr(local, "new_cluster_id", lambda: dashed)
    base = Settings()
    cluster = LocalCluster(
        tmp_path / "broker", ensure_jars(base.kafka_jar_dir(), base.kafka_version)
    )
    try:
        state, started = cluster.up(nodes=1)
        assert started and state.cluster_id == dashed
        assert cluster.status()["healthy"]
    finally:
        cluster.down()


def _take_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _take_terminal_with_sigint_ignored() -> None:
    """As ``_take_terminal``, with SIGINT ignored as a shell without job control leaves it
    for a command it starts in the background: Ctrl-C must reach ``up`` all the same."""
    _take_terminal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _read_pty(fd: int, seconds: float) -> bytes:
    out = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out


def test_up_without_options_runs_a_load_until_ctrl_c_and_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "mesh"
    env = {
        **os.environ,
        "ORDERMESH_DATA_DIR": str(data),
        # the only deviation from a plain `ordermesh up`: a broker port nobody else uses
        "ORDERMESH_BROKER_PORT": str(_closed_port()),
        "COLUMNS": "120",
        "LINES": "40",
    }
    env.pop("ORDERMESH_BOOTSTRAP_SERVERS", None)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ordermesh", "up"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        # a session of its own with the pty as its controlling terminal: Ctrl-C typed
        # into the pty becomes SIGINT for it, as in a real terminal
        preexec_fn=_take_terminal_with_sigint_ignored,
    )
    os.close(slave)
    state_file = data / "mesh.json"
    screen = b""
    try:

        def live() -> dict[str, int] | None:
            nonlocal screen
            screen += _read_pty(master, 0.5)
            if proc.poll() is not None:
                pytest.fail(
                    f"up exited early ({proc.returncode}):\n{screen.decode(errors='replace')}"
                )
            if not state_file.exists():
                return None
            try:
                numbers = json.loads(state_file.read_text()).get("live")
            except ValueError:
                return None  # caught mid-write
            return numbers if numbers and numbers["decided"] > 0 else None

        first = wait_for(live, 120, "orders decided in mesh.json")
        end = time.monotonic() + 20
        while time.monotonic() < end:
            screen += _read_pty(master, 1.0)
            assert proc.poll() is None, screen.decode(errors="replace")
        later = json.loads(state_file.read_text())["live"]
        assert later["orders_placed"] > first["orders_placed"]
        assert later["decided"] > first["decided"]

        state = json.loads(state_file.read_text())
        pids = [s["pid"] for s in state["services"].values() if s["pid"]]
        cluster = json.loads((data / "broker" / "cluster.json").read_text())
        pids += [n["pid"] for n in cluster["nodes"]]
        assert len(pids) >= 7  # load, api, analytics, dlq logger, inventory, tracker, broker

        # every member of the mesh's groups names its process, as Kafka's tools show it
        broker = Settings(bootstrap_servers=state["bootstrap_servers"])
        groups = describe_groups(broker, make_admin(broker), {"inventory": ["orders"]})
        members = {m["client_id"] for m in groups["groups"]["inventory"]["members"]}
        assert members == {"ordermesh-inventory-1"}, groups

        os.write(master, b"\x03")  # Ctrl-C, as a person would
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            screen += _read_pty(master, 0.5)
        assert proc.poll() is not None, "up did not stop after Ctrl-C"
        screen += _read_pty(master, 0.5)
        text = screen.decode(errors="replace")
        assert "Traceback" not in text
        assert "verify: OK" in text, text[-3000:]
        assert proc.returncode == 0
        left = [pid for pid in pids if pid_alive(pid)]
        assert left == [], f"still running after up stopped: {left}"
        for log in (data / "logs").glob("*.log"):
            assert "Traceback" not in log.read_text(errors="replace"), log.name
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        os.close(master)
        # whatever the outcome, nothing of this mesh may outlive the test
        for name in ("mesh.json", "broker/cluster.json"):
            path = data / name
            if path.exists():
                raw = json.loads(path.read_text())
                found = [s.get("pid") for s in raw.get("services", {}).values()]
                found += [n.get("pid") for n in raw.get("nodes", [])]
                for pid in found:
                    if pid and pid_alive(pid):
                        os.kill(pid, signal.SIGKILL)
