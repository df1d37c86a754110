"""Three inventory instances and two trackers on one PostgreSQL, SIGKILL one mid-load.

Every instance has a data dir of its own, as if it ran on its own host: the database is
the only state they share. Stock is seeded at half the demand on 50 Zipf-hot SKUs, so
every instance contends for the same few rows and most SKUs run out while orders keep
coming; an oversell (two instances reserving the same unit) shows up as negative or
unconserved stock.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ordermesh.broker.local import LocalCluster
from ordermesh.config import Settings
from ordermesh.kafka.admin import ensure_topics
from ordermesh.kafka.client import make_admin
from ordermesh.kafka.groups import describe_groups
from ordermesh.kafka.lag import group_lag
from ordermesh.kafka.reader import end_offsets
from ordermesh.loadgen import OrderGenerator, run_load, sku_name
from ordermesh.stores.factory import migrate, open_inventory_store
from ordermesh.topics import COMMANDS, EVENTS, ORDERS
from ordermesh.topology import group_topics
from ordermesh.verify import consuming_groups, verify, wait_drained
from tests.conftest import ServiceProcess, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

ORDERS_COUNT = 60_000
SKUS = 50
LOAD_SEED = 4242
# fast enough to keep CI short, slow enough that the kill lands while orders still arrive
LOAD_RATE = 6_000.0


def demand_per_sku(count: int, skus: int, seed: int) -> Counter[str]:
    """Units the load of ``seed`` asks for, per SKU (the generator is pure and seeded)."""
    generator = OrderGenerator(seed, skus=skus)
    demand: Counter[str] = Counter()
    for _ in range(count):
        for item in generator.next_order().items:
            demand[item.sku] += item.quantity
    return demand


def events_written(settings: Settings) -> int:
    return sum(high for _low, high in end_offsets(settings, settings.topic(EVENTS)).values())


def members_with_partitions(settings: Settings, group: str) -> int:
    """How many members of ``group`` hold at least one partition."""
    found = describe_groups(settings, make_admin(settings), {group: group_topics()[group]})
    return sum(1 for m in found["groups"][group]["members"] if m["partitions"])


def test_three_inventories_two_trackers_on_postgres_survive_a_sigkill(
    kafka_cluster3: LocalCluster,
    postgres_database: str,
    service_factory: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> None:
    state = kafka_cluster3.load_state()
    assert state is not None
    settings = Settings(
        bootstrap_servers=state.bootstrap_servers,
        topic_prefix=f"s{uuid.uuid4().hex[:10]}-",
        database_url=postgres_database,
        data_dir=tmp_path / "operator",
        # scarce stock on purpose: no supplier refills it meanwhile
        reorder_point=0,
    )
    reports = ensure_topics(make_admin(settings), settings)
    assert all(r.replication_factor == 3 for r in reports)
    migrate(settings)

    # half of each SKU's demand: about half the units can be reserved, the rest rejected
    demand = demand_per_sku(ORDERS_COUNT, SKUS, LOAD_SEED)
    assert set(demand) == {sku_name(i) for i in range(1, SKUS + 1)}
    seeded = {sku: max(1, units // 2) for sku, units in demand.items()}
    with open_inventory_store(settings) as store:
        assert store.seed(seeded) == SKUS

    def on_host(name: str) -> Settings:
        return settings.model_copy(update={"data_dir": tmp_path / "hosts" / name})

    def start(service: str, name: str) -> ServiceProcess:
        return service_factory([service, "run"], on_host(name), name)

    inventories = [start("inventory", f"inventory-{i}") for i in range(1, 4)]
    trackers = [start("tracker", f"tracker-{i}") for i in range(1, 3)]
    # every instance holds partitions before the load starts, so the kill hits real work
    wait_for(
        lambda: members_with_partitions(settings, "inventory") == 3,
        90,
        "3 inventory members with partitions",
        interval=0.5,
    )
    wait_for(
        lambda: members_with_partitions(settings, "tracker") == 2,
        90,
        "2 tracker members with partitions",
        interval=0.5,
    )

    with ThreadPoolExecutor(1, thread_name_prefix="load") as pool:
        loading = pool.submit(
            run_load,
            settings,
            count=ORDERS_COUNT,
            duration=None,
            rate=LOAD_RATE,
            malformed_ratio=0.0,
            seed=LOAD_SEED,
            skus=SKUS,
        )
        wait_for(lambda: events_written(settings) > 5_000, 120, "the inventory to be mid-stream")
        victim = inventories[1]
        victim.signal(signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
        assert not loading.done(), "killed too late: the load was over"
        lag = group_lag(settings, "inventory", [settings.topic(ORDERS), settings.topic(COMMANDS)])
        assert sum(lag.values()) > 0, "killed too late: nothing left to redeliver"
        inventories.append(start("inventory", "inventory-4"))
        summary = loading.result(timeout=180)
    assert summary.acknowledged == ORDERS_COUNT and summary.failed == 0

    assert wait_drained(settings, consuming_groups(), 240), "the groups did not drain"
    # a clean stop of every survivor: each commits what it did and exits 0
    for proc in [p for p in inventories if p is not victim] + trackers:
        assert proc.stop() == 0, proc.log_text()[-3000:]

    report = verify(settings)
    assert report.ok, (report.violation_counts, report.violations)
    assert report.pending == 0, report.pending_counts
    assert report.orders_records == ORDERS_COUNT
    assert report.valid_orders == ORDERS_COUNT
    # one outcome per order (identical copies may follow a kill, never different ones)
    assert sum(report.outcomes.values()) == ORDERS_COUNT
    assert report.outcomes["OrderReserved"] > 0
    assert report.outcomes["OrderRejected.OUT_OF_STOCK"] > 0
    assert report.tracker_checked
    assert report.tracker_orders == ORDERS_COUNT
    assert report.tracker_missing == 0 and report.tracker_mismatches == 0

    # straight from the shared store: no SKU oversold, every unit accounted for
    with open_inventory_store(settings, readonly=True) as store:
        stock = {row.sku: row for row in store.stock()}
        movements = store.movements_total()
    assert set(stock) == set(seeded)
    assert movements == seeded
    for sku, units in seeded.items():
        row = stock[sku]
        assert row.available >= 0 and row.reserved >= 0, row
        assert row.available + row.reserved == units, row
    # the hot SKUs sold out: the contention was real
    assert stock[sku_name(1)].available < seeded[sku_name(1)] // 10
