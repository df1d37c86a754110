"""Shared fixtures: a real Kafka broker and a real PostgreSQL for the session, settings
and databases per test."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ordermesh.broker.jars import ensure_jars
from ordermesh.broker.local import LocalCluster
from ordermesh.config import Settings
from ordermesh.errors import BrokerError, StoreError
from ordermesh.kafka.admin import ensure_topics
from ordermesh.kafka.client import make_admin
from ordermesh.postgres.local import LocalPostgres

SettingsFactory = Callable[..., Settings]


def _start_cluster(root: Path, nodes: int) -> LocalCluster:
    base = Settings()
    jar_dir = ensure_jars(base.kafka_jar_dir(), base.kafka_version)
    heap = 1024 if nodes == 1 else 768
    try:
        cluster = LocalCluster(root / "a", jar_dir, heap_mb=heap)
        cluster.up(nodes=nodes)
    except BrokerError as exc:
        # free ports are picked before the JVM binds them: another process may win the
        # race. One more try on new ports; a second failure is real and fails the session.
        logging.getLogger(__name__).warning("broker start failed, retrying on new ports: %s", exc)
        cluster = LocalCluster(root / "b", jar_dir, heap_mb=heap)
        cluster.up(nodes=nodes)
    return cluster


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real broker: ORDERMESH_TEST_BOOTSTRAP, or one we start."""
    existing = os.environ.get("ORDERMESH_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    cluster = _start_cluster(tmp_path_factory.mktemp("kafka1"), nodes=1)
    try:
        state = cluster.load_state()
        assert state is not None
        yield state.bootstrap_servers
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def kafka_cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local 3-node KRaft cluster (for tests marked ``cluster``)."""
    cluster = _start_cluster(tmp_path_factory.mktemp("kafka3"), nodes=3)
    try:
        yield cluster
    finally:
        cluster.down()


def _unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}-"


@pytest.fixture
def settings_factory(kafka_bootstrap: str, tmp_path: Path) -> SettingsFactory:
    """Settings on the session broker with a unique topic/group prefix; topics ensured."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "bootstrap_servers": kafka_bootstrap,
            "topic_prefix": _unique_prefix(),
            "data_dir": tmp_path / "data",
        }
        values.update(overrides)
        settings = Settings(**values)
        ensure_topics(make_admin(settings), settings)
        return settings

    return make


@pytest.fixture
def settings(settings_factory: SettingsFactory) -> Settings:
    return settings_factory()


# --- PostgreSQL ------------------------------------------------------------------------


def _start_postgres(root: Path) -> LocalPostgres:
    try:
        server = LocalPostgres(root / "a", fast=True)
        server.up()
    except StoreError as exc:
        # the free port is picked before the server binds it: another process may win the
        # race. One more try on a new port; a second failure is real.
        logging.getLogger(__name__).warning("PostgreSQL start failed, retrying: %s", exc)
        server = LocalPostgres(root / "b", fast=True)
        server.up()
    return server


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real PostgreSQL database as a superuser: ORDERMESH_TEST_DATABASE_URL, or
    a throwaway server (fsync off) started with ``ordermesh.postgres``.

    A test that needs PostgreSQL fails, never skips, when no server can be started.
    Tests should not write here: ``postgres_database`` gives each one its own database.
    """
    existing = os.environ.get("ORDERMESH_TEST_DATABASE_URL")
    if existing:
        yield existing
        return
    try:
        server = _start_postgres(tmp_path_factory.mktemp("postgres"))
    except StoreError as exc:
        pytest.fail(f"PostgreSQL could not be started: {exc}", pytrace=False)
    try:
        state = server.load_state()
        assert state is not None
        yield state.url()
    finally:
        server.down()
        server.purge()


def _with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


@pytest.fixture
def postgres_database_factory(postgres_url: str) -> Iterator[Callable[[], str]]:
    """Make fresh, empty databases (``t_<hex>``) on the session server: each call returns
    a new one's URL; all are dropped at the end of the test."""
    import psycopg
    from psycopg import sql

    made: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return _with_database(postgres_url, name)

    yield make
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for name in made:
            # FORCE: a service the test left running must not keep its database alive
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def postgres_database(postgres_database_factory: Callable[[], str]) -> str:
    """URL of a fresh, empty database of this test's own; use it as
    ``settings_factory(database_url=postgres_database)``."""
    return postgres_database_factory()


# --- service processes -------------------------------------------------------------------


class ServiceProcess:
    """An ``ordermesh`` subcommand run as a child process, with its log in a file."""

    def __init__(self, args: list[str], settings: Settings, log_path: Path) -> None:
        env = dict(os.environ)
        env.update(settings_env(settings))
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ordermesh", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def settings_env(settings: Settings) -> dict[str, str]:
    """The ORDERMESH_* environment that reproduces ``settings`` in a child process."""
    return settings.as_env()


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ordermesh services as child processes; all are stopped (by PID) at the end."""
    started: list[ServiceProcess] = []

    def start(args: list[str], settings: Settings, name: str | None = None) -> ServiceProcess:
        log_name = f"{name or args[0]}-{len(started)}.log"
        proc = ServiceProcess(args, settings, tmp_path / log_name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            proc.signal(signal.SIGKILL)
            proc.wait(30)


def wait_for(
    condition: Callable[[], Any], deadline_s: float, what: str, interval: float = 0.25
) -> Any:
    """Poll ``condition`` until it returns a truthy value, or fail naming ``what``."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {deadline_s:.0f}s waiting for {what}")
