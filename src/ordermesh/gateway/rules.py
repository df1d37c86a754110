"""The card processor's rules: what a capture, void or refund may do to an authorization.

Pure functions of the authorization's ledger rows, so the server decides with nothing but
the ledger, and a restarted gateway decides exactly as the one before it.

- capture: only an approved authorization that is neither voided nor captured, for at
  most the authorized amount (once: a partial capture releases the rest);
- void: only an approved authorization not captured (nor voided): it releases the whole
  authorized amount;
- refund: only a captured authorization, the refunds together at most the captured amount.

A refusal is a decision, recorded under its key like an approval: ``approved`` False
with the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple

from ordermesh.gateway.protocol import Operation
from ordermesh.gateway.wire import OperationBody

NOT_FOUND: Final = "authorization_not_found"
VOIDED: Final = "authorization_voided"
ALREADY_CAPTURED: Final = "already_captured"
NOT_CAPTURED: Final = "not_captured"
OVER_AUTHORIZED: Final = "amount_exceeds_authorization"
OVER_CAPTURED: Final = "amount_exceeds_captured"


class Call(NamedTuple):
    """One operation call, as its fingerprint and the rules see it."""

    operation: Operation
    order_id: str = ""
    authorization_id: str = ""
    amount_cents: int = 0
    currency: str = ""
    customer_id: str = ""
    card: str = ""


def fingerprint(request: Call) -> str:
    """A digest of every parameter: a repeated key must carry the same ones."""
    text = "\x1f".join(str(part) for part in request)
    # a digest, not the text: the ledger keeps no card numbers
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class Decision(NamedTuple):
    """What a call does: the row it adds to the ledger, without key, seq and time."""

    approved: bool
    reason: str
    order_id: str
    authorization_id: str
    amount_cents: int
    currency: str


@dataclass
class Authorization:
    """An authorization folded from its ledger rows (approved ones only change it)."""

    order_id: str
    amount_cents: int
    currency: str
    captured_cents: int = 0
    captured: bool = False
    voided: bool = False
    refunded_cents: int = 0


def fold(rows: Iterable[OperationBody]) -> Authorization | None:
    """The state of one authorization from its rows in ledger order (None: no approved
    authorize among them)."""
    state: Authorization | None = None
    for row in rows:
        if not row.approved:
            continue
        if row.operation == "authorize":
            state = Authorization(row.order_id, row.amount_cents, row.currency)
        elif state is None:
            continue
        elif row.operation == "capture":
            state.captured = True
            state.captured_cents += row.amount_cents
        elif row.operation == "void":
            state.voided = True
        elif row.operation == "refund":
            state.refunded_cents += row.amount_cents
    return state


def decide_followup(request: Call, auth: Authorization | None) -> Decision:
    """The decision on a capture, void or refund of the authorization ``auth``."""
    op, amount = request.operation, request.amount_cents
    if auth is None:
        return Decision(False, NOT_FOUND, "", request.authorization_id, amount, "")

    def refuse(reason: str) -> Decision:
        return Decision(
            False, reason, auth.order_id, request.authorization_id, amount, auth.currency
        )

    def approve(cents: int) -> Decision:
        return Decision(True, "", auth.order_id, request.authorization_id, cents, auth.currency)

    if op == "capture":
        if auth.voided:
            return refuse(VOIDED)
        if auth.captured:
            return refuse(ALREADY_CAPTURED)
        if amount > auth.amount_cents:
            return refuse(OVER_AUTHORIZED)
        return approve(amount)
    if op == "void":
        if auth.voided:
            return refuse(VOIDED)
        if auth.captured:
            return refuse(ALREADY_CAPTURED)
        return approve(auth.amount_cents)
    if op == "refund":
        if not auth.captured:
            return refuse(NOT_CAPTURED)
        if amount > auth.captured_cents - auth.refunded_cents:
            return refuse(OVER_CAPTURED)
        return approve(amount)
    raise ValueError(f"not a follow-up operation: {op}")
