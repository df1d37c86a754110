"""The card processor's rules and the fault draws, as pure functions."""

from __future__ import annotations

import math
import random
import statistics

import msgspec
import pytest

from ordermesh.gateway.faults import (
    CUSTOMER_DECLINE,
    RANDOM_DECLINE,
    FaultConfig,
    Faults,
    Latency,
    config_from,
    merged,
)
from ordermesh.gateway.protocol import Operation
from ordermesh.gateway.rules import (
    ALREADY_CAPTURED,
    NOT_CAPTURED,
    NOT_FOUND,
    OVER_AUTHORIZED,
    OVER_CAPTURED,
    VOIDED,
    Authorization,
    Call,
    decide_followup,
    fingerprint,
    fold,
)
from ordermesh.gateway.wire import OperationBody

AUTH = "auth_1"


def row(op: Operation, cents: int, *, approved: bool = True, seq: int = 1) -> OperationBody:
    return OperationBody(seq, f"o1:{op}:{seq}", op, approved, "o1", AUTH, cents, "EUR", "", 0.0)


def state(*rows: OperationBody) -> Authorization | None:
    return fold(rows)


def call(op: Operation, cents: int = 0) -> Call:
    return Call(op, authorization_id=AUTH, amount_cents=cents)


# --- state rules ------------------------------------------------------------------------


def test_fold_counts_approved_rows_only() -> None:
    auth = state(
        row("authorize", 1000),
        row("capture", 400, approved=False, seq=2),
        row("capture", 900, seq=3),
        row("refund", 100, seq=4),
        row("refund", 200, seq=5),
    )
    assert auth == Authorization("o1", 1000, "EUR", 900, True, False, 300)
    assert state(row("authorize", 1000, approved=False)) is None
    assert state() is None


def test_capture_up_to_the_authorized_amount_once() -> None:
    auth = state(row("authorize", 1000))
    approved = decide_followup(call("capture", 1000), auth)
    assert (approved.approved, approved.amount_cents, approved.order_id) == (True, 1000, "o1")
    assert approved.currency == "EUR"
    over = decide_followup(call("capture", 1001), auth)
    assert (over.approved, over.reason) == (False, OVER_AUTHORIZED)
    captured = state(row("authorize", 1000), row("capture", 600, seq=2))
    assert decide_followup(call("capture", 100), captured).reason == ALREADY_CAPTURED


def test_no_capture_of_a_voided_declined_or_unknown_authorization() -> None:
    voided = state(row("authorize", 1000), row("void", 1000, seq=2))
    assert decide_followup(call("capture", 10), voided).reason == VOIDED
    unknown = decide_followup(call("capture", 10), None)
    assert (unknown.approved, unknown.reason, unknown.order_id) == (False, NOT_FOUND, "")
    declined = state(row("authorize", 1000, approved=False))
    assert decide_followup(call("capture", 10), declined).reason == NOT_FOUND


def test_void_releases_the_whole_authorization_only_before_capture() -> None:
    auth = state(row("authorize", 1000))
    void = decide_followup(call("void"), auth)
    assert (void.approved, void.amount_cents) == (True, 1000)
    captured = state(row("authorize", 1000), row("capture", 1000, seq=2))
    assert decide_followup(call("void"), captured).reason == ALREADY_CAPTURED
    voided = state(row("authorize", 1000), row("void", 1000, seq=2))
    assert decide_followup(call("void"), voided).reason == VOIDED


def test_refunds_together_at_most_the_captured_amount() -> None:
    assert decide_followup(call("refund", 1), state(row("authorize", 1000))).reason == NOT_CAPTURED
    captured = [row("authorize", 1000), row("capture", 800, seq=2)]
    assert decide_followup(call("refund", 801), state(*captured)).reason == OVER_CAPTURED
    first = decide_followup(call("refund", 500), state(*captured))
    assert first.approved
    after = state(*captured, row("refund", 500, seq=3))
    assert decide_followup(call("refund", 301), after).reason == OVER_CAPTURED
    assert decide_followup(call("refund", 300), after).approved


def test_fingerprint_tells_every_parameter_apart() -> None:
    base = Call("authorize", "o1", "", 1000, "EUR", "c1", "4242")
    variants = [
        base._replace(operation="capture"),
        base._replace(order_id="o2"),
        base._replace(amount_cents=1001),
        base._replace(currency="USD"),
        base._replace(customer_id="c2"),
        base._replace(card="4000000000000002"),
    ]
    assert fingerprint(base) == fingerprint(Call(*base))
    assert len({fingerprint(v) for v in [base, *variants]}) == len(variants) + 1


# --- faults -------------------------------------------------------------------------------


def test_latency_is_fitted_to_its_median_and_p99() -> None:
    latency = Latency.fitted(20.0, 200.0)
    rng = random.Random(7)
    draws = sorted(latency.draw(rng) for _ in range(20_000))
    assert statistics.median(draws) == pytest.approx(0.020, rel=0.05)
    assert draws[int(0.99 * len(draws))] == pytest.approx(0.200, rel=0.15)
    assert Latency.fitted(0.0, 0.0).draw(rng) == 0.0
    assert Latency.fitted(5.0, 5.0).draw(rng) == pytest.approx(0.005)


def test_fault_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="p99"):
        FaultConfig(latency_p50_ms=50.0, latency_p99_ms=10.0)
    with pytest.raises(ValueError, match="p50"):
        config_from({"latency_p99_ms": 10.0})
    with pytest.raises(ValueError):
        config_from({"error_rate": 1.5})
    with pytest.raises(ValueError):
        config_from({"no_such_fault": 1})
    with pytest.raises(ValueError):
        merged(FaultConfig(), [1, 2])


def test_merged_changes_only_the_named_faults() -> None:
    start = FaultConfig(error_rate=0.5, decline_customers=frozenset({"c1"}))
    changed = merged(start, {"lost_response_rate": 0.25, "decline_customers": ["c2", "c3"]})
    assert changed.error_rate == 0.5
    assert changed.lost_response_rate == 0.25
    assert changed.decline_customers == frozenset({"c2", "c3"})


def _fates(config: FaultConfig, n: int = 2000) -> list[tuple[bool, bool, bool, float]]:
    faults = Faults(config)
    out = []
    for _ in range(n):
        fate = faults.operation_fate()
        out.append((fate.error, fate.hang, fate.lose_reply, fate.delay_s))
    return out


def test_a_seed_draws_the_same_fates_and_rates_hold() -> None:
    config = FaultConfig(
        latency_p50_ms=1.0,
        latency_p99_ms=10.0,
        error_rate=0.1,
        timeout_rate=0.05,
        lost_response_rate=0.2,
        seed=42,
    )
    first, again = _fates(config), _fates(config)
    assert first == again
    assert first != _fates(msgspec.structs.replace(config, seed=43))
    n = len(first)
    errors = sum(f[0] for f in first)
    hangs = sum(f[1] for f in first)
    lost = sum(f[2] for f in first)
    assert errors == pytest.approx(0.1 * n, rel=0.25)
    # a hang is drawn only for calls that did not fail first
    assert hangs == pytest.approx(0.05 * 0.9 * n, rel=0.35)
    assert lost == pytest.approx(0.2 * (1 - 0.1) * (1 - 0.05) * n, rel=0.2)
    # failed and hung calls are never also lost, nor delayed
    assert all(not (f[0] or f[1]) or (not f[2] and f[3] == 0.0) for f in first)


def test_a_healthy_gateway_draws_nothing() -> None:
    faults = Faults(FaultConfig(seed=1))
    fates = {faults.operation_fate() for _ in range(100)}
    assert len(fates) == 1
    (fate,) = fates
    assert not (fate.error or fate.hang or fate.lose_reply) and fate.delay_s == 0


def test_declines_by_test_card_customer_and_rate() -> None:
    faults = Faults(FaultConfig(decline_customers=frozenset({"blocked"}), seed=3))
    fate = faults.operation_fate()
    assert faults.decline_reason("4000000000000002", "c1", fate) == "card_declined"
    assert faults.decline_reason("4000000000009995", "c1", fate) == "insufficient_funds"
    assert faults.decline_reason("4242424242424242", "blocked", fate) == CUSTOMER_DECLINE
    assert faults.decline_reason("4242424242424242", "c1", fate) == ""
    faults.configure(FaultConfig(decline_rate=0.3, seed=5))
    reasons = [faults.decline_reason("", "c1", faults.operation_fate()) for _ in range(2000)]
    assert reasons.count(RANDOM_DECLINE) == pytest.approx(600, rel=0.15)
    assert set(reasons) == {"", RANDOM_DECLINE}


def test_sigma_of_a_constant_latency_is_zero() -> None:
    assert Latency.fitted(5.0, 5.0).sigma == 0.0
    assert math.isclose(Latency.fitted(1.0, math.e).sigma * 2.3263478740408408, 1.0)
