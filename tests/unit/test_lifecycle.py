"""The lifecycle declaration and the audit of orders' lives derived from it."""

from __future__ import annotations

from collections import Counter

from hypothesis import assume, given
from hypothesis import strategies as st

from ordermesh import lifecycle, schema
from ordermesh.audit import Life, Lives, audit, held_cents
from ordermesh.gateway.wire import OrderSummary
from ordermesh.lifecycle import RANK, STATUSES, TERMINAL, TRANSITIONS, applies, timeline

# --- the declaration ----------------------------------------------------------------------


def test_every_declared_event_is_a_wire_type() -> None:
    wire = {t.__name__ for t in schema.OrderEvent.__args__}  # type: ignore[attr-defined]
    # every wire event is either a transition or a fact: nothing undeclared
    assert wire == lifecycle.EVENTS


def test_transitions_only_move_forward_and_never_leave_a_terminal_status() -> None:
    for t in TRANSITIONS:
        assert RANK[t.target] > RANK[t.source], t
        assert t.source not in TERMINAL, t
    assert set(RANK) == set(STATUSES)


def test_every_status_is_reachable_from_placed_and_every_path_ends() -> None:
    reachable = {"PLACED"}
    frontier = ["PLACED"]
    while frontier:
        status = frontier.pop()
        for t in TRANSITIONS:
            if t.source == status and t.target not in reachable:
                reachable.add(t.target)
                frontier.append(t.target)
    assert reachable == set(STATUSES)
    # a non-terminal status always has a way out
    for status in set(STATUSES) - TERMINAL:
        assert any(t.source == status for t in TRANSITIONS), status


def test_every_non_terminal_status_after_placed_has_a_deadline() -> None:
    deadlines = {d.status for d in lifecycle.DEADLINES}
    assert deadlines == set(STATUSES) - TERMINAL - {"PLACED"}


def test_the_inventory_owns_every_status_move() -> None:
    assert {t.owner for t in TRANSITIONS} == {"inventory"}


def test_cancel_is_allowed_before_shipment_and_nowhere_else() -> None:
    sources = {t.source for t in TRANSITIONS if t.event == "OrderCancelled"}
    assert sources == {"RESERVED", "PAID"}


def test_applies_moves_forward_only() -> None:
    assert applies("PLACED", "OrderReserved")
    assert applies("RESERVED", "OrderPaid")
    assert not applies("PAID", "OrderReserved")  # stale
    assert not applies("EXPIRED", "OrderPaid")  # late success does not revive it
    assert not applies("SHIPPED", "OrderCancelled")  # terminal
    assert not applies("RESERVED", "PaymentAuthorized")  # a fact


def test_timeline_of_the_happy_path_and_of_each_failure() -> None:
    happy = ["OrderReserved", "PaymentAuthorized", "OrderPaid", "ShipmentReady"]
    assert timeline([*happy, "OrderShipped", "PaymentCaptured"]) == ("SHIPPED", [])
    assert timeline(["OrderRejected"]) == ("REJECTED", [])
    assert timeline(["OrderReserved", "PaymentDeclined", "OrderPaymentFailed"])[0] == (
        "PAYMENT_FAILED"
    )
    late = ["OrderReserved", "ReservationExpired", "StockReleased", "PaymentAuthorized"]
    assert timeline([*late, "PaymentVoided"]) == ("EXPIRED", [])
    cancelled = ["OrderReserved", "OrderPaid", "StockReleased", "OrderCancelled"]
    assert timeline(cancelled) == ("CANCELLED", [])


def test_timeline_reports_undeclared_steps() -> None:
    status, undeclared = timeline(["OrderReserved", "OrderShipped"])
    assert status == "SHIPPED"
    assert undeclared == ["RESERVED --OrderShipped-->"]
    status, undeclared = timeline(["OrderReserved", "OrderCancelled", "OrderPaid"])
    assert status == "CANCELLED"
    assert undeclared == ["CANCELLED --OrderPaid-->"]


def test_redelivered_copies_are_not_moves() -> None:
    assert timeline(["OrderReserved", "OrderReserved", "OrderPaid", "OrderPaid"]) == (
        "PAID",
        [],
    )


# the valid lives, as the inventory decides them
LIVES = [
    ["OrderReserved", "OrderPaid", "OrderShipped"],
    ["OrderRejected"],
    ["OrderReserved", "OrderPaymentFailed"],
    ["OrderReserved", "ReservationExpired"],
    ["OrderReserved", "OrderCancelled"],
    ["OrderReserved", "OrderPaid", "OrderCancelled"],
]


@given(
    life=st.sampled_from(LIVES),
    copies=st.lists(st.integers(min_value=0, max_value=2), min_size=3, max_size=3),
)
def test_redelivery_of_any_event_of_a_valid_life_keeps_its_end(
    life: list[str], copies: list[int]
) -> None:
    # at-least-once: each event may come again right after itself (a crash between
    # produce and commit re-emits a batch's events in order)
    events = []
    for index, event in enumerate(life):
        events += [event] * (1 + copies[index % len(copies)])
    assert timeline(events) == timeline(life)
    assert timeline(life)[1] == []


@given(life=st.sampled_from(LIVES), data=st.data())
def test_a_reordered_life_never_ends_behind_where_it_got(
    life: list[str], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(life))
    assume(list(order) != life)
    status, undeclared = timeline(list(order))
    # a reordered sequence is reported, and since nothing moves an order backwards or out
    # of a terminal status, it still ends where the life in order ends
    assert undeclared
    assert status == timeline(life)[0]


# --- the audit ----------------------------------------------------------------------------


def _event(kind: str, order_id: str, at: float) -> schema.OrderEvent:
    items = (schema.ItemQty("SKU-1", 2),)
    match kind:
        case "OrderReserved":
            return schema.OrderReserved(order_id, items, 12.5, "USD", at, at, expires_at=at + 60)
        case "OrderRejected":
            return schema.OrderRejected(order_id, "OUT_OF_STOCK", "short", at, at)
        case "OrderPaid":
            return schema.OrderPaid(order_id, "auth-1", 12.5, at)
        case "OrderShipped":
            return schema.OrderShipped(order_id, "shp-1", at)
        case "OrderPaymentFailed":
            return schema.OrderPaymentFailed(order_id, "card_declined", "", at)
        case "ReservationExpired":
            return schema.ReservationExpired(order_id, at, at)
        case "OrderCancelled":
            return schema.OrderCancelled(order_id, at)
        case "StockReleased":
            return schema.StockReleased(order_id, items, at, cause="CANCELLED")
        case "PaymentAuthorized":
            return schema.PaymentAuthorized(order_id, "auth-1", 12.5, "USD", at)
        case "PaymentCaptured":
            return schema.PaymentCaptured(order_id, "auth-1", 12.5, at)
        case "PaymentVoided":
            return schema.PaymentVoided(order_id, "auth-1", 12.5, "CANCELLED", at)
    raise AssertionError(kind)


def lives_of(orders: dict[str, list[str]], at: float = 1000.0) -> Lives:
    lives = Lives()
    offset = 0
    for order_id, kinds in orders.items():
        for kind in kinds:
            event = _event(kind, order_id, at)
            lives.add(0, offset, schema.encode(event), event)
            offset += 1
    return lives


def run_audit(
    orders: dict[str, list[str]],
    money: dict[str, OrderSummary] | None = None,
    *,
    now: float = 2000.0,
    settled: bool = True,
) -> list[str]:
    report = audit(
        lives_of(orders),
        money,
        now=now,
        settled=lambda _order, _life: settled,
        fulfilment_delay_s=1.0,
    )
    return sorted(kind for kind, _ in report.violations)


SHIPPED = ["OrderReserved", "PaymentAuthorized", "OrderPaid", "OrderShipped", "PaymentCaptured"]


def money(order_id: str, **cents: int) -> OrderSummary:
    return OrderSummary(order_id, **cents)


PAID = {"authorizations": 1, "captures": 1, "authorized_cents": 1250, "captured_cents": 1250}


def test_a_whole_good_life_passes_with_its_money() -> None:
    orders = {
        "shipped": SHIPPED,
        "rejected": ["OrderRejected"],
        "cancelled": ["OrderReserved", "PaymentAuthorized", "OrderCancelled", "StockReleased"],
    }
    ledger = {
        "shipped": money("shipped", **PAID),
        "cancelled": money(
            "cancelled", authorizations=1, authorized_cents=1250, voids=1, voided_cents=1250
        ),
    }
    assert run_audit(orders, ledger) == []


def test_each_broken_invariant_is_named() -> None:
    orders = {
        "unreleased": ["OrderReserved", "ReservationExpired"],
        "twice": ["OrderReserved", "OrderCancelled", "StockReleased"],
        "uncaptured": ["OrderReserved", "OrderPaid", "OrderShipped"],
        "stuck": ["OrderReserved"],
        "jumped": ["OrderReserved", "OrderShipped", "PaymentCaptured"],
    }
    lives = lives_of(orders)
    # a second, different release of the same order
    again = schema.StockReleased("twice", (schema.ItemQty("SKU-2", 1),), 1000.0)
    lives.add(0, 99, schema.encode(again), again)
    report = audit(lives, None, now=2000.0, settled=lambda *_: True, fulfilment_delay_s=1.0)
    kinds = Counter(kind for kind, _ in report.violations)
    assert kinds == {
        "release-missing": 1,
        "release-repeated": 1,
        "shipped-uncaptured": 1,
        "past-deadline": 1,
        "undeclared-transition": 1,
    }


def test_money_violations_from_the_ledger() -> None:
    orders = {"a": SHIPPED, "b": ["OrderReserved", "ReservationExpired", "StockReleased"]}
    double = money("a", **{**PAID, "authorizations": 2, "authorized_cents": 2500})
    held = money("b", authorizations=1, authorized_cents=1250)
    assert run_audit(orders, {"a": double, "b": held}) == ["double-charge", "money-kept"]
    short = money("a", **{**PAID, "captured_cents": 1000})
    assert run_audit(orders, {"a": short}) == ["money-shipped"]
    assert run_audit({}, {"ghost": held}) == ["ledger-without-order"]


def test_unsettled_or_recent_orders_are_pending_not_broken() -> None:
    orders = {"a": ["OrderReserved", "ReservationExpired"]}
    assert run_audit(orders, settled=False) == []
    assert run_audit(orders, now=1001.0) == []
    report = audit(
        lives_of(orders), None, now=1001.0, settled=lambda *_: True, fulfilment_delay_s=1.0
    )
    assert report.pending == {"release-missing": 1}


def test_held_money_is_authorized_neither_captured_nor_voided() -> None:
    assert held_cents(money("a", authorized_cents=500, captured_cents=500)) == 0
    assert held_cents(money("a", authorized_cents=500, voided_cents=500)) == 0
    assert held_cents(money("a", authorized_cents=500)) == 500


def test_life_status_matches_timeline() -> None:
    life = Life(events=["OrderReserved", "OrderPaid"])
    assert life.status() == ("PAID", [])


def test_architecture_shows_the_declared_table() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "ARCHITECTURE.md").read_text()
    assert lifecycle.markdown_table() in text, (
        "ARCHITECTURE.md's lifecycle table differs from lifecycle.py; it should read:\n"
        + lifecycle.markdown_table()
    )


def test_a_late_copy_of_an_earlier_step_is_not_a_move() -> None:
    # a crash between produce and commit re-emits OrderPaid after the order shipped
    events = ["OrderReserved", "OrderPaid", "OrderShipped", "OrderPaid", "OrderReserved"]
    assert timeline(events) == ("SHIPPED", [])
