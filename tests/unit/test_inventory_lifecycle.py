"""The inventory as the arbiter of an order's life, over each store backend: every
transition and cancel stage, redeliveries, the late-payment race, restocks, reorders,
the deadline sweep's pass, and stock conservation. Deadlines run on a fake clock."""

from __future__ import annotations

import itertools
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ordermesh import lifecycle, schema
from ordermesh.apps.inventory import ASK_AGAIN_AFTER_S, DeadlineSweep
from ordermesh.config import Settings
from ordermesh.kafka.producer import Producer
from ordermesh.records import ERROR_HEADER_PREFIX, InRecord, OutRecord, header
from ordermesh.schema import (
    CancelOrder,
    CancelRejected,
    ExpireReservation,
    ItemQty,
    OrderCancelled,
    OrderItem,
    OrderPaid,
    OrderPaymentFailed,
    OrderPlaced,
    OrderReserved,
    OrderShipped,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    ReservationExpired,
    Restock,
    ShipmentReady,
    StockReleased,
)
from ordermesh.services.inventory import RESTOCK_REFUSED, InventoryService
from ordermesh.stores.inventory import StockLevels
from ordermesh.stores.postgres_inventory import PostgresInventoryStore
from ordermesh.stores.sqlite_inventory import SqliteInventoryStore
from tests.store_backends import BACKENDS, migrated_database

ORDERS = "orders"
COMMANDS = "order-commands"
EVENTS = "order-events"
DLQ = "orders-dlq"
TTL = 60.0
Store = SqliteInventoryStore | PostgresInventoryStore

_offsets = itertools.count()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def core(store: Store, clock: Clock, **supply: Any) -> InventoryService:
    return InventoryService(
        store,
        orders_topic=ORDERS,
        commands_topic=COMMANDS,
        events_topic=EVENTS,
        dlq_topic=DLQ,
        clock=clock,
        reservation_ttl_s=TTL,
        **supply,
    )


def rec(topic: str, value: bytes | None, key: bytes | None) -> InRecord:
    return InRecord(topic, 0, next(_offsets), key, value, [], 1_700_000_000_000)


def placed(order_id: str, *items: tuple[str, int], card: str = "") -> InRecord:
    lines = tuple(OrderItem(sku=sku, quantity=qty, unit_price=1.0) for sku, qty in items)
    order = OrderPlaced(
        order_id=order_id,
        customer_id="cust-7",
        items=lines,
        currency="EUR",
        total=float(sum(qty for _, qty in items)),
        created_at=500.0,
        card=card,
    )
    return rec(ORDERS, schema.encode(order), order_id.encode())


def event(fact: PaymentAuthorized | PaymentDeclined | ShipmentReady | PaymentCaptured) -> InRecord:
    return rec(EVENTS, schema.encode(fact), fact.order_id.encode())


def authorized(order_id: str, at: float) -> InRecord:
    return event(PaymentAuthorized(order_id, f"auth-{order_id}", 3.0, "EUR", at=at))


def declined(order_id: str, at: float = 1001.0) -> InRecord:
    return event(PaymentDeclined(order_id, "CARD_DECLINED", "test card", at=at))


def ready(order_id: str) -> InRecord:
    return event(ShipmentReady(order_id, f"ship-{order_id}", at=1002.0))


def command(cmd: CancelOrder | ExpireReservation | Restock, key: str) -> InRecord:
    return rec(COMMANDS, schema.encode(cmd), key.encode())


def cancel(order_id: str) -> InRecord:
    return command(
        CancelOrder(order_id=order_id, requested_at=1.0, reason="changed mind"), order_id
    )


def expire(order_id: str) -> InRecord:
    return command(ExpireReservation(order_id=order_id, requested_at=1.0), order_id)


def restock(restock_id: str, sku: str, quantity: int) -> InRecord:
    cmd = Restock(restock_id=restock_id, sku=sku, quantity=quantity, requested_at=1.0)
    return command(cmd, sku)


def kinds(out: list[OutRecord]) -> list[str]:
    assert all(r.topic == EVENTS for r in out), [r.topic for r in out]
    return [type(schema.decode_event(r.value)).__name__ for r in out]


def decoded(out: list[OutRecord]) -> list[Any]:
    return [schema.decode_event(r.value) for r in out]


def places(store: Store, sku: str = "A") -> tuple[int, int, int, int]:
    """(available, reserved, committed, shipped) of a sku."""
    (row,) = store.stock(sku)
    return row.available, row.reserved, row.committed, row.shipped


def status(store: Store, order_id: str) -> str:
    return store.order_outcomes()[order_id].status


def assert_conserved(store: Store) -> None:
    """Stock conservation, and every held unit is held by an order in that status."""
    held: dict[tuple[str, str], int] = {}
    for outcome in store.order_outcomes().values():
        where = lifecycle.HOLDS.get(outcome.status)
        if where is None:
            continue
        for sku, qty in outcome.items:
            held[(sku, where)] = held.get((sku, where), 0) + qty
    for levels in store.stock_levels():
        assert levels.conserved, levels
        assert min(levels[1:]) >= 0, levels
        assert levels.reserved == held.get((levels.sku, "reserved"), 0), levels
        assert levels.committed == held.get((levels.sku, "committed"), 0), levels
    totals = store.stock_totals()
    assert totals.sku == "" and totals.conserved


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Opens one more instance of a store on one database (of each backend)."""
    if request.param == "postgres":
        url = migrated_database(request)
        return lambda: PostgresInventoryStore(url)
    return lambda: SqliteInventoryStore(tmp_path / "shared.db")


@pytest.fixture
def store(opener: Callable[[], Store]) -> Iterator[Store]:
    with opener() as s:
        s.seed({"A": 10, "B": 5})
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def inv(store: Store, clock: Clock) -> InventoryService:
    return core(store, clock)


# --- reservation ----------------------------------------------------------------------


def test_the_reservation_carries_its_deadline_and_what_payments_needs(
    store: Store, inv: InventoryService
) -> None:
    (out,) = inv.handle([placed("o1", ("A", 3), card="4000-0000")])
    reserved = schema.decode_event(out.value)
    assert isinstance(reserved, OrderReserved)
    assert (reserved.at, reserved.expires_at) == (1000.0, 1000.0 + TTL)
    assert (reserved.customer_id, reserved.card) == ("cust-7", "4000-0000")
    assert store.load_orders(["o1"])["o1"].expires_at == 1000.0 + TTL
    assert store.expired_reservations(now=1000.0 + TTL - 0.1, limit=10) == []
    assert store.expired_reservations(now=1000.0 + TTL, limit=10) == [("o1", 1000.0 + TTL)]


# --- payment --------------------------------------------------------------------------


def test_a_payment_in_time_commits_the_stock_once(
    store: Store, inv: InventoryService, clock: Clock
) -> None:
    inv.handle([placed("o1", ("A", 3), ("B", 1))])
    pay = authorized("o1", at=1000.0 + TTL)  # at the deadline still counts

    out = inv.handle([pay])

    assert decoded(out) == [OrderPaid("o1", "auth-o1", 3.0, at=1000.0)]
    assert places(store, "A") == (7, 0, 3, 0) and places(store, "B") == (4, 0, 1, 0)
    assert status(store, "o1") == "PAID"
    assert store.expired_reservations(now=1e12, limit=10) == []  # PAID: no deadline left
    clock.now = 5000.0  # a redelivery, much later: the same bytes, no stock moved
    assert [r.value for r in inv.handle([pay])] == [out[0].value]
    assert places(store, "A") == (7, 0, 3, 0)
    assert inv.stats.paid == 1 and inv.stats.duplicates == 1
    assert_conserved(store)


def test_a_payment_authorized_past_the_deadline_expires_the_order(
    store: Store, inv: InventoryService
) -> None:
    inv.handle([placed("o1", ("A", 3))])
    late = authorized("o1", at=1000.0 + TTL + 0.5)

    out = inv.handle([late])

    assert decoded(out) == [
        StockReleased("o1", (ItemQty("A", 3),), at=1000.0, cause="EXPIRED"),
        ReservationExpired("o1", expires_at=1000.0 + TTL, at=1000.0),
    ]
    assert places(store) == (10, 0, 0, 0) and status(store, "o1") == "EXPIRED"
    assert [r.value for r in inv.handle([late])] == [r.value for r in out]  # redelivered
    assert inv.handle([expire("o1")]) == []  # the sweep's request finds it ended
    assert places(store) == (10, 0, 0, 0)
    assert_conserved(store)


def test_a_payment_after_the_expiry_does_not_revive_the_order(
    store: Store, inv: InventoryService, clock: Clock
) -> None:
    """The late-payment race: the sweep's expiry wins; the authorization, however early
    its ``at``, changes nothing (payments voids it on seeing ReservationExpired)."""
    inv.handle([placed("o1", ("A", 3))])
    clock.now += TTL
    expired = inv.handle([expire("o1")])
    assert kinds(expired) == ["StockReleased", "ReservationExpired"]

    assert inv.handle([authorized("o1", at=1001.0)]) == []
    assert status(store, "o1") == "EXPIRED" and places(store) == (10, 0, 0, 0)
    assert inv.handle([declined("o1")]) == []
    assert inv.handle([ready("o1")]) == []
    assert_conserved(store)


def test_a_declined_payment_fails_the_order_and_releases_once(
    store: Store, inv: InventoryService
) -> None:
    inv.handle([placed("o1", ("B", 5))])
    decline = declined("o1")

    out = inv.handle([decline])

    assert decoded(out) == [
        StockReleased("o1", (ItemQty("B", 5),), at=1000.0, cause="PAYMENT_FAILED"),
        OrderPaymentFailed("o1", "CARD_DECLINED", "test card", at=1000.0),
    ]
    assert places(store, "B") == (5, 0, 0, 0) and status(store, "o1") == "PAYMENT_FAILED"
    assert [r.value for r in inv.handle([decline])] == [r.value for r in out]
    assert places(store, "B") == (5, 0, 0, 0)
    # the released units are on the shelf again
    assert kinds(inv.handle([placed("o2", ("B", 5))])) == ["OrderReserved"]
    assert inv.handle([authorized("o1", at=1000.0)]) == []  # ended: a late success
    assert_conserved(store)


# --- shipment -------------------------------------------------------------------------


def test_a_paid_order_ships_and_its_units_leave(store: Store, inv: InventoryService) -> None:
    inv.handle([placed("o1", ("A", 4))])
    assert inv.handle([ready("o1")]) == []  # not paid yet: nothing ships
    inv.handle([authorized("o1", at=1001.0)])
    shipment = ready("o1")

    out = inv.handle([shipment])

    assert decoded(out) == [OrderShipped("o1", "ship-o1", at=1000.0)]
    assert places(store) == (6, 0, 0, 4) and status(store, "o1") == "SHIPPED"
    assert [r.value for r in inv.handle([shipment])] == [out[0].value]
    assert places(store) == (6, 0, 0, 4)
    assert inv.stats.shipped == 1
    assert_conserved(store)


def test_other_order_events_are_skipped_and_undecodable_ones_counted(
    store: Store, inv: InventoryService
) -> None:
    inv.handle([placed("o1", ("A", 1))])
    batch = [
        event(PaymentCaptured("o1", "auth-o1", 1.0, at=1.0)),
        rec(EVENTS, b'{"type":"PaymentAuthorized","order_id":', b"o1"),  # cut short
        rec(EVENTS, None, b"o1"),
        authorized("ghost", at=1.0),  # an order this inventory never decided
    ]
    assert inv.handle(batch) == []  # nothing dead-lettered: the tracker does that
    assert (inv.stats.skipped, inv.stats.undecodable, inv.stats.unknown) == (2, 1, 1)
    assert places(store) == (9, 1, 0, 0)


# --- cancel at every stage --------------------------------------------------------------


def test_cancel_while_reserved_releases_the_reservation(
    store: Store, inv: InventoryService
) -> None:
    inv.handle([placed("o1", ("A", 3))])
    out = inv.handle([cancel("o1")])
    released, cancelled = decoded(out)
    assert released == StockReleased("o1", (ItemQty("A", 3),), at=1000.0, cause="CANCELLED")
    assert cancelled == OrderCancelled("o1", at=1000.0, detail="changed mind", stage="RESERVED")
    assert places(store) == (10, 0, 0, 0) and status(store, "o1") == "CANCELLED"
    # again: the stored events, nothing moved; a late payment changes nothing either
    assert [r.value for r in inv.handle([cancel("o1")])] == [r.value for r in out]
    assert inv.handle([authorized("o1", at=1000.0)]) == []
    assert places(store) == (10, 0, 0, 0)
    assert_conserved(store)


def test_cancel_while_paid_releases_the_committed_units(
    store: Store, inv: InventoryService
) -> None:
    inv.handle([placed("o1", ("A", 3))])
    inv.handle([authorized("o1", at=1000.0)])
    out = inv.handle([cancel("o1")])
    released, cancelled = decoded(out)
    assert released.cause == "CANCELLED" and released.items == (ItemQty("A", 3),)
    assert isinstance(cancelled, OrderCancelled) and cancelled.stage == "PAID"
    assert places(store) == (10, 0, 0, 0) and status(store, "o1") == "CANCELLED"
    # fulfilment's parcel, packed meanwhile, does not ship
    assert inv.handle([ready("o1")]) == []
    assert [r.value for r in inv.handle([cancel("o1")])] == [r.value for r in out]
    assert_conserved(store)


@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        ("shipped", "ALREADY_SHIPPED"),
        ("rejected", "ORDER_REJECTED"),
        ("expired", "ALREADY_ENDED"),
        ("declined", "ALREADY_ENDED"),
    ],
)
def test_cancel_of_an_order_holding_nothing_is_rejected_with_the_reason(
    store: Store, clock: Clock, steps: str, reason: str
) -> None:
    inv = core(store, clock)
    if steps == "rejected":
        inv.handle([placed("o1", ("A", 11))])
    else:
        inv.handle([placed("o1", ("A", 2))])
    if steps == "shipped":
        inv.handle([authorized("o1", at=1000.0)])
        inv.handle([ready("o1")])
    elif steps == "expired":
        clock.now += TTL + 1
        inv.handle([expire("o1")])
    elif steps == "declined":
        inv.handle([declined("o1")])
    before = (places(store), status(store, "o1"))

    (out,) = inv.handle([cancel("o1")])

    rejected = schema.decode_event(out.value)
    assert isinstance(rejected, CancelRejected) and rejected.reason == reason
    assert (places(store), status(store, "o1")) == before
    assert_conserved(store)


# --- deadlines ------------------------------------------------------------------------


def test_an_expiry_is_decided_on_the_cores_clock_and_answered_once(
    store: Store, inv: InventoryService, clock: Clock
) -> None:
    inv.handle([placed("o1", ("A", 2))])
    early = expire("o1")
    assert inv.handle([early]) == []  # asked before the deadline: nothing
    assert status(store, "o1") == "RESERVED"

    clock.now = 1000.0 + TTL
    asked = expire("o1")
    out = inv.handle([asked])
    assert decoded(out) == [
        StockReleased("o1", (ItemQty("A", 2),), at=clock.now, cause="EXPIRED"),
        ReservationExpired("o1", expires_at=1000.0 + TTL, at=clock.now),
    ]
    assert places(store) == (10, 0, 0, 0)
    # the same record redelivered: the same bytes; another sweep's request: nothing
    clock.now += 100
    assert [r.value for r in inv.handle([asked])] == [r.value for r in out]
    assert inv.handle([expire("o1")]) == []
    assert inv.handle([authorized("o1", at=1001.0)]) == []  # paid too late: stays EXPIRED
    assert places(store) == (10, 0, 0, 0) and status(store, "o1") == "EXPIRED"
    assert inv.stats.expired == 1
    assert_conserved(store)


def test_orders_without_a_deadline_never_expire(store: Store, clock: Clock) -> None:
    forever = InventoryService(
        store, orders_topic=ORDERS, commands_topic=COMMANDS, events_topic=EVENTS, dlq_topic=DLQ
    )
    (out,) = forever.handle([placed("o1", ("A", 1))])
    reserved = schema.decode_event(out.value)
    assert isinstance(reserved, OrderReserved) and reserved.expires_at == 0.0
    assert forever.handle([expire("o1")]) == []
    assert kinds(forever.handle([authorized("o1", at=1e12)])) == ["OrderPaid"]


# --- a whole life in one batch ------------------------------------------------------------


def test_steps_of_one_order_in_one_batch_apply_in_order(
    store: Store, inv: InventoryService
) -> None:
    out = inv.handle(
        [placed("o1", ("A", 2)), authorized("o1", at=1000.0), ready("o1"), cancel("o1")]
    )
    assert kinds(out) == ["OrderReserved", "OrderPaid", "OrderShipped", "CancelRejected"]
    assert places(store) == (8, 0, 0, 2) and status(store, "o1") == "SHIPPED"
    inv.handle([placed("k", ("B", 1))])
    out = inv.handle([authorized("k", at=1000.0), cancel("k"), cancel("k")])
    assert kinds(out) == [
        "OrderPaid",
        "StockReleased",
        "OrderCancelled",
        "StockReleased",
        "OrderCancelled",
    ]
    # the same bytes again, each copy from the cancel that asked
    assert [r.value for r in out[1:3]] == [r.value for r in out[3:5]]
    assert [r.source for r in out[1:5]] == [out[1].source] * 2 + [out[3].source] * 2
    assert places(store, "B") == (5, 0, 0, 0) and status(store, "k") == "CANCELLED"
    assert_conserved(store)


# --- supply ---------------------------------------------------------------------------


def test_a_restock_adds_its_units_exactly_once(store: Store, inv: InventoryService) -> None:
    first = restock("r-1", "A", 7)
    assert inv.handle([first, restock("r-1", "A", 7)]) == []
    assert places(store) == (17, 0, 0, 0)
    assert inv.handle([first]) == []  # redelivered
    assert places(store) == (17, 0, 0, 0)
    assert store.stock_levels("A") == [StockLevels("A", 10, 7, 17, 0, 0, 0)]
    assert inv.stats.restocked == 1 and inv.stats.duplicates == 2

    unknown = restock("r-2", "NOPE", 1)
    (dlq,) = inv.handle([unknown])
    assert dlq.topic == DLQ and dlq.value == unknown.value
    assert header(dlq.headers, ERROR_HEADER_PREFIX + "class") == RESTOCK_REFUSED.encode()
    assert store.stock("NOPE") == []
    assert_conserved(store)


def test_a_sku_falling_below_its_reorder_point_is_reordered_once(
    store: Store, clock: Clock
) -> None:
    inv = core(store, clock, reorder_point=6, reorder_quantity=40, supplier_delay_s=30.0)
    inv.handle([placed("o1", ("A", 3))])  # 7 left: above the point
    assert store.due_reorders(now=1e12, limit=10) == []

    inv.handle([placed("o2", ("A", 2))])  # 5 left
    inv.handle([placed("o3", ("A", 1))])  # 4 left: a reorder is open already
    (reorder,) = store.due_reorders(now=1e12, limit=10)
    assert (reorder.sku, reorder.quantity, reorder.due_at) == ("A", 40, 1030.0)
    assert store.due_reorders(now=1029.0, limit=10) == []
    assert inv.stats.reorders == 1

    # its restock arrives: the reorder closes, and stays closed when redelivered
    arrival = restock(reorder.restock_id, "A", reorder.quantity)
    inv.handle([arrival])
    inv.handle([arrival])
    assert places(store) == (44, 6, 0, 0)
    assert store.due_reorders(now=1e12, limit=10) == []
    # below the point again later: a new reorder
    inv.handle([placed("o4", ("A", 40))])
    (again,) = store.due_reorders(now=1e12, limit=10)
    assert again.restock_id != reorder.restock_id
    assert_conserved(store)


def test_reorder_point_zero_never_reorders(store: Store, clock: Clock) -> None:
    inv = core(store, clock, reorder_point=0, reorder_quantity=40)
    inv.handle([placed("o1", ("A", 10))])
    assert store.due_reorders(now=1e12, limit=10) == []


# --- N instances ---------------------------------------------------------------------


def test_a_payment_and_a_cancel_racing_on_two_instances_take_one_path(
    opener: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read the order RESERVED; the cancel commits between the payment's read and
    its transaction: the payment's compare-and-set fails, and run again it finds the
    order cancelled."""
    clock = Clock()
    with opener() as mine, opener() as theirs:
        mine.seed({"A": 10})
        core(mine, clock).handle([placed("o1", ("A", 3))])
        read = mine.load_stock
        calls = itertools.count()

        def load_stock(skus: Any) -> Any:
            rows = read(skus)
            if next(calls) == 0:
                assert kinds(core(theirs, clock).handle([cancel("o1")]))[1] == "OrderCancelled"
            return rows

        monkeypatch.setattr(mine, "load_stock", load_stock)
        inv = core(mine, clock)
        assert inv.handle([authorized("o1", at=1000.0)]) == []
        assert inv.stats.conflicts == 1 and inv.stats.paid == 0
        assert places(mine) == (10, 0, 0, 0) and status(mine, "o1") == "CANCELLED"
        assert_conserved(mine)


# --- the sweep's pass -------------------------------------------------------------------


class _Client:
    """A stand-in for confluent-kafka's producer: records what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes, **_: Any) -> None:
        self.sent.append((topic, key, value))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0

    def __len__(self) -> int:
        return 0


def test_the_sweep_asks_for_due_expiries_and_restocks_and_not_twice_soon(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    inv = core(store, clock, reorder_point=8, reorder_quantity=5, supplier_delay_s=10.0)
    inv.handle([placed(f"o{n}", ("A", 1)) for n in range(3)])  # 7 left: reordered
    clock.now += 1
    inv.handle([placed("late", ("A", 1))])
    client = _Client()
    tick = Clock(0.0)
    sweep = DeadlineSweep(
        Settings(data_dir=tmp_path, topic_prefix="t-"),
        store,
        Producer(client),
        clock=clock,
        monotonic=tick,
    )
    assert (sweep.sweep_once().expiries, client.sent) == (0, [])  # nothing due yet

    clock.now = 1000.0 + TTL + 0.5  # o0..o2 past the deadline, "late" not yet; reorder due
    done = sweep.sweep_once()
    assert (done.expiries, done.restocks) == (3, 1)
    topics = {topic for topic, _, _ in client.sent}
    assert topics == {"t-order-commands"}
    commands = [schema.decode_command(value) for _, _, value in client.sent]
    expiries = [(c, key) for (_, key, _), c in zip(client.sent[:3], commands, strict=False)]
    assert [(c.order_id, key) for c, key in expiries if isinstance(c, ExpireReservation)] == [
        (f"o{n}", f"o{n}".encode()) for n in range(3)
    ]
    assert isinstance(commands[3], Restock) and client.sent[3][1] == b"A"
    assert (commands[3].sku, commands[3].quantity) == ("A", 5)

    client.sent.clear()
    tick.now += ASK_AGAIN_AFTER_S / 2
    assert sweep.sweep_once() == type(done)()  # asked lately: not again yet
    tick.now += ASK_AGAIN_AFTER_S
    assert sweep.sweep_once().expiries == 3  # still there after a while: asked again

    # the commands, handled (each twice, as N sweeps send them): one expiry, one restock
    out = inv.handle([rec(COMMANDS, v, k) for _ in range(2) for _, k, v in client.sent])
    assert kinds(out).count("ReservationExpired") == 3
    assert places(store) == (14, 1, 0, 0)
    client.sent.clear()
    assert sweep.sweep_once() == type(done)()
    assert_conserved(store)


# --- conservation over random lives -------------------------------------------------------


# every input kind, the happy path's more often, so that lives get far
KINDS = ("place", "pay", "late", "decline", "ship", "cancel", "expire")
WEIGHTS = (4, 4, 1, 1, 4, 1, 1)


def random_life(
    store: Store, rng: random.Random, steps: int, redeliver: bool
) -> dict[tuple[bytes | None, str], set[bytes | None]]:
    """Random batches of every input kind (some redelivered) on a moving fake clock;
    the invariants checked after each. The events emitted per (order, type)."""
    clock = Clock()
    inv = core(store, clock, reorder_point=4, reorder_quantity=6, supplier_delay_s=5.0)
    emitted: dict[tuple[bytes | None, str], set[bytes | None]] = {}
    for _ in range(steps):
        batch: list[InRecord] = []
        for _ in range(rng.randint(1, 5)):
            oid = f"o{rng.randint(0, 19)}"
            kind = rng.choices(KINDS, weights=WEIGHTS)[0]
            if kind == "place":
                items = [(rng.choice("AB"), rng.randint(1, 4)) for _ in range(rng.randint(1, 2))]
                batch.append(placed(oid, *items))
            elif kind == "pay":
                batch.append(authorized(oid, at=clock.now))
            elif kind == "late":
                batch.append(authorized(oid, at=clock.now + 2 * TTL))
            elif kind == "decline":
                batch.append(declined(oid))
            elif kind == "ship":
                batch.append(ready(oid))
            elif kind == "cancel":
                batch.append(cancel(oid))
            else:
                batch.append(expire(oid))
        for reorder in store.due_reorders(clock.now, 10):
            batch.append(restock(reorder.restock_id, reorder.sku, reorder.quantity))
        for _ in range(2 if redeliver else 1):
            for r in inv.handle(batch):
                if r.topic == EVENTS:
                    name = type(schema.decode_event(r.value)).__name__
                    emitted.setdefault((r.key, name), set()).add(r.value)
            assert_conserved(store)
        clock.now += rng.choices([0.0, 1.0, TTL / 2, TTL], weights=[4, 4, 1, 1])[0]
    return emitted


def test_stock_is_conserved_over_random_lives_on_each_backend(store: Store) -> None:
    emitted = random_life(store, random.Random(20240611), steps=60, redeliver=True)
    # one decision per order and step, whatever was redelivered
    assert all(
        len(values) == 1 for (_, name), values in emitted.items() if name != "CancelRejected"
    )
    names = {name for _, name in emitted}
    assert {"OrderPaid", "OrderShipped", "ReservationExpired", "OrderCancelled"} <= names


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 12), redeliver=st.booleans())
def test_stock_is_conserved_over_random_lives(seed: int, steps: int, redeliver: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp, SqliteInventoryStore(Path(tmp) / "inv.db") as s:
        s.seed({"A": 8, "B": 3})
        emitted = random_life(s, random.Random(seed), steps, redeliver)
        for (_, name), values in emitted.items():
            if name not in ("CancelRejected",):
                assert len(values) == 1, name
