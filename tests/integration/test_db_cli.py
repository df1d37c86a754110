"""`ordermesh db ...` and `ordermesh up --db postgres` against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from ordermesh.cli import app
from ordermesh.postgres.local import LocalPostgres


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ORDERMESH_DATABASE_URL", "ORDERMESH_POSTGRES_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_db_up_status_down(tmp_path: Path, clean_env: None) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "data")]
    server = LocalPostgres(tmp_path / "data" / "postgres")
    try:
        out = runner.invoke(app, ["db", "up", *data])
        assert out.exit_code == 0, out.output
        # stdout is exactly the line to export
        name, _, url = out.stdout.strip().partition("=")
        assert name == "ORDERMESH_DATABASE_URL" and url.startswith("postgresql://ordermesh:")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("ordermesh",)

        again = runner.invoke(app, ["db", "up", *data, "--json"])
        assert again.exit_code == 0
        assert json.loads(again.stdout) | {"started": False} == json.loads(again.stdout)
        assert json.loads(again.stdout)["url"] == url

        status = runner.invoke(app, ["db", "status", *data, "--json"])
        assert status.exit_code == 0
        assert json.loads(status.stdout)["healthy"] is True

        down = runner.invoke(app, ["db", "down", *data, "--purge"])
        assert down.exit_code == 0 and "stopped PostgreSQL" in down.stdout
        status = runner.invoke(app, ["db", "status", *data, "--json"])
        assert status.exit_code == 1
        assert json.loads(status.stdout) == {"running": False, "healthy": False}
    finally:
        server.down()
        server.purge()


def test_db_migrate_creates_then_finds_nothing_to_do(
    postgres_database: str, tmp_path: Path, clean_env: None
) -> None:
    runner = CliRunner()
    args = ["db", "migrate", "--database-url", postgres_database, "--data-dir", str(tmp_path)]
    first = runner.invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    applied = json.loads(first.stdout)["migrated"]
    assert applied, "a new database gets every store's schema"
    second = runner.invoke(app, [*args, "--json"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["migrated"] == []


def test_db_migrate_against_nothing_is_one_line(tmp_path: Path, clean_env: None) -> None:
    url = "postgresql://ordermesh:wrong@127.0.0.1:9/ordermesh"
    out = CliRunner().invoke(
        app, ["db", "migrate", "--database-url", url, "--data-dir", str(tmp_path)]
    )
    assert out.exit_code == 4, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "wrong" not in lines[0], "the password is never printed"


def test_up_with_postgres_starts_migrates_and_stops_its_server(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERMESH_")}
    env |= {"ORDERMESH_DATA_DIR": str(data), "ORDERMESH_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}-"}
    args = ["up", "--db", "postgres", "--bootstrap-server", kafka_bootstrap]
    args += ["--rate", "50", "--duration", "4", "--skus", "20", "--api-port", "0"]
    args += ["--dashboard-port", "0"]
    server = LocalPostgres(data / "postgres")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ordermesh", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "verify: OK" in proc.stdout
        assert "database: postgresql://ordermesh:***@127.0.0.1:" in proc.stdout
        # every instance had a data dir of its own, and the server is stopped again
        assert {p.name for p in (data / "instances").iterdir()} >= {"inventory-1", "api-1"}
        state = server.load_state()
        assert state is not None and server.running_pid(state) is None
    finally:
        server.down()
        server.purge()
