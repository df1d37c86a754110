"""The classic group protocol (``ORDERMESH_GROUP_PROTOCOL=classic``): eager range
assignment co-assigns ``orders`` and ``order-commands``, and a killed instance's
partitions move to the other with every order decided once.

The KIP-848 protocol (the default) is what every other consumer test runs; to run them
all under classic: ``make test-classic``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from ordermesh.kafka.client import make_admin
from ordermesh.kafka.groups import describe_groups
from ordermesh.kafka.lag import committed_offsets, group_lag
from ordermesh.loadgen import run_load, sku_name
from ordermesh.stores.factory import open_inventory_store
from ordermesh.topics import COMMANDS, ORDERS
from ordermesh.topology import service
from ordermesh.verify import verify
from tests.conftest import ServiceProcess, SettingsFactory, wait_for

pytestmark = pytest.mark.integration

ORDER_COUNT = 9_000
# every partition of every topic the inventory reads (6 each)
INVENTORY_PARTITIONS = 6 * len(service("inventory").consumes)


def _inventory_group(settings: Any) -> dict[str, Any]:
    found = describe_groups(settings, make_admin(settings), {"inventory": [ORDERS, COMMANDS]})
    entry: dict[str, Any] = found["groups"]["inventory"]
    return entry


def _split_between(entry: dict[str, Any], members: int) -> bool:
    """``members`` members, every partition of the inventory's topics among them."""
    assigned = [p for m in entry["members"] for p in m["partitions"]]
    return entry["member_count"] == members and len(assigned) == INVENTORY_PARTITIONS


def test_classic_rebalance(
    settings_factory: SettingsFactory, service_factory: Callable[..., ServiceProcess]
) -> None:
    settings = settings_factory(group_protocol="classic")
    with open_inventory_store(settings) as store:
        store.seed({sku_name(i): 100 for i in range(1, 201)})
    first = service_factory(["inventory", "run"], settings, "inv-a")
    second = service_factory(["inventory", "run"], settings, "inv-b")

    def shared() -> dict[str, Any] | None:
        entry = _inventory_group(settings)
        return entry if entry["state"] == "STABLE" and _split_between(entry, 2) else None

    entry = wait_for(shared, 60, "two classic members sharing the partitions")
    assert entry["type"] == "CLASSIC", entry
    for member in entry["members"]:
        mine = member["partitions"]
        orders = {p.removeprefix("orders") for p in mine if p.startswith("orders[")}
        commands = {
            p.removeprefix("order-commands") for p in mine if p.startswith("order-commands[")
        }
        events = {p.removeprefix("order-events") for p in mine if p.startswith("order-events[")}
        # range over topics of 6 partitions each: partition i of every one, 3 per member
        assert orders == commands == events and len(orders) == 3, entry["members"]

    # a paced load keeps orders arriving while one instance is killed
    load = threading.Thread(
        target=run_load,
        args=(settings,),
        kwargs=dict(
            count=ORDER_COUNT, duration=None, rate=3_000, malformed_ratio=0.0, seed=5, skus=200
        ),
    )
    load.start()
    try:
        wait_for(lambda: _committed(settings) > 1_500, 60, "the instances to be mid-stream")
        first.signal(signal.SIGKILL)
        first.wait(30)
    finally:
        load.join()

    # eager: the survivor gives up all of its partitions and gets all of them back
    wait_for(lambda: _split_between(_inventory_group(settings), 1), 60, "one member with all")
    topics = [settings.topic(ORDERS), settings.topic(COMMANDS)]
    wait_for(
        lambda: sum(group_lag(settings, "inventory", topics).values()) == 0,
        120,
        "the survivor to drain the topics",
    )
    assert second.stop() == 0, second.log_text()[-3000:]
    assert second.log_text().count("revoked") >= 1, second.log_text()[-3000:]

    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    assert report.pending == 0 and report.valid_orders == ORDER_COUNT
    # one decision per order: identical copies (a redelivery after the kill) are allowed,
    # two different outcomes are not (verify's conflicting_outcomes)
    assert sum(report.outcomes.values()) == ORDER_COUNT


def _committed(settings: Any) -> int:
    """Orders the inventory group has committed."""
    offsets = committed_offsets(settings, "inventory", [settings.topic(ORDERS)])
    return sum(max(0, offset) for offset in offsets.values())
