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
from msgspec import Meta

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
CancelRejectReason = Literal["ORDER_REJECTED"]

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


class ItemQty(msgspec.Struct, frozen=True, array_like=False):
    sku: str
    quantity: int


# --- order events (topic ``order-events``) -------------------------------------------


class OrderReserved(msgspec.Struct, frozen=True, tag="OrderReserved", tag_field="type"):
    order_id: str
    items: tuple[ItemQty, ...]
    total: float
    currency: str
    order_created_at: float
    at: float


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


class OrderCancelled(msgspec.Struct, frozen=True, tag="OrderCancelled", tag_field="type"):
    order_id: str
    at: float
    detail: str = ""


class CancelRejected(msgspec.Struct, frozen=True, tag="CancelRejected", tag_field="type"):
    """A cancel that cannot apply: the order was rejected, so nothing is held."""

    order_id: str
    reason: CancelRejectReason
    detail: str
    at: float


OrderEvent = OrderReserved | OrderRejected | StockReleased | OrderCancelled | CancelRejected
OUTCOME_TYPES: Final = ("OrderReserved", "OrderRejected")


# --- commands (topic ``order-commands``) ---------------------------------------------


class CancelOrder(msgspec.Struct, frozen=True, tag="CancelOrder", tag_field="type"):
    order_id: OrderId
    requested_at: float
    reason: Annotated[str, Meta(max_length=MAX_CANCEL_REASON)] = ""


OrderCommand = CancelOrder


class _CommandTag(msgspec.Struct):
    # msgspec requires the tag only when decoding a union; while OrderCommand is a single
    # struct, a message without "type" would silently decode as a CancelOrder.
    type: str


_T = TypeVar("_T")

_encoder = msgspec.json.Encoder()
_order_decoder = msgspec.json.Decoder(OrderPlaced)
_event_decoder: msgspec.json.Decoder[OrderEvent] = msgspec.json.Decoder(OrderEvent)
_command_decoder = msgspec.json.Decoder(OrderCommand)
_command_tag_decoder = msgspec.json.Decoder(_CommandTag)
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
    _decode(_command_tag_decoder, raw, "bad command")
    return _decode(_command_decoder, raw, "bad command")


def now() -> float:
    return time.time()
