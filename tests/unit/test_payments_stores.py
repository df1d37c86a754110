"""The payments and fulfilment stores on both backends: rows, leases, the outbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ordermesh.config import Settings
from ordermesh.stores.factory import open_fulfilment_store, open_payments_store
from ordermesh.stores.fulfilment import ShipmentRow
from ordermesh.stores.outbox import OutboxRecord
from ordermesh.stores.payments import PaymentRow
from tests.store_backends import BACKENDS, migrated_database


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "postgres":
        return Settings(database_url=migrated_database(request), data_dir=tmp_path)
    return Settings(data_dir=tmp_path)


@pytest.fixture
def two_payment_stores(settings: Settings) -> Iterator[tuple[Any, Any]]:
    a, b = open_payments_store(settings), open_payments_store(settings)
    yield a, b
    a.close()
    b.close()


def row(order_id: str, due_at: float = 10.0, op: Any = "authorize") -> PaymentRow:
    return PaymentRow(
        order_id, 1234, "EUR", "c1", "4242", "pending", "authorized", "", "", False, op,
        0, due_at, 0.0, "", 1.0, 1.0,
    )  # fmt: skip


def test_rows_round_trip_and_leases_split_the_work(two_payment_stores: tuple[Any, Any]) -> None:
    a, b = two_payment_stores
    with a.transaction():
        a.save([row("o1", 5.0), row("o2", 6.0), row("o3", 50.0), row("o4", 1.0, op=None)])
    assert a.load(["o1", "nope"]) == {"o1": row("o1", 5.0)}
    assert a.due_count() == 3
    claimed = a.claim(10.0, 30.0, 1, "wa")
    assert [(r.order_id, r.claim_token, r.started, r.claimed_until) for r in claimed] == [
        ("o1", "wa", True, 40.0)
    ]
    # the other instance gets the rest of what is due, never the leased row
    assert [r.order_id for r in b.claim(10.0, 30.0, 10, "wb")] == ["o2"]
    assert b.claim(11.0, 30.0, 10, "wb") == []
    # both leases ran out (their workers died): claimable again, by anyone
    assert [r.order_id for r in b.claim(41.0, 30.0, 10, "wb")] == ["o1", "o2"]
    assert b.load(["o1"])["o1"].claim_token == "wb"


def test_outbox_claims_publishes_and_releases(two_payment_stores: tuple[Any, Any]) -> None:
    a, b = two_payment_stores
    with a.transaction():
        a.add_outbox([OutboxRecord("t", b"k1", b"v1"), OutboxRecord("t", b"k2", b"v2")], 1.0)
    first = a.claim_outbox(2.0, 30.0, 1)
    assert [(r.key, r.value) for r in first] == [(b"k1", b"v1")]
    assert [r.key for r in b.claim_outbox(2.0, 30.0, 10)] == [b"k2"]
    a.mark_published([first[0].id], 3.0)
    assert a.unpublished_count() == 1
    assert a.claim_outbox(4.0, 30.0, 10) == []  # k2 is leased to b
    b.release_outbox([r.id for r in a.claim_outbox(100.0, 30.0, 10)])
    assert [r.key for r in a.claim_outbox(5.0, 30.0, 10)] == [b"k2"]
    assert a.unpublished_count() == 1


def test_fulfilment_store_claims_due_shipments(settings: Settings) -> None:
    store = open_fulfilment_store(settings)
    try:
        with store.transaction():
            store.save(
                [
                    ShipmentRow("o1", "shp-o1", "scheduled", 5.0, 1.0, 0.0),
                    ShipmentRow("o2", "shp-o2", "scheduled", 50.0, 1.0, 0.0),
                    ShipmentRow("o3", "shp-o3", "dropped", 1.0, 1.0, 2.0),
                ]
            )
        assert store.scheduled_count() == 2
        with store.transaction():
            due = store.claim_due(10.0, 100)
            store.save([d._replace(state="ready", done_at=10.0) for d in due])
        assert [d.order_id for d in due] == ["o1"]
        assert store.load(["o1"])["o1"].state == "ready"
        assert store.scheduled_count() == 1
    finally:
        store.close()
