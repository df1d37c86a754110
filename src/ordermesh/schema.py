"""Wire types of OrderMesh and their JSON encode/decode.

One definition per type, used by every component. JSON on the wire, UTF-8.
Amounts travel as JSON numbers with at most two decimals; validation works in integer
cents so that "total equals the sum of quantity x unit_price" is exact.

The decoder is msgspec: typed decoding into Structs with constraints runs in C and was
measured against orjson + hand checks, pydantic and the stdlib (see ``ordermesh bench
decode``).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

from ordermesh.errors import DecodeError

SCHEMA_VERSION: Final = 1
MAX_MESSAGE_BYTES: Final = 64 * 1024
MAX_AMOUNT: Final = 1_000_000_000.0
# Longest free-text reason of a cancel, on the HTTP path and on ``order-commands`` alike.
MAX_CANCEL_REASON: Final = 500

# ISO 4217 codes we accept; all are treated as having two decimals ("to the cent").
CURRENCIES: Final = frozenset(
    {
        "USD",
        "EUR",
        "GBP",
        "CHF",
        "CAD",
        "AUD",
        "NZD",
        "SEK",
        "NOK",
        "DKK",
        "PLN",
        "CZK",
        "HUF",
        "INR",
        "SGD",
        "HKD",
        "CNY",
        "ZAR",
        "BRL",
        "MXN",
    }
)

RejectReason = Literal["OUT_OF_STOCK", "UNKNOWN_SKU", "INVALID_ORDER"]
# ORDER_REJECTED: nothing was ever held; ALREADY_SHIPPED: the parcel left; ALREADY_ENDED:
# the order ended on its own (payment failed, reservation expired)
CancelRejectReason = Literal["ORDER_REJECTED", "ALREADY_SHIPPED", "ALREADY_ENDED"]
# why held stock went back on the shelf
ReleaseCause = Literal["CANCELLED", "EXPIRED", "PAYMENT_FAILED", ""]
# why an authorization was voided or a capture refunded: the order ended without shipping
CompensationCause = Literal["CANCELLED", "EXPIRED", "PAYMENT_FAILED"]

Sku = Annotated[str, Meta(min_length=1, max_length=64)]
OrderId = Annotated[str, Meta(min_length=1, max_length=64)]
Quantity = Annotated[int, Meta(ge=1, le=10_000)]
Amount = Annotated[float, Meta(ge=0, le=MAX_AMOUNT)]


class OrderItem(msgspec.Struct, frozen=True):
    sku: Sku
    quantity: Quantity
    unit_price: Amount


class OrderPlaced(msgspec.Struct, frozen=True):
    """An order as placed by a customer (topic ``orders``)."""

    order_id: OrderId
    customer_id: Annotated[str, Meta(min_length=1, max_length=64)]
    items: Annotated[tuple[OrderItem, ...], Meta(min_length=1, max_length=100)]
    currency: Annotated[str, Meta(min_length=3, max_length=3)]
    total: Amount
    created_at: Annotated[float, Meta(ge=0)]
    schema_version: int = SCHEMA_VERSION
    # A payment method token the gateway charges (e.g. a test card number); empty: the
    # customer's default. Not part of the fingerprint: it says how to pay, not what.
    card: Annotated[str, Meta(max_length=64)] = ""
    # The API client that placed it: an opaque id of its API key
    # (``api/idempotency.client_for_api_key``), never the key. Unset (and then absent on
    # the wire, so records without it read as before): no API client's, e.g. the load
    # generator's; only operators see such an order. Not part of the fingerprint either.
    api_client: Annotated[str, Meta(min_length=1, max_length=64)] | UnsetType = UNSET

    def owner(self) -> str | None:
        """``api_client`` if set, else None."""
        return self.api_client if isinstance(self.api_client, str) else None


class ItemQty(msgspec.Struct, frozen=True, array_like=False):
    sku: str
    quantity: int


# --- order events (topic ``order-events``) -------------------------------------------
#
# Keyed by order_id, so one order's events are one partition, in order. ``lifecycle.py``
# says which of them move an order's status (the inventory's: it holds the reservation
# and decides every race on it) and which only record a fact (payments', fulfilment's).


class OrderReserved(msgspec.Struct, frozen=True, tag="OrderReserved", tag_field="type"):
    order_id: str
    items: tuple[ItemQty, ...]
    total: float
    currency: str
    order_created_at: float
    at: float
    # the reservation holds until then (0: for ever, decided before deadlines existed)
    expires_at: float = 0.0
    # what payments needs to authorize the order
    customer_id: str = ""
    card: str = ""


class OrderRejected(msgspec.Struct, frozen=True, tag="OrderRejected", tag_field="type"):
    order_id: str
    reason: RejectReason
    detail: str
    order_created_at: float
    at: float


class StockReleased(msgspec.Struct, frozen=True, tag="StockReleased", tag_field="type"):
    order_id: str
    items: tuple[ItemQty, ...]
    at: float
    cause: ReleaseCause = ""


class OrderCancelled(msgspec.Struct, frozen=True, tag="OrderCancelled", tag_field="type"):
    order_id: str
    at: float
    detail: str = ""
    # the status it was cancelled from (RESERVED or PAID): PAID holds an authorization
    stage: str = ""


class CancelRejected(msgspec.Struct, frozen=True, tag="CancelRejected", tag_field="type"):
    """A cancel that cannot apply: nothing is held, or the parcel has left."""

    order_id: str
    reason: CancelRejectReason
    detail: str
    at: float


class OrderPaid(msgspec.Struct, frozen=True, tag="OrderPaid", tag_field="type"):
    """The payment came in time: the reserved stock is committed to the order."""

    order_id: str
    authorization_id: str
    amount: float
    at: float


class OrderPaymentFailed(msgspec.Struct, frozen=True, tag="OrderPaymentFailed", tag_field="type"):
    """The payment was declined while the reservation held: the order ends, stock back."""

    order_id: str
    reason: str
    detail: str
    at: float


class ReservationExpired(msgspec.Struct, frozen=True, tag="ReservationExpired", tag_field="type"):
    """No payment came before the reservation's deadline: the order ends, stock back."""

    order_id: str
    expires_at: float
    at: float


class OrderShipped(msgspec.Struct, frozen=True, tag="OrderShipped", tag_field="type"):
    """The packed parcel left: the committed stock leaves the warehouse."""

    order_id: str
    shipment_id: str
    at: float


class PaymentAuthorized(msgspec.Struct, frozen=True, tag="PaymentAuthorized", tag_field="type"):
    order_id: str
    authorization_id: str
    amount: float
    currency: str
    at: float


class PaymentDeclined(msgspec.Struct, frozen=True, tag="PaymentDeclined", tag_field="type"):
    order_id: str
    reason: str
    detail: str
    at: float


class PaymentCaptured(msgspec.Struct, frozen=True, tag="PaymentCaptured", tag_field="type"):
    order_id: str
    authorization_id: str
    amount: float
    at: float


class PaymentVoided(msgspec.Struct, frozen=True, tag="PaymentVoided", tag_field="type"):
    order_id: str
    authorization_id: str
    amount: float
    cause: CompensationCause
    at: float


class PaymentRefunded(msgspec.Struct, frozen=True, tag="PaymentRefunded", tag_field="type"):
    order_id: str
    authorization_id: str
    amount: float
    cause: CompensationCause
    at: float


class ShipmentReady(msgspec.Struct, frozen=True, tag="ShipmentReady", tag_field="type"):
    """Fulfilment picked and packed a paid order; the inventory decides whether it ships."""

    order_id: str
    shipment_id: str
    at: float


OrderEvent = (
    OrderReserved
    | OrderRejected
    | StockReleased
    | OrderCancelled
    | CancelRejected
    | OrderPaid
    | OrderPaymentFailed
    | ReservationExpired
    | OrderShipped
    | PaymentAuthorized
    | PaymentDeclined
    | PaymentCaptured
    | PaymentVoided
    | PaymentRefunded
    | ShipmentReady
)
OUTCOME_TYPES: Final = ("OrderReserved", "OrderRejected")


# --- commands (topic ``order-commands``) ---------------------------------------------


class CancelOrder(msgspec.Struct, frozen=True, tag="CancelOrder", tag_field="type"):
    order_id: OrderId
    requested_at: float
    reason: Annotated[str, Meta(max_length=MAX_CANCEL_REASON)] = ""


class ExpireReservation(msgspec.Struct, frozen=True, tag="ExpireReservation", tag_field="type"):
    """Asked by the inventory's deadline sweep; keyed by order_id, so it is ordered with
    the order's cancels and a repeated one changes nothing."""

    order_id: OrderId
    requested_at: float


class Restock(msgspec.Struct, frozen=True, tag="Restock", tag_field="type"):
    """Units arriving for a sku; keyed by sku. ``restock_id`` makes a redelivery a no-op."""

    restock_id: Annotated[str, Meta(min_length=1, max_length=64)]
    sku: Sku
    quantity: Annotated[int, Meta(ge=1, le=100_000_000)]
    requested_at: float


OrderCommand = CancelOrder | ExpireReservation | Restock


_T = TypeVar("_T")

_encoder = msgspec.json.Encoder()
_order_decoder = msgspec.json.Decoder(OrderPlaced)
_event_decoder: msgspec.json.Decoder[OrderEvent] = msgspec.json.Decoder(OrderEvent)
_command_decoder: msgspec.json.Decoder[OrderCommand] = msgspec.json.Decoder(OrderCommand)
_fingerprint_encoder = msgspec.msgpack.Encoder()


def encode(obj: msgspec.Struct) -> bytes:
    """Encode any wire type as compact UTF-8 JSON."""
    return _encoder.encode(obj)


def order_fingerprint(order: OrderPlaced) -> bytes:
    """16-byte digest of what an order asks for; equal for every copy of the same order.

    Covers the business fields: order_id, customer_id, currency, total and the items
    sorted (their order on the wire means nothing; each item stays whole, so two lines of
    one sku are not merged). It hashes a msgpack encoding of the decoded values, not the
    raw bytes, so any re-encoding of the same order (field order, whitespace, escapes,
    ``1.50`` vs ``1.5``) matches. Left out on purpose: ``created_at``, which a client or a
    load run rebuilding the same order sets anew (nothing decided depends on it), and
    ``schema_version``, which says how the order was written, not what it asks for.
    """
    # amounts as integer cents: a validated order holds whole cents, and ints have one
    # encoding where floats have two zeros
    items = order.items
    if len(items) == 1:
        item = items[0]
        lines = [(item.sku, item.quantity, round(item.unit_price * 100))]
    else:
        lines = sorted((i.sku, i.quantity, round(i.unit_price * 100)) for i in items)
    canonical = _fingerprint_encoder.encode(
        (order.order_id, order.customer_id, order.currency, round(order.total * 100), lines)
    )
    return hashlib.blake2b(canonical, digest_size=16).digest()


def to_cents(amount: float) -> int | None:
    """Amount in integer cents, or None if it has more than two decimals."""
    if not math.isfinite(amount):
        return None
    cents = round(amount * 100)
    # Exact, no tolerance: int / int is correctly rounded, so this holds iff ``amount`` is
    # the double nearest to a whole number of cents, i.e. the wire carried <= 2 decimals.
    # A tolerance on amount * 100 let sub-cent values through once amounts were large.
    if cents / 100 != amount:
        return None
    return cents


def order_total_cents(items: tuple[OrderItem, ...]) -> int | None:
    total = 0
    for item in items:
        cents = to_cents(item.unit_price)
        if cents is None:
            return None
        total += cents * item.quantity
    return total


def validate_order(order: OrderPlaced) -> None:
    """Business-level checks that a typed decode cannot express; raises DecodeError."""
    if order.schema_version != SCHEMA_VERSION:
        raise DecodeError(f"unsupported schema_version {order.schema_version}", kind="schema")
    if order.currency not in CURRENCIES:
        raise DecodeError(f"unknown currency {order.currency!r}", kind="validation")
    total = to_cents(order.total)
    if total is None:
        raise DecodeError(f"total {order.total} is not a whole number of cents", kind="validation")
    expected = order_total_cents(order.items)
    if expected is None:
        raise DecodeError("a unit_price is not a whole number of cents", kind="validation")
    if expected != total:
        raise DecodeError(
            f"total {total / 100:.2f} != sum of items {expected / 100:.2f}", kind="validation"
        )


def _decode(decoder: msgspec.json.Decoder[_T], raw: bytes, what: str) -> _T:
    """Typed decode of ``raw``; every failure becomes a DecodeError keeping ``raw``."""
    try:
        decoded = decoder.decode(raw)
        # msgspec checks UTF-8 only in strings it keeps; invalid bytes in an ignored
        # (unknown) field would otherwise pass. isascii() keeps the common case cheap.
        if not raw.isascii():
            raw.decode("utf-8")
        return decoded
    except msgspec.ValidationError as exc:
        raise DecodeError(f"{what}: schema violation: {exc}", raw=raw, kind="schema") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"{what}: not valid JSON: {exc}", raw=raw, kind="json") from None
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what}: invalid UTF-8: {exc}", raw=raw, kind="utf8") from None
    except Exception as exc:  # noqa: BLE001 - msgspec must never crash a consumer
        # e.g. RecursionError on deeply nested input
        raise DecodeError(f"{what}: undecodable: {exc!r}", raw=raw, kind="json") from None


def decode_order(raw: bytes | None) -> OrderPlaced:
    """Decode and validate an ``OrderPlaced``; any failure is a DecodeError keeping ``raw``."""
    if raw is None:
        raise DecodeError("empty message value", raw=raw, kind="schema")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise DecodeError(
            f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}", raw=raw, kind="size"
        )
    order = _decode(_order_decoder, raw, "bad order")
    try:
        validate_order(order)
    except DecodeError as exc:
        exc.raw = raw
        raise
    return order


def decode_event(raw: bytes | None) -> OrderEvent:
    """Decode an order event; any failure is a DecodeError keeping ``raw``."""
    if raw is None:
        raise DecodeError("empty event value", raw=raw, kind="schema")
    return _decode(_event_decoder, raw, "bad event")


def decode_command(raw: bytes | None) -> OrderCommand:
    """Decode an order command; any failure is a DecodeError keeping ``raw``."""
    if raw is None:
        raise DecodeError("empty command value", raw=raw, kind="schema")
    return _decode(_command_decoder, raw, "bad command")


def now() -> float:
    return time.time()
