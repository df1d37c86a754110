"""Topics on a cluster someone else runs: ``topics ensure`` uses bigger topics as they are
and says so, and ``verify`` says what retention deleted instead of calling it lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import ConfigResource, ResourceType  # type: ignore[attr-defined]

from ordermesh.apps.inventory import inventory_runner
from ordermesh.errors import TopicError
from ordermesh.kafka.admin import ensure_topics
from ordermesh.kafka.client import make_admin
from ordermesh.kafka.reader import end_offsets
from ordermesh.loadgen import run_load, sku_name
from ordermesh.stores.factory import open_inventory_store
from ordermesh.topics import EVENTS, ORDERS
from ordermesh.verify import verify
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration


def test_ensure_uses_bigger_topics_and_refuses_smaller_ones(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()  # the topics exist with 6 partitions (3 for the DLQ)
    fewer = settings.model_copy(update={"topic_partitions": 4, "topic_retention_ms": 3_600_000})
    reports = {r.name: r for r in ensure_topics(make_admin(fewer), fewer)}
    orders = reports[settings.topic(ORDERS)]
    assert orders.outcome == "exists" and orders.partitions == 6
    assert any("has 6 partitions, more than the 4 configured" in w for w in orders.warnings)
    assert any("retention.ms is 604800000, not the 3600000" in w for w in orders.warnings)

    more = settings.model_copy(update={"topic_partitions": 8})
    with pytest.raises(TopicError, match="has 6 partitions and RF 1, expected 8 partitions"):
        ensure_topics(make_admin(more), more)

    # the command: exit 0, a warning line and the warnings in its JSON
    env = {
        **os.environ,
        **settings.as_env(),
        "ORDERMESH_TOPIC_PARTITIONS": "4",
    }
    result = subprocess.run(
        [sys.executable, "-m", "ordermesh", "topics", "ensure", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    shown = {t["name"]: t for t in json.loads(result.stdout)}
    assert shown[settings.topic(ORDERS)]["warnings"] == [
        f"{settings.topic(ORDERS)}: has 6 partitions, more than the 4 configured"
        " (ORDERMESH_TOPIC_PARTITIONS); used as it is"
    ]
    assert "WARNING" in result.stderr and "more than the 4 configured" in result.stderr


def test_new_topics_get_the_configured_partitions_and_retention(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(topic_partitions=2, topic_retention_ms=3_600_000)
    assert {p for p in end_offsets(settings, settings.topic(ORDERS))} == {0, 1}
    resource = ConfigResource(ResourceType.TOPIC, settings.topic(EVENTS))
    admin = make_admin(settings)  # kept: the futures need their client alive
    (future,) = admin.describe_configs([resource]).values()
    assert future.result()["retention.ms"].value == "3600000"


def test_verify_says_what_retention_deleted(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    with open_inventory_store(settings) as store:
        store.seed({sku_name(i): 1_000 for i in range(1, 21)})
    run_load(settings, count=1_200, duration=None, rate=None, malformed_ratio=0.0, seed=9, skus=20)
    with open_inventory_store(settings) as store:
        inventory_runner(settings, store).run(idle_exit_s=2.0)
    assert verify(settings, check_tracker=False).ok

    # retention takes the first quarter of orders and the first half of order-events
    # (the outcomes of orders that are still there among them)
    admin = make_admin(settings)
    cut = []
    for name, share in ((ORDERS, 4), (EVENTS, 2)):
        topic = settings.topic(name)
        for partition, (_low, high) in end_offsets(settings, topic).items():
            cut.append(TopicPartition(topic, partition, high // share))
    for future in admin.delete_records(cut, request_timeout=30).values():
        future.result()

    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    assert report.unverifiable_counts["lost"] > 0
    assert report.unverifiable_counts["unknown_db_order"] > 0
    low = next(tp.offset for tp in cut if tp.topic == settings.topic(ORDERS) and tp.partition == 0)
    assert (
        f"records before offset {low} of orders[0] were deleted by retention:"
        " orders among them can't be checked"
    ) in report.deleted_by_retention
    assert len(report.deleted_by_retention) == 12  # 6 partitions of orders, 6 of order-events
