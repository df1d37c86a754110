"""Orders belong to the API client whose key placed them: the pure rules, the stores'
owner filter on each backend, its migrations, and the long poll reading as its caller.

The HTTP routes over the real broker are ``tests/integration/test_api_owners.py``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psycopg
import pytest
from pydantic import SecretStr

from ordermesh import schema
from ordermesh.api.access import OPEN, ApiKeys, Caller
from ordermesh.api.app import body_hash
from ordermesh.api.idempotency import client_for_api_key
from ordermesh.api.tracking import OrderReader
from ordermesh.config import Settings
from ordermesh.errors import DecodeError
from ordermesh.schema import OrderItem, OrderPlaced
from ordermesh.stores import postgres_tracker, sqlite_tracker
from ordermesh.stores.factory import migrate
from ordermesh.stores.postgres import PostgresDatabase
from ordermesh.stores.postgres_tracker import PostgresTrackerStore
from ordermesh.stores.sqlite_tracker import SqliteOrderQueries, SqliteTrackerStore
from tests.store_backends import BACKENDS, migrated_database
from tests.unit.test_stores import at_version, version_of
from tests.unit.test_tracker_service import placed, reserved, service_for

Store = SqliteTrackerStore | PostgresTrackerStore
ALICE = client_for_api_key(b"alice-key")
BOB = client_for_api_key(b"bob-key")


def order(order_id: str, api_client: str | None = None) -> OrderPlaced:
    placed_order = OrderPlaced(
        order_id=order_id,
        customer_id="c-1",
        items=(OrderItem("A", 2, 2.5),),
        currency="EUR",
        total=5.0,
        created_at=100.0,
    )
    if api_client is None:
        return placed_order
    return msgspec.structs.replace(placed_order, api_client=api_client)


# --- who is who ------------------------------------------------------------------------


def test_each_key_is_a_client_and_operator_keys_see_everything() -> None:
    keys = ApiKeys(["alice-key", "bob-key", "both-key"], ["ops-key", "both-key"])
    alice = keys.identify(b"alice-key")
    assert alice == Caller(ALICE) and alice.sees == ALICE and alice.owner == ALICE
    ops = keys.identify(b"ops-key")
    assert ops is not None and ops.operator and ops.sees is None
    # an operator's own orders carry its id, like a client's
    assert ops.owner == client_for_api_key(b"ops-key")
    both = keys.identify(b"both-key")
    assert both is not None and both.operator  # a key in both lists operates
    assert keys.identify(b"alice-ke") is None and keys.identify(b"") is None
    assert (keys.clients, keys.operators) == (2, 2)
    # the log line counts keys, it never names one
    assert keys.describe() == "on (2 client keys, 2 operator keys)"
    assert "key-" not in keys.describe() and "alice" not in keys.describe()


def test_without_keys_every_caller_is_open_and_sees_every_order() -> None:
    keys = ApiKeys([], [])
    assert not keys.enabled and keys.identify(b"anything") is None
    assert OPEN.sees is None and OPEN.owner is msgspec.UNSET and OPEN.client == ""
    assert keys.describe().startswith("off")


def test_operator_keys_come_from_their_own_setting() -> None:
    settings = Settings(
        api_keys=SecretStr("alice-key, bob-key"), api_operator_keys=SecretStr(" ops-key ,")
    )
    assert settings.api_operator_key_set() == {"ops-key"}
    keys = ApiKeys.from_settings(settings)
    assert (keys.clients, keys.operators) == (2, 1)
    assert "ops-key" not in repr(settings)  # a secret, as api_keys is


# --- the wire: an optional field, old records read as before ----------------------------


def test_an_order_without_api_client_encodes_and_decodes_as_before() -> None:
    old = order("o1")
    raw = schema.encode(old)
    assert b"api_client" not in raw  # unset: not on the wire at all
    decoded = schema.decode_order(raw)
    assert decoded == old and decoded.owner() is None

    owned = order("o1", ALICE)
    raw_owned = schema.encode(owned)
    assert schema.decode_order(raw_owned).owner() == ALICE
    # what the order asks for is the same: same fingerprint, same idempotency body hash
    assert schema.order_fingerprint(owned) == schema.order_fingerprint(old)
    assert body_hash(owned) == body_hash(old)
    with pytest.raises(DecodeError):  # an empty id is no owner
        schema.decode_order(raw[:-1] + b',"api_client":""}')


# --- the stores: the owner is stored with the order and filters reads --------------------


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store
    if request.param == "postgres":
        opened = PostgresTrackerStore(migrated_database(request))
    else:
        opened = SqliteTrackerStore(tmp_path / "tracker.db")
    with opened as s:
        yield s


def test_a_client_reads_only_its_own_orders(store: Store) -> None:
    service = service_for(store)
    service.handle([placed(order("a1", ALICE)), placed(order("b1", BOB)), placed(order("load1"))])
    service.handle([reserved("a1")])

    assert store.get_order("a1", api_client=ALICE) is not None
    # another client's order is not there for it, nor an order of no client
    assert store.get_order("a1", api_client=BOB) is None
    assert store.get_order("load1", api_client=ALICE) is None
    assert store.get_order("nope", api_client=ALICE) is None
    # without a client (operators, the CLI, verify): every order
    assert {oid for oid in ("a1", "b1", "load1") if store.get_order(oid)} == {"a1", "b1", "load1"}

    def ids(**filters: str) -> list[str]:
        return [v.order_id for v in store.list_orders(**filters).orders]  # type: ignore[arg-type]

    assert ids(api_client=ALICE) == ["a1"]
    assert ids(api_client=BOB) == ["b1"]
    assert ids() == ["a1", "b1", "load1"]
    assert ids(api_client=ALICE, status="RESERVED") == ["a1"]
    assert ids(api_client=BOB, status="RESERVED") == []
    # a page of a client's orders is a page of its own: the cursor never leaks others
    page = store.list_orders(api_client=ALICE, limit=1)
    assert page.next_cursor is None


def test_a_later_copy_never_changes_the_owner(store: Store) -> None:
    service = service_for(store)
    service.handle([placed(order("a1", ALICE))])
    service.handle([placed(order("a1", BOB)), placed(order("a1"))])  # same body, redelivered
    assert store.get_order("a1", api_client=ALICE) is not None
    assert store.get_order("a1", api_client=BOB) is None


def test_a_version_3_sqlite_database_gains_the_owner_column(tmp_path: Path) -> None:
    path = tmp_path / "tracker.db"
    at_version(path, sqlite_tracker.MIGRATIONS, 3)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO orders (order_id, customer_id, status, items, total, currency,"
            " created_at, placed_at, updated_at, seq) VALUES"
            " ('o-old', 'c-1', 'PLACED', '[]', 5.0, 'EUR', 100.0, 100.0, 100.0, 1)"
        )
    with SqliteTrackerStore(path) as store:
        assert version_of(path) == len(sqlite_tracker.MIGRATIONS) == 4
        # an order from before owners: no client's, so only operators see it
        assert store.get_order("o-old") is not None
        assert store.get_order("o-old", api_client=ALICE) is None
        service_for(store).handle([placed(order("o-new", ALICE))])
    with SqliteOrderQueries(path) as queries:
        assert [v.order_id for v in queries.list_orders(api_client=ALICE).orders] == ["o-new"]


def test_a_version_2_postgres_schema_gains_the_owner_column(postgres_database: str) -> None:
    url = postgres_database
    old = PostgresDatabase(
        url, name="tracker", migrations=postgres_tracker.MIGRATIONS[:2], lazy=True
    )
    old.migrate()
    old.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tracker.orders (order_id, customer_id, status, items, total, currency,"
            " created_at, placed_at, updated_at, seq) VALUES"
            " ('o-old', 'c-1', 'PLACED', '[]', 5.0, 'EUR', 100.0, 100.0, 100.0, 1)"
        )
    assert "tracker: schema version 3: orders.api_client" in " ".join(
        migrate(Settings(database_url=url))
    )
    with PostgresTrackerStore(url) as store:
        assert store.get_order("o-old") is not None
        assert store.get_order("o-old", api_client=ALICE) is None
        service_for(store).handle([placed(order("o-new", ALICE))])
        assert [v.order_id for v in store.list_orders(api_client=ALICE).orders] == ["o-new"]


# --- the long poll reads as its caller ---------------------------------------------------


def test_a_waiter_never_sees_another_clients_order(tmp_path: Path) -> None:
    path = tmp_path / "tracker.db"
    writer = SqliteTrackerStore(path)
    service = service_for(writer)
    reader = OrderReader(SqliteOrderQueries(path), poll_interval_s=0.01)

    async def scenario() -> None:
        service.handle([placed(order("a1", ALICE))])
        # both wait for a1's decision: alice's waiter is answered, bob's runs out and
        # reads nothing, exactly as if he waited for an order that does not exist
        alice = asyncio.create_task(reader.wait_decided("a1", 10.0, ALICE))
        bob = asyncio.create_task(reader.wait_decided("a1", 0.5, BOB))
        nobody = asyncio.create_task(reader.wait_decided("nope", 0.5, BOB))
        while reader.waiting < 3:
            await asyncio.sleep(0.01)
        service.handle([reserved("a1")])
        view = await asyncio.wait_for(alice, 10.0)
        assert view is not None and view.status == "RESERVED"
        assert not bob.done()  # decided, but not for bob: he keeps waiting
        assert await bob is None and await nobody is None
        operator = await reader.wait_decided("a1", 5.0)
        assert operator is not None and operator.status == "RESERVED"

    try:
        asyncio.run(scenario())
    finally:
        reader.close()
        writer.close()
