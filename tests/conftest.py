"""Shared fixtures: a real Kafka broker for the session, settings per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ordermesh.broker.jars import ensure_jars
from ordermesh.broker.local import LocalCluster
from ordermesh.config import Settings
from ordermesh.kafka.client import make_admin
from ordermesh.topics import ensure_topics

SettingsFactory = Callable[..., Settings]


def _start_cluster(root: Path, nodes: int) -> LocalCluster:
    base = Settings()
    jar_dir = ensure_jars(base.kafka_jar_dir(), base.kafka_version)
    cluster = LocalCluster(root, jar_dir, heap_mb=1024 if nodes == 1 else 768)
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
