"""`ordermesh simulate` end to end on the real broker: crash, backlog, recovery, verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ordermesh.config import Settings


def test_simulate_passes_end_to_end(settings: Settings) -> None:
    env = dict(os.environ)
    env.update(settings.as_env())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ordermesh",
            "simulate",
            "--rate",
            "800",
            "--duration",
            "24",
            "--outage",
            "8",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] is True
    # orders kept being accepted while the inventory was down, and the backlog grew
    assert report["accepted_during_outage"] > 1000
    assert report["lag_peak"] > report["lag_at_outage_start"]
    # then it drained and nothing was lost or processed twice
    assert report["drain_seconds"] is not None
    verify = report["verify"]
    assert verify["ok"] is True
    assert verify["violation_counts"] == {}
    assert verify["valid_orders"] + verify["invalid_records"] == verify["orders_records"]
    assert verify["orders_records"] > 15_000
    phases = [p["phase"] for p in report["phases"]]
    assert "inventory killed (SIGKILL)" in phases and "inventory restarted" in phases
