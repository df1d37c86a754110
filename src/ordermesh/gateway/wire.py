"""The gateway's HTTP bodies, shared by ``gateway.server`` and ``gateway.client``.

Every call of an operation answers an ``OperationBody`` (200, a decline included);
errors are RFC 9457 problems (``api.problems``). Amounts are integer cents. A batch
(``BatchBody``) carries many operations in one request and answers a ``BatchReply``: one
``BatchResult`` per operation, in order, each with the status its own call would have.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta

from ordermesh.gateway.protocol import Operation, Outcome

MAX_CENTS: Final = 10**12
MAX_PAGE: Final = 10_000
DEFAULT_PAGE: Final = 1000
# operations of one batch request at most
MAX_BATCH: Final = 1000

Cents = Annotated[int, Meta(ge=1, le=MAX_CENTS)]
Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$")]
Id = Annotated[str, Meta(min_length=1, max_length=64)]


class AuthorizeBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    order_id: Id
    amount_cents: Cents
    currency: Currency
    customer_id: Id
    # a payment method token (a test card number); "" is the customer's default
    card: Annotated[str, Meta(max_length=64)] = ""


class AmountBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of a capture or a refund."""

    amount_cents: Cents


class VoidBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A void carries nothing: it releases the whole authorization."""


class OperationBody(msgspec.Struct, frozen=True):
    """One applied operation: the answer to its call, and one row of the ledger."""

    seq: int
    key: str
    operation: Operation
    approved: bool
    order_id: str
    authorization_id: str
    amount_cents: int
    currency: str
    reason: str
    at: float

    def outcome(self) -> Outcome:
        return Outcome(
            key=self.key,
            operation=self.operation,
            approved=self.approved,
            authorization_id=self.authorization_id,
            amount_cents=self.amount_cents,
            currency=self.currency,
            reason=self.reason,
            at=self.at,
        )


class BatchItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One operation of a batch: its idempotency key, and the body its own call would
    have (``authorization_id`` for a capture, void or refund, as in the call's path)."""

    key: str
    operation: Operation
    order_id: str = ""
    amount_cents: int = 0
    currency: str = ""
    customer_id: str = ""
    card: str = ""
    authorization_id: str = ""


class BatchBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/batch``: operations applied one by one, each under its own key."""

    operations: Annotated[list[BatchItem], Meta(min_length=1, max_length=MAX_BATCH)]


class BatchResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """One operation's answer in a batch: ``status`` 200 with its ``outcome`` (approved
    or declined; ``replayed`` for a key applied before), or the status and detail of the
    problem its own call would have answered (409, 422, 503: nothing applied)."""

    key: str
    status: int
    outcome: OperationBody | None = None
    replayed: bool = False
    detail: str = ""


class BatchReply(msgspec.Struct, frozen=True):
    results: list[BatchResult]


class LedgerPage(msgspec.Struct, frozen=True):
    """``GET /v1/ledger?after=&limit=``: entries in ``seq`` order; ``next_after`` is the
    ``after`` of the next page (None: this was the last)."""

    entries: list[OperationBody]
    next_after: int | None


class OrderSummary(msgspec.Struct, frozen=True):
    """One order's money in the ledger. Counts and cents are of approved operations;
    ``declines`` counts every refused one (an authorization declined, a capture refused)."""

    order_id: str
    authorizations: int = 0
    captures: int = 0
    voids: int = 0
    refunds: int = 0
    declines: int = 0
    authorized_cents: int = 0
    captured_cents: int = 0
    voided_cents: int = 0
    refunded_cents: int = 0

    @property
    def kept_cents(self) -> int:
        return self.captured_cents - self.refunded_cents


class SummaryPage(msgspec.Struct, frozen=True):
    """``GET /v1/ledger/orders?after=&limit=``: orders by id; ``next_after`` as above."""

    orders: list[OrderSummary]
    next_after: str | None
