"""`ordermesh chaos --quick`: every quick fault scenario keeps every order and all stock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ordermesh.chaos import SCENARIOS


def test_quick_matrix_loses_nothing(tmp_path: Path) -> None:
    env = dict(os.environ)
    # the matrix starts (and kills) brokers of its own; an external cluster would make
    # the broker scenarios skip
    env.pop("ORDERMESH_BOOTSTRAP_SERVERS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ordermesh",
            "chaos",
            "--quick",
            "--json",
            "--work-dir",
            str(tmp_path / "chaos"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.stdout.strip(), proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {row["scenario"]: row for row in report["rows"]}
    assert set(rows) == {s.name for s in SCENARIOS if s.quick}
    for name, row in rows.items():
        detail = f"{name}: {row['problems']} {row['notes']} {row['verify'].get('violations')}"
        assert row["status"] == "ok", detail
        assert row["lost"] == 0, detail
        assert row["pending"] == 0, detail
        assert row["conflicting"] == 0, detail
        assert row["stock_conserved"] is True, detail
        assert row["verify_ok"] is True, detail
        assert row["drain_s"] is not None, detail
        assert row["placed"] > 0, detail
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["ok"] is True
