"""What the payments service needs from a card processor: the adapter seam.

``PaymentGateway`` is the whole interface: authorize, capture, void, refund, and a
look-up by idempotency key. ``gateway.client.HttpGateway`` speaks it to ``ordermesh
gateway``; pointing payments at a real provider is one more class with these five
methods (docs/payments.md), picked by ``gateway.client.open_gateway``.

Every call carries an idempotency key, one per order and operation
(``operation_key``): the gateway applies a key at most once and answers a repeat with
the first answer, so retrying a call whose outcome is unknown can never charge twice.

Outcomes, as a caller must treat them:

- an ``Outcome`` with ``approved`` True or False: the gateway decided (a decline is a
  decision, not an error);
- ``errors.GatewayUnavailableError``: the gateway said it did not apply the call (a 5xx before
  applying, a refused connection): retry it later with the same key;
- ``errors.GatewayUnknownOutcomeError``: no answer (a timeout, a lost response, a connection
  cut mid-reply): the call may or may not have been applied. Resolve it with ``lookup``
  of the same key; if the key is unknown there, retry with the same key.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple, Protocol

Operation = Literal["authorize", "capture", "void", "refund"]
OPERATIONS: Final[tuple[Operation, ...]] = ("authorize", "capture", "void", "refund")


def operation_key(order_id: str, operation: Operation) -> str:
    """The idempotency key of ``operation`` on ``order_id``: one per order and operation."""
    return f"{order_id}:{operation}"


class Outcome(NamedTuple):
    """The gateway's answer to one operation (also what ``lookup`` returns)."""

    key: str
    operation: Operation
    approved: bool
    # the authorization the operation belongs to ("" for a declined authorize)
    authorization_id: str
    amount_cents: int
    currency: str
    # why it was declined ("" when approved), e.g. "card_declined", "insufficient_funds"
    reason: str = ""
    # when the gateway applied it (its clock, epoch seconds)
    at: float = 0.0


class PaymentGateway(Protocol):
    """A card processor's API, as payments uses it. Amounts are integer cents.

    Asynchronous: payments keeps many calls in flight at once (a slow gateway must not
    serialise a partition), on one event loop rather than a thread per call.
    """

    async def authorize(
        self,
        key: str,
        *,
        order_id: str,
        amount_cents: int,
        currency: str,
        customer_id: str,
        card: str,
    ) -> Outcome: ...

    async def capture(self, key: str, *, authorization_id: str, amount_cents: int) -> Outcome: ...

    async def void(self, key: str, *, authorization_id: str) -> Outcome: ...

    async def refund(self, key: str, *, authorization_id: str, amount_cents: int) -> Outcome: ...

    async def lookup(self, key: str) -> Outcome | None:
        """The outcome recorded under ``key``; None: the gateway never applied it."""
        ...

    async def close(self) -> None: ...
