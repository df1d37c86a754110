"""``verify`` on the real broker: missing stores, pending work, and work committed but lost."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from ordermesh import schema
from ordermesh.apps.inventory import inventory_runner
from ordermesh.apps.tracker import tracker_runner
from ordermesh.cli import app
from ordermesh.config import Settings
from ordermesh.kafka.client import make_producer
from ordermesh.kafka.runner import BatchRunner
from ordermesh.loadgen import run_load
from ordermesh.records import InRecord, OutRecord
from ordermesh.stores.factory import open_inventory_store, open_tracker_store
from ordermesh.topics import COMMANDS, EVENTS, ORDERS
from ordermesh.verify import verify
from tests.conftest import settings_env
from tests.integration.test_inventory_pipeline import seed


def produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = make_producer(settings)
    for value in values:
        producer.produce(settings.topic(topic), value, b"k")
    assert producer.flush(30) == 0


def cancel(order_id: str) -> bytes:
    return schema.encode(schema.CancelOrder(order_id=order_id, requested_at=1.0, reason="t"))


def cli_verify(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(app, ["verify", "--json", *args], env=settings_env(settings))
    return result.exit_code, json.loads(result.stdout)


class DropEverything:
    """A broken consumer: handles nothing, yet its runner commits the offsets."""

    def handle(self, batch: list[InRecord]) -> list[OutRecord]:
        return []


def test_missing_stores_fail_and_are_never_created(settings: Settings) -> None:
    report = verify(settings)
    assert not report.ok
    assert report.violation_counts == {"inventory_store_missing": 1, "tracker_store_missing": 1}
    assert verify(settings, check_tracker=False).violation_counts == {"inventory_store_missing": 1}
    assert not settings.inventory_db_path().exists()
    assert not settings.tracker_db_path().exists()


def test_unprocessed_work_is_pending_until_the_services_catch_up(settings: Settings) -> None:
    seed(settings, skus=50, stock=20)
    summary = run_load(
        settings, count=400, duration=None, rate=None, malformed_ratio=0.05, seed=3, skus=55
    )
    valid = 400 - summary.malformed_sent
    produce(settings, COMMANDS, [cancel("ord-3-000000001"), cancel("nobody"), b"not json"])

    # nothing processed yet: nothing is lost, everything is pending
    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    assert report.pending_counts == {
        "lost": valid,
        "invalid_not_in_dlq": summary.malformed_sent,
        "cancel_without_effect": 2,
        "invalid_command_not_in_dlq": 1,
    }
    code, shown = cli_verify(settings, "--no-tracker", "--wait-drained", "0")
    assert code == 1 and shown["ok"] is True and shown["drained"] is False
    assert shown["pending"] == report.pending

    with open_inventory_store(settings) as store:
        inventory_runner(settings, store).run(idle_exit_s=2.0)
    code, shown = cli_verify(settings, "--no-tracker", "--wait-drained", "30")
    assert code == 0, shown["violations"]
    assert shown["pending"] == 0 and shown["drained"] is True
    assert shown["valid_orders"] == valid and shown["cancel_commands"] == 2

    # a deployment with a tracker: no tracker store is a failure, an idle tracker is pending
    assert verify(settings).violation_counts == {"tracker_store_missing": 1}
    open_tracker_store(settings).close()
    report = verify(settings)
    assert report.ok and report.pending_counts == {"tracker_missing": valid}
    with open_tracker_store(settings) as tracker:
        tracker_runner(settings, tracker).run(idle_exit_s=2.0)
    report = verify(settings)
    assert report.ok and report.pending == 0, (report.violations, report.pending_counts)
    assert report.tracker_checked and report.tracker_orders == valid


def test_work_committed_without_effects_is_lost(settings: Settings) -> None:
    seed(settings, skus=50, stock=20)
    summary = run_load(
        settings, count=200, duration=None, rate=None, malformed_ratio=0.05, seed=4, skus=50
    )
    produce(settings, COMMANDS, [cancel("nobody"), b"not json"])
    produce(settings, EVENTS, [b"{not an event"])
    BatchRunner(
        settings,
        group="inventory",
        topics=[settings.topic(ORDERS), settings.topic(COMMANDS)],
        handler=DropEverything(),
        name="dropper",
    ).run(idle_exit_s=2.0)

    report = verify(settings, check_tracker=False)
    assert not report.ok and report.pending == 0
    assert report.violation_counts == {
        "lost": 200 - summary.malformed_sent,
        "invalid_not_in_dlq": summary.malformed_sent,
        "cancel_without_effect": 1,
        "invalid_command_not_in_dlq": 1,
        "undecodable_event": 1,
    }
    code, shown = cli_verify(settings, "--no-tracker")
    assert code == 1 and shown["ok"] is False and shown["drained"] is None
