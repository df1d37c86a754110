"""PostgreSQL stopped under load and started again: the services pause, hold and resume.

The inventory and the tracker run as processes on a PostgreSQL of this test's own, so
that it can be stopped as a crash would (``pg_ctl stop -m immediate``) while orders keep
coming, and started again on the same data and port 10 s later. Neither process exits,
each says so once when the outage starts and once when it ends, and in the end every
order has exactly one outcome and one row in either store. A stop during the outage
exits cleanly without committing the held batch, and the next run handles it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from ordermesh.config import Settings
from ordermesh.kafka.reader import end_offsets
from ordermesh.kafka.runner import STOP_DEADLINE_S
from ordermesh.loadgen import run_load
from ordermesh.postgres.local import LocalPostgres
from ordermesh.stores.factory import migrate, open_inventory_store, open_order_queries
from ordermesh.topics import EVENTS
from ordermesh.verify import consuming_groups, verify, wait_drained
from tests.conftest import ServiceProcess, SettingsFactory, wait_for
from tests.integration.test_inventory_pipeline import seed

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORDERS_COUNT = 3_000
LOAD_RATE = 120.0  # 25 s of orders: the outage lands in the middle
SKUS = 50
STOCK = 1_000
OUTAGE_S = 10.0
STARTED = "WARNING ordermesh.kafka.runner: {name}: store unavailable ("
ENDED = "INFO ordermesh.kafka.runner: {name}: store available again after "


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[LocalPostgres]:
    """A PostgreSQL server of this test's own (the session's is shared)."""
    server = LocalPostgres(tmp_path / "pg", fast=True)
    state, _ = server.up()
    # fsync stays off, but a commit reaches the OS before it is answered: a stop that
    # skips the shutdown checkpoint (-m immediate) then loses no committed transaction
    with psycopg.connect(state.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET synchronous_commit = on")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield server
    finally:
        server.down()
        server.purge()


def events_written(settings: Settings) -> int:
    return sum(high for _low, high in end_offsets(settings, settings.topic(EVENTS)).values())


def lines(proc: ServiceProcess, name: str, what: str) -> int:
    return proc.log_text().count(what.format(name=name))


def assert_alive(services: dict[str, ServiceProcess]) -> None:
    exited = {name: proc.wait(1) for name, proc in services.items() if not proc.alive()}
    if exited:
        logs = "\n".join(
            f"--- {name} exited ({code}):\n{services[name].log_text()[-3000:]}"
            for name, code in exited.items()
        )
        pytest.fail(logs, pytrace=False)


def test_inventory_and_tracker_ride_out_a_postgres_restart(
    settings_factory: SettingsFactory,
    own_postgres: LocalPostgres,
    service_factory: Callable[..., ServiceProcess],
) -> None:
    state = own_postgres.load_state()
    assert state is not None
    # no restocks: every unit seeded is either available or reserved at the end
    settings = settings_factory(database_url=state.url(), reorder_point=0)
    migrate(settings)
    seed(settings, skus=SKUS, stock=STOCK)
    services = {
        name: service_factory([name, "run"], settings, name) for name in ("inventory", "tracker")
    }
    wait_for(
        lambda: all(f"{n}: assigned" in p.log_text() for n, p in services.items()),
        60,
        "both services to hold their partitions",
    )

    with ThreadPoolExecutor(1, thread_name_prefix="load") as pool:
        loading = pool.submit(
            run_load,
            settings,
            count=ORDERS_COUNT,
            duration=None,
            rate=LOAD_RATE,
            malformed_ratio=0.0,
            seed=11,
            skus=SKUS,
        )
        wait_for(lambda: events_written(settings) > 200, 60, "the inventory to be mid-stream")
        own_postgres.down(immediate=True)
        down_at = time.monotonic()
        wait_for(
            lambda: (
                time.monotonic() - down_at >= OUTAGE_S
                or not all(p.alive() for p in services.values())
            ),
            OUTAGE_S + 5,
            f"{OUTAGE_S:.0f}s of outage",
        )
        assert_alive(services)
        assert not loading.done(), "restarted too late: the load was over"
        for name, proc in services.items():
            assert lines(proc, name, STARTED) == 1, proc.log_text()[-3000:]
            assert lines(proc, name, ENDED) == 0
        restarted, _ = own_postgres.up()
        assert restarted.port == state.port
        summary = loading.result(timeout=120)
    assert summary.acknowledged == ORDERS_COUNT and summary.failed == 0

    wait_for(
        lambda: all(lines(p, n, ENDED) == 1 for n, p in services.items()),
        60,
        "both services to resume",
    )
    assert wait_drained(settings, consuming_groups(), 120), "the groups did not drain"
    assert_alive(services)
    for name, proc in services.items():
        assert proc.stop() == 0, proc.log_text()[-3000:]
        assert lines(proc, name, STARTED) == 1 and lines(proc, name, ENDED) == 1

    report = verify(settings)
    assert report.ok, (report.violation_counts, report.violations)
    assert report.pending == 0, report.pending_counts
    assert report.valid_orders == ORDERS_COUNT
    # one outcome per order (an identical copy may follow a commit whose answer was lost)
    assert sum(report.outcomes.values()) == ORDERS_COUNT
    assert report.tracker_checked and report.tracker_orders == ORDERS_COUNT
    assert report.tracker_missing == report.tracker_mismatches == 0
    with open_inventory_store(settings, readonly=True) as store:
        assert len(store.order_outcomes()) == ORDERS_COUNT
        for row in store.stock():
            assert row.available >= 0 and row.available + row.reserved == STOCK, row
    with open_order_queries(settings) as queries:
        assert queries.pending_count() == 0


def test_a_stop_during_the_outage_exits_cleanly_and_the_next_run_redoes_the_batch(
    settings_factory: SettingsFactory,
    own_postgres: LocalPostgres,
    service_factory: Callable[..., ServiceProcess],
) -> None:
    state = own_postgres.load_state()
    assert state is not None
    settings = settings_factory(database_url=state.url(), reorder_point=0)
    migrate(settings)
    seed(settings, skus=SKUS, stock=STOCK)
    first = service_factory(["inventory", "run"], settings, "inventory")
    wait_for(lambda: "inventory: assigned" in first.log_text(), 60, "the inventory's partitions")
    own_postgres.down(immediate=True)
    summary = run_load(
        settings, count=300, duration=None, rate=None, malformed_ratio=0.0, seed=12, skus=SKUS
    )
    assert summary.acknowledged == 300
    wait_for(lambda: lines(first, "inventory", STARTED) == 1, 60, "the inventory to hold a batch")
    # past the first retry (after 0.5 s): the stop comes while a retry waits for the pool
    held_at = time.monotonic()
    wait_for(lambda: time.monotonic() - held_at > 2.0, 5, "the first retry")

    asked = time.monotonic()
    assert first.stop(timeout=60) == 0, first.log_text()[-3000:]
    took = time.monotonic() - asked
    assert took < STOP_DEADLINE_S, f"the stop took {took:.1f}s"
    assert "inventory: stopping with the store unavailable" in first.log_text()
    assert lines(first, "inventory", ENDED) == 0

    own_postgres.up()
    second = service_factory(["inventory", "run"], settings, "inventory")
    assert wait_drained(settings, ["inventory"], 90), "the inventory did not catch up"
    assert second.stop() == 0, second.log_text()[-3000:]
    report = verify(settings, check_tracker=False)
    assert report.ok, (report.violation_counts, report.violations)
    assert report.valid_orders == 300 and sum(report.outcomes.values()) == 300
    with open_inventory_store(settings, readonly=True) as store:
        assert len(store.order_outcomes()) == 300
