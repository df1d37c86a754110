"""Payments: the intents core, the worker's steps against an in-memory gateway, the rules."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ordermesh import schema
from ordermesh.apps.payments import PaymentsCollector, PaymentSteps
from ordermesh.errors import GatewayUnavailableError, GatewayUnknownOutcomeError
from ordermesh.gateway.protocol import Operation, Outcome, operation_key
from ordermesh.records import ERROR_HEADER_PREFIX, InRecord, header
from ordermesh.schema import (
    ItemQty,
    OrderCancelled,
    OrderPaid,
    OrderReserved,
    OrderShipped,
    ReservationExpired,
)
from ordermesh.services.payments import (
    BACKOFF_S,
    PaymentsService,
    after_failure,
    backoff_s,
    next_operation,
)
from ordermesh.stores.sqlite_payments import SqlitePaymentsStore

EVENTS = "t-order-events"
DLQ = "t-orders-dlq"
_offsets = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeGateway:
    """An in-memory PaymentGateway: applies each key at most once, like the real one.

    ``unavailable``: that many next calls fail before applying; ``lose_reply``: keys whose
    next call is applied but answered with an unknown outcome; ``lose_request``: keys
    whose next call is lost before applying (unknown outcome too); ``gate``: when set,
    calls wait for it (a slow gateway).
    """

    def __init__(self) -> None:
        self.ledger: dict[str, Outcome] = {}
        self.applied: Counter[tuple[str, Operation]] = Counter()
        self.calls: list[str] = []
        self.lookups: list[str] = []
        self.unavailable = 0
        self.lose_reply: set[str] = set()
        self.lose_request: set[str] = set()
        self.decline_cards = {"4000000000000002"}
        self.gate: asyncio.Event | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self._auth = itertools.count(1)

    async def _apply(
        self, key: str, op: Operation, order_id: str, make: Callable[[], Outcome]
    ) -> Outcome:
        self.calls.append(key)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            if self.unavailable > 0:
                self.unavailable -= 1
                raise GatewayUnavailableError("503 from the fake")
            if key in self.lose_request:
                self.lose_request.discard(key)
                raise GatewayUnknownOutcomeError("request lost")
            if key not in self.ledger:
                self.ledger[key] = make()
                self.applied[(order_id, op)] += 1
            if key in self.lose_reply:
                self.lose_reply.discard(key)
                raise GatewayUnknownOutcomeError("reply lost")
            return self.ledger[key]
        finally:
            self.in_flight -= 1

    def _order_of(self, authorization_id: str) -> str:
        for outcome in self.ledger.values():
            if outcome.operation == "authorize" and outcome.authorization_id == authorization_id:
                return outcome.key.split(":")[0]
        raise AssertionError(f"unknown authorization {authorization_id}")

    async def authorize(
        self,
        key: str,
        *,
        order_id: str,
        amount_cents: int,
        currency: str,
        customer_id: str,
        card: str,
    ) -> Outcome:
        def make() -> Outcome:
            if card in self.decline_cards:
                return Outcome(key, "authorize", False, "", amount_cents, currency, "card_declined")
            return Outcome(
                key, "authorize", True, f"auth-{next(self._auth)}", amount_cents, currency
            )

        return await self._apply(key, "authorize", order_id, make)

    async def capture(self, key: str, *, authorization_id: str, amount_cents: int) -> Outcome:
        order = self._order_of(authorization_id)
        return await self._apply(
            key,
            "capture",
            order,
            lambda: Outcome(key, "capture", True, authorization_id, amount_cents, "EUR"),
        )

    async def void(self, key: str, *, authorization_id: str) -> Outcome:
        order = self._order_of(authorization_id)
        return await self._apply(
            key, "void", order, lambda: Outcome(key, "void", True, authorization_id, 0, "EUR")
        )

    async def refund(self, key: str, *, authorization_id: str, amount_cents: int) -> Outcome:
        order = self._order_of(authorization_id)
        return await self._apply(
            key,
            "refund",
            order,
            lambda: Outcome(key, "refund", True, authorization_id, amount_cents, "EUR"),
        )

    async def lookup(self, key: str) -> Outcome | None:
        self.lookups.append(key)
        return self.ledger.get(key)

    async def close(self) -> None:
        return None


def rec(event: msgspec.Struct | bytes, key: str = "o1") -> InRecord:
    value = event if isinstance(event, bytes) else schema.encode(event)
    return InRecord(EVENTS, 0, next(_offsets), key.encode(), value, [], 0)


def reserved(order_id: str = "o1", total: float = 12.34, card: str = "4242") -> OrderReserved:
    return OrderReserved(
        order_id,
        (ItemQty("SKU-1", 1),),
        total,
        "EUR",
        1.0,
        2.0,
        expires_at=900.0,
        customer_id="c1",
        card=card,
    )


class Harness:
    """The intents core and the worker's steps over one SQLite file, on a fake clock."""

    def __init__(self, tmp_path: Path, gateway: FakeGateway, concurrency: int = 16) -> None:
        self.clock = Clock()
        self.gateway = gateway
        self.store = SqlitePaymentsStore(tmp_path / "payments.db")
        self.work_store = SqlitePaymentsStore(tmp_path / "payments.db")
        self.core = PaymentsService(
            self.store, events_topic=EVENTS, dlq_topic=DLQ, clock=self.clock
        )
        self.steps = PaymentSteps(
            self.work_store,
            lambda: gateway,
            events_topic=EVENTS,
            concurrency=concurrency,
            timeout_s=1.0,
            clock=self.clock,
        )
        self.published: list[Any] = []

    def handle(self, *events: msgspec.Struct | bytes) -> list[Any]:
        return self.core.handle([rec(e, getattr(e, "order_id", "o1")) for e in events])

    async def rounds(self, n: int = 5, advance_s: float = 0.0) -> None:
        for _ in range(n):
            await self.steps.step(self.clock())
            for _ in range(5):
                await asyncio.sleep(0)
            self.clock.now += advance_s

    async def until(self, condition: Callable[[], bool], advance_s: float = 1.0) -> None:
        for _ in range(300):
            await self.rounds(1, advance_s)
            if condition():
                return
        raise AssertionError("condition not reached")

    def events(self) -> list[Any]:
        """Every event the worker recorded so far (the outbox, in order)."""
        rows = self.work_store.claim_outbox(self.clock() + 1e6, 1.0, 10_000)
        self.published += [schema.decode_event(r.value) for r in rows]
        return self.published

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events()]

    def row(self, order_id: str = "o1") -> Any:
        return self.store.load([order_id])[order_id]

    def close(self) -> None:
        self.store.close()
        self.work_store.close()


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def harness(tmp_path: Path, gateway: FakeGateway) -> Any:
    h = Harness(tmp_path, gateway)
    asyncio.run(h.steps.start())
    yield h
    h.close()


def run(coro: Any) -> None:
    asyncio.run(coro)


# --- the rules --------------------------------------------------------------------------


def test_next_operation_per_state_and_goal() -> None:
    assert next_operation("pending", "authorized", False) == "authorize"
    assert next_operation("pending", "closed", False) is None  # never started: never start
    assert next_operation("pending", "closed", True) == "authorize"  # runs to its end
    assert next_operation("authorized", "authorized", True) is None
    assert next_operation("authorized", "captured", True) == "capture"
    assert next_operation("authorized", "closed", True) == "void"
    assert next_operation("captured", "closed", True) == "refund"
    assert next_operation("captured", "captured", True) is None
    for done in ("declined", "voided", "refunded", "abandoned", "failed"):
        assert next_operation(done, "closed", True) is None


def test_backoff_grows_is_capped_and_jittered() -> None:
    low, high = BACKOFF_S
    assert backoff_s(1, lambda: 1.0) == pytest.approx(low)
    assert backoff_s(4, lambda: 1.0) == pytest.approx(low * 8)
    assert backoff_s(50, lambda: 1.0) == pytest.approx(high)
    assert backoff_s(50, lambda: 0.0) == pytest.approx(high / 2)


# --- the intents core -------------------------------------------------------------------


def test_reserved_records_an_authorize_due_in_cents(harness: Harness) -> None:
    assert harness.handle(reserved(total=12.34)) == []
    row = harness.row()
    assert (row.amount_cents, row.currency, row.card, row.customer_id) == (
        1234,
        "EUR",
        "4242",
        "c1",
    )
    assert (row.state, row.goal, row.op, row.started) == (
        "pending",
        "authorized",
        "authorize",
        False,
    )
    assert harness.gateway.calls == []  # the handler never calls the gateway


def test_redelivered_batch_changes_nothing(harness: Harness) -> None:
    batch = [rec(reserved()), rec(OrderShipped("o1", "shp-o1", 5.0))]
    harness.core.handle(batch)
    first = harness.row()
    harness.clock.now += 100
    harness.core.handle(batch)
    assert harness.row() == first


def test_irrelevant_events_are_skipped_and_bad_bytes_dead_lettered(harness: Harness) -> None:
    paid = OrderPaid("o2", "auth-1", 1.0, 3.0)
    out = harness.core.handle(
        [
            rec(paid, "o2"),
            rec(b"{not json", "o3"),
            rec(reserved("o4", total=1.001), "o4"),
        ]
    )
    assert harness.core.stats.skipped == 1
    classes = sorted(header(o.headers, ERROR_HEADER_PREFIX + "class") or b"" for o in out)
    assert classes == [b"DecodeError.json", b"ValueError"]
    assert all(o.topic == DLQ for o in out)
    assert harness.store.load(["o2", "o3", "o4"]) == {}


def test_close_before_any_try_never_starts(harness: Harness) -> None:
    harness.handle(reserved(), OrderCancelled("o1", 3.0, stage="RESERVED"))
    run(harness.rounds(5))
    assert harness.row().state == "abandoned"
    assert harness.gateway.calls == []
    assert harness.events() == []


# --- the worker's steps -------------------------------------------------------------------


def test_authorize_approved_emits_authorized_once(harness: Harness) -> None:
    harness.handle(reserved())
    run(harness.until(lambda: harness.row().state == "authorized"))
    [event] = harness.events()
    assert isinstance(event, schema.PaymentAuthorized)
    assert (event.order_id, event.amount, event.currency) == ("o1", 12.34, "EUR")
    assert event.authorization_id == harness.row().authorization_id
    assert harness.gateway.applied[("o1", "authorize")] == 1
    assert harness.steps.stats.authorized == 1
    run(harness.rounds(5))
    assert harness.gateway.calls == [operation_key("o1", "authorize")]


def test_decline_emits_declined_and_nothing_more(harness: Harness) -> None:
    harness.handle(reserved(card="4000000000000002"))
    run(harness.until(lambda: harness.row().state == "declined"))
    [event] = harness.events()
    assert isinstance(event, schema.PaymentDeclined)
    assert event.reason == "card_declined"
    assert harness.row().op is None
    assert harness.steps.stats.declined == 1


def test_unavailable_retries_with_backoff_then_recovers(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.gateway.unavailable = 4
    harness.handle(reserved())
    caplog.set_level(logging.INFO, logger="ordermesh.apps.payments")
    run(harness.rounds(2))  # one claims and calls, the next records the answer
    row = harness.row()
    assert (row.state, row.attempts, row.op) == ("pending", 1, "authorize")
    assert row.due_at > harness.clock()  # backed off, not retried at once
    run(harness.until(lambda: harness.row().state == "authorized", advance_s=60.0))
    assert harness.steps.stats.retries == 4
    assert harness.gateway.applied[("o1", "authorize")] == 1
    assert set(harness.gateway.calls) == {operation_key("o1", "authorize")}
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    back = [r for r in caplog.records if "back after" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert len(back) == 1 and "4 retries" in back[0].getMessage()


def test_unknown_outcome_applied_is_resolved_by_lookup(harness: Harness) -> None:
    key = operation_key("o1", "authorize")
    harness.gateway.lose_reply.add(key)
    harness.handle(reserved())
    run(harness.until(lambda: harness.row().state == "authorized"))
    assert harness.gateway.lookups == [key]
    assert harness.gateway.calls == [key]  # resolved without calling again
    assert harness.gateway.applied[("o1", "authorize")] == 1
    assert harness.kinds() == ["PaymentAuthorized"]
    assert harness.steps.stats.unknown_outcomes == 1


def test_unknown_outcome_not_applied_retries_with_the_same_key(harness: Harness) -> None:
    key = operation_key("o1", "authorize")
    harness.gateway.lose_request.add(key)
    harness.handle(reserved())
    run(harness.until(lambda: harness.row().state == "authorized"))
    assert harness.gateway.lookups == [key]
    assert harness.gateway.calls == [key, key]
    assert harness.gateway.applied[("o1", "authorize")] == 1


def test_capture_after_ship_then_refund_after_cancel(harness: Harness) -> None:
    harness.handle(reserved())
    run(harness.until(lambda: harness.row().state == "authorized"))
    harness.handle(OrderShipped("o1", "shp-o1", 5.0))
    run(harness.until(lambda: harness.row().state == "captured"))
    harness.handle(OrderCancelled("o1", 6.0, stage="PAID"))
    run(harness.until(lambda: harness.row().state == "refunded"))
    events = harness.events()
    assert harness.kinds() == ["PaymentAuthorized", "PaymentCaptured", "PaymentRefunded"]
    assert events[1].amount == 12.34 and events[2].amount == 12.34
    assert events[2].cause == "CANCELLED"
    applied = harness.gateway.applied
    assert [applied[("o1", op)] for op in ("authorize", "capture", "refund", "void")] == [
        1,
        1,
        1,
        0,
    ]


def test_expiry_of_an_authorized_order_voids_it(harness: Harness) -> None:
    harness.handle(reserved())
    run(harness.until(lambda: harness.row().state == "authorized"))
    harness.handle(ReservationExpired("o1", 900.0, 901.0))
    run(harness.until(lambda: harness.row().state == "voided"))
    assert harness.kinds() == ["PaymentAuthorized", "PaymentVoided"]
    assert harness.events()[1].cause == "EXPIRED"


def test_late_success_is_voided(harness: Harness) -> None:
    async def scenario() -> None:
        harness.gateway.gate = asyncio.Event()  # bound to this loop
        harness.handle(reserved())
        await harness.rounds(2)
        assert harness.steps.stats.in_flight == 1  # the authorize is out
        harness.handle(OrderCancelled("o1", 3.0, stage="RESERVED"))
        assert harness.row().state == "pending"  # in flight: not abandoned
        harness.gateway.gate.set()
        await harness.until(lambda: harness.row().state == "voided")

    run(scenario())
    assert harness.kinds() == ["PaymentAuthorized", "PaymentVoided"]
    assert harness.gateway.applied[("o1", "authorize")] == 1
    assert harness.gateway.applied[("o1", "void")] == 1


def test_redelivered_events_after_the_work_change_nothing(harness: Harness) -> None:
    batch = [rec(reserved()), rec(OrderShipped("o1", "shp-o1", 5.0))]
    harness.core.handle(batch[:1])
    run(harness.until(lambda: harness.row().state == "authorized"))
    harness.core.handle(batch[1:])
    run(harness.until(lambda: harness.row().state == "captured"))
    done = harness.row()
    harness.core.handle(batch)
    run(harness.rounds(5, advance_s=60.0))
    assert harness.row() == done
    assert sum(harness.gateway.applied.values()) == 2
    assert harness.kinds() == ["PaymentAuthorized", "PaymentCaptured"]


def test_concurrency_bounds_calls_in_flight(tmp_path: Path, gateway: FakeGateway) -> None:
    h = Harness(tmp_path, gateway, concurrency=3)

    async def scenario() -> None:
        gateway.gate = asyncio.Event()
        await h.steps.start()
        h.core.handle([rec(reserved(f"o{i}"), f"o{i}") for i in range(10)])
        await h.rounds(5)
        assert gateway.in_flight == 3
        gateway.gate.set()
        await h.until(lambda: h.steps.stats.authorized == 10)

    try:
        run(scenario())
        assert gateway.max_in_flight == 3
        assert all(n == 1 for n in gateway.applied.values()) and len(gateway.applied) == 10
    finally:
        h.close()


def test_a_lease_keeps_a_second_worker_off_claimed_work(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeGateway())
    other = SqlitePaymentsStore(tmp_path / "payments.db")
    try:
        h.handle(reserved("a"), reserved("b"))
        now = h.clock()
        first = h.work_store.claim(now, 30.0, 10, "w1")
        assert {r.order_id for r in first} == {"a", "b"}
        assert all(r.started for r in first)
        assert other.claim(now + 1, 30.0, 10, "w2") == []
        # the lease ran out (its worker died): the work is claimable again
        again = other.claim(now + 31, 30.0, 10, "w2")
        assert {r.order_id for r in again} == {"a", "b"}
    finally:
        other.close()
        h.close()


def test_an_outcome_of_a_lost_lease_is_not_recorded(harness: Harness) -> None:
    harness.handle(reserved())
    [claimed] = harness.work_store.claim(harness.clock(), 30.0, 10, "dead-worker")
    # another worker took it over after the lease ran out and recorded a retry
    with harness.store.transaction():
        harness.store.save([after_failure(claimed, harness.clock(), 0.0)])
    harness.steps._done.append((claimed, Outcome("k", "authorize", True, "auth-x", 1234, "EUR")))
    run(harness.rounds(1))
    assert harness.steps.stats.lost_claims == 1
    assert harness.row().authorization_id != "auth-x"


def test_metrics_expose_the_counters(harness: Harness) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(PaymentsCollector(harness.steps.stats))
    harness.handle(reserved())
    run(harness.until(lambda: harness.row().state == "authorized"))
    text = generate_latest(registry).decode()
    assert 'ordermesh_payments_outcomes_total{outcome="authorized",service="payments"} 1.0' in text
    assert "ordermesh_payments_retries_total" in text
    assert 'ordermesh_payments_pending{service="payments"} 0.0' in text
