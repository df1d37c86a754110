"""The local PostgreSQL launcher: start, idempotent up, stop, stale PIDs, the fixture."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ordermesh.broker.local import pid_alive
from ordermesh.errors import StoreError
from ordermesh.postgres.local import LocalPostgres
from tests.conftest import wait_for


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalPostgres]:
    pg = LocalPostgres(tmp_path / "pg", fast=True)
    yield pg
    pg.down()
    pg.purge()


def _postmaster_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_up_is_idempotent_and_down_leaves_no_process(server: LocalPostgres) -> None:
    state, started = server.up()
    assert started
    assert state.pid is not None and server.running_pid() == state.pid
    with psycopg.connect(state.url()) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("ordermesh",)
    status = server.status()
    assert status["healthy"] is True
    assert "***" in str(status["url"]) and state.password not in str(status)
    assert (server.state_file.stat().st_mode & 0o077) == 0

    again, started_again = server.up()
    assert not started_again
    assert (again.pid, again.port) == (state.pid, state.port)

    assert server.down() == state.pid
    wait_for(lambda: _postmaster_gone(state.pid or 0), 10, "the postmaster to exit")
    assert server.running_pid() is None
    assert server.down() is None
    assert server.status()["running"] is False


def test_restart_keeps_port_and_data(server: LocalPostgres) -> None:
    state, _ = server.up()
    with psycopg.connect(state.url()) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (7)")
    server.down()
    again, started = server.up()
    assert started and again.port == state.port
    with psycopg.connect(again.url()) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (7,)


def test_a_stale_pid_is_replaced(server: LocalPostgres) -> None:
    state, _ = server.up()
    assert state.pid is not None
    os.kill(state.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(state.pid or 0), 10, "the killed postmaster to die")
    again, started = server.up()
    assert started and again.pid != state.pid
    with psycopg.connect(again.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_purge_refuses_a_running_server(server: LocalPostgres) -> None:
    server.up()
    with pytest.raises(StoreError, match="running"):
        server.purge()


def test_each_test_gets_its_own_database(postgres_database: str, postgres_url: str) -> None:
    assert postgres_database != postgres_url
    with psycopg.connect(postgres_database) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
    assert name is not None and name[0].startswith("t_")
    assert tables == (0,)
