"""Ports of the local broker: ``broker up --port P`` takes P and the ports after it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ordermesh.broker.local import LocalCluster, free_port_run, port_free
from ordermesh.errors import BrokerError


def test_a_run_of_free_ports_is_free() -> None:
    first = free_port_run(4)
    assert all(port_free(p) for p in range(first, first + 4))


def test_a_taken_controller_port_is_refused_before_the_jvm_starts(tmp_path: Path) -> None:
    first = free_port_run(2)
    with socket.socket() as held:
        held.bind(("127.0.0.1", first + 1))
        held.listen()
        assert not port_free(first + 1)
        cluster = LocalCluster(tmp_path / "broker", tmp_path / "no-jars")
        with pytest.raises(BrokerError, match=f"port {first + 1} on 127.0.0.1 is in use"):
            cluster.up(port=first)
    assert not (tmp_path / "broker" / "cluster.json").exists()
