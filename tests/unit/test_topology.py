"""Everything that lists services, groups or topics derives from ``topology``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from ordermesh import mesh, topology
from ordermesh.api import health
from ordermesh.apps.base import service_runner
from ordermesh.config import Settings
from ordermesh.kafka.assignment import EveryPartition
from ordermesh.records import InRecord, OutRecord

NOWHERE = "127.0.0.1:9"


class Nothing:
    def handle(self, batch: list[InRecord]) -> list[OutRecord]:
        return []


def test_mesh_and_health_derive_from_the_topology() -> None:
    scalable = topology.scalable()
    assert scalable == mesh.SCALABLE == ("inventory", "payments", "fulfilment", "tracker", "api")
    groups = topology.group_topics()
    assert groups == mesh.GROUP_TOPICS
    stateful = topology.group_topics(stateful_only=True)
    assert stateful == health.LAG_GROUPS
    assert set(stateful) == {"inventory", "payments", "fulfilment", "tracker"}


def test_every_consumer_has_an_app_module() -> None:
    for spec in topology.consumers():
        module = importlib.import_module(f"ordermesh.apps.{spec.name.replace('-', '_')}")
        assert getattr(module, "SPEC", None) is spec, module.__name__


@pytest.mark.parametrize("spec", topology.consumers(), ids=lambda s: s.name)
def test_runners_take_group_topics_and_assignment_from_their_spec(
    spec: topology.ServiceSpec,
) -> None:
    settings = Settings(bootstrap_servers=NOWHERE, topic_prefix="unit-")
    consumer = Consumer({"bootstrap.servers": NOWHERE, "group.id": "unit"})
    runner = service_runner(
        settings,
        spec,
        Nothing(),
        consumer=consumer,
        producer=Producer({"bootstrap.servers": NOWHERE}),
    )
    assert runner.name == spec.name
    assert runner.topics == [f"unit-{t}" for t in spec.consumes]
    assert runner.metrics.group == settings.group(spec.group or "")
    if spec.per_partition_assignment:
        assert isinstance(runner.consumer, EveryPartition)
    else:
        assert runner.consumer is consumer
    consumer.close()


def _readme_table() -> str:
    """The README's "what runs" table as the topology declares it."""

    def topics(names: tuple[str, ...]) -> str:
        return ", ".join(f"`{n}`" for n in names) or "—"

    rows = [
        "| service | command | consumer group | consumes | produces | scales out | owns |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in topology.SERVICES:
        rows.append(
            f"| {spec.name} | `ordermesh {' '.join(spec.command)}` | {spec.group or '—'} "
            f"| {topics(spec.consumes)} | {topics(spec.produces)} "
            f"| {'yes' if spec.scalable else 'no'} | {spec.owns} |"
        )
    return "\n".join(rows) + "\n"


def test_readme_what_runs_table_is_the_topology() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    expected = _readme_table()
    assert expected in readme, (
        "README's table differs from topology.py; it should read:\n" + expected
    )


def test_a_new_consumer_service_needs_no_cli_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    import typer
    from typer.testing import CliRunner

    from ordermesh.cli.services import register_service_commands

    calls: list[tuple[Settings, float | None]] = []
    module = types.ModuleType("ordermesh.apps.fraud_check")

    def run_fraud_check(settings: Settings, *, idle_exit_s: float | None = None) -> None:
        calls.append((settings, idle_exit_s))

    module.run_fraud_check = run_fraud_check  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ordermesh.apps.fraud_check", module)
    spec = topology.ServiceSpec(
        "fraud-check",
        ("fraud", "run"),
        group="fraud-check",
        consumes=("orders",),
        produces=(),
        scalable=True,
    )
    from ordermesh.cli import app

    # the real app already has every existing service's command: nothing is added twice
    assert register_service_commands(app, topology.SERVICES) == []
    fresh = typer.Typer()
    fresh.command("noop")(lambda: None)
    assert register_service_commands(fresh, [*topology.SERVICES, spec]) == [
        "inventory run",
        "payments run",
        "fulfilment run",
        "tracker run",
        "dlq run",
        "analytics run",
        "fraud run",
    ]
    out = CliRunner().invoke(
        fresh, ["fraud", "run", "--bootstrap-server", "h:1", "--idle-exit", "2"]
    )
    assert out.exit_code == 0, out.output
    ((settings, idle),) = calls
    assert settings.bootstrap_servers == "h:1" and idle == 2.0
