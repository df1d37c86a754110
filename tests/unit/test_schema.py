"""Unit tests of the wire schema: round trips, every validation rule, and fuzzing."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ordermesh import schema
from ordermesh.errors import DecodeError
from ordermesh.schema import (
    CancelOrder,
    ItemQty,
    OrderCancelled,
    OrderItem,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    StockReleased,
)

Decoder = Callable[[bytes | None], object]
DECODERS: list[Decoder] = [schema.decode_order, schema.decode_event, schema.decode_command]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def order_dict(**overrides: Any) -> dict[str, Any]:
    """A valid order as plain JSON data; 2 x 19.99 + 1 x 5.50 = 45.48."""
    order: dict[str, Any] = {
        "order_id": "ord-1-000000001",
        "customer_id": "cust-00042",
        "items": [
            {"sku": "SKU-00001", "quantity": 2, "unit_price": 19.99},
            {"sku": "SKU-00002", "quantity": 1, "unit_price": 5.5},
        ],
        "currency": "USD",
        "total": 45.48,
        "created_at": 1_700_000_000.25,
        "schema_version": 1,
    }
    order.update(overrides)
    return order


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def with_item(**fields: Any) -> dict[str, Any]:
    """A one-item order whose item has ``fields`` and whose total matches when it can."""
    item: dict[str, Any] = {"sku": "SKU-00001", "quantity": 1, "unit_price": 10.0} | fields
    price, quantity = item["unit_price"], item["quantity"]
    numbers = all(type(x) in (int, float) for x in (price, quantity))
    return order_dict(items=[item], total=round(price * quantity, 2) if numbers else 10.0)


def without(key: str) -> dict[str, Any]:
    order = order_dict()
    del order[key]
    return order


def without_item_field(key: str) -> dict[str, Any]:
    order = copy.deepcopy(order_dict())
    del order["items"][0][key]
    return order


def many_items(n: int) -> dict[str, Any]:
    items = [{"sku": f"SKU-{i:05d}", "quantity": 1, "unit_price": 1.0} for i in range(1, n + 1)]
    return order_dict(items=items, total=float(n))


def expect_decode_error(decode: Decoder, raw: bytes | None, kind: str | None = None) -> None:
    with pytest.raises(DecodeError) as info:
        decode(raw)
    assert info.value.raw is raw
    if kind is not None:
        assert info.value.kind == kind, str(info.value)


# --- round trips -----------------------------------------------------------------------


def test_order_round_trip() -> None:
    order = OrderPlaced(
        order_id="ord-1-000000001",
        customer_id="cust-00042",
        items=(OrderItem("SKU-00001", 2, 19.99), OrderItem("SKU-00002", 1, 5.5)),
        currency="USD",
        total=45.48,
        created_at=1_700_000_000.25,
    )
    raw = schema.encode(order)
    assert schema.decode_order(raw) == order
    assert json.loads(raw) == order_dict(card="")


def test_order_from_plain_json_decodes() -> None:
    decoded = schema.decode_order(dumps(order_dict()))
    assert decoded.items[0] == OrderItem("SKU-00001", 2, 19.99)
    assert decoded.total == 45.48


def test_missing_schema_version_defaults_to_current() -> None:
    order = order_dict()
    del order["schema_version"]
    assert schema.decode_order(dumps(order)).schema_version == schema.SCHEMA_VERSION


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    raw = dumps(order_dict(note="leave at the door", extra={"nested": [1, 2, 3]}))
    assert schema.decode_order(raw).order_id == "ord-1-000000001"


@pytest.mark.parametrize(
    "event",
    [
        OrderReserved(
            order_id="ord-1",
            items=(ItemQty("SKU-00001", 2), ItemQty("SKU-00002", 1)),
            total=45.48,
            currency="USD",
            order_created_at=1.5,
            at=2.5,
        ),
        OrderRejected(
            order_id="ord-2",
            reason="OUT_OF_STOCK",
            detail="SKU-00001 has 0 left",
            order_created_at=1.5,
            at=2.5,
        ),
        StockReleased(order_id="ord-3", items=(ItemQty("SKU-00003", 4),), at=3.0),
        OrderCancelled(order_id="ord-4", at=4.0, detail="customer asked"),
        OrderCancelled(order_id="ord-5", at=4.0),
    ],
    ids=lambda e: type(e).__name__,
)
def test_event_round_trip(event: schema.OrderEvent) -> None:
    raw = schema.encode(event)
    assert json.loads(raw)["type"] == type(event).__name__
    decoded = schema.decode_event(raw)
    assert type(decoded) is type(event)
    assert decoded == event


def test_command_round_trip() -> None:
    command = CancelOrder(order_id="ord-1", requested_at=5.0, reason="changed mind")
    raw = schema.encode(command)
    assert json.loads(raw)["type"] == "CancelOrder"
    assert schema.decode_command(raw) == command


# --- boundaries that must pass ---------------------------------------------------------


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(with_item(quantity=1), id="quantity-1"),
        pytest.param(with_item(quantity=10_000), id="quantity-10000"),
        pytest.param(many_items(1), id="1-item"),
        pytest.param(many_items(100), id="100-items"),
        pytest.param(order_dict(order_id="o" * 64), id="order_id-64"),
        pytest.param(order_dict(order_id="é"), id="order_id-non-ascii"),
        pytest.param(with_item(unit_price=0.0), id="free-item"),
        pytest.param(with_item(unit_price=0.1, quantity=3), id="0.1x3-is-0.30"),
        pytest.param(with_item(unit_price=999_999_999.99), id="max-cents"),
        pytest.param(with_item(unit_price=7), id="integer-price"),
        pytest.param(order_dict(currency="EUR"), id="EUR"),
    ],
)
def test_valid_boundaries_pass(order: dict[str, Any]) -> None:
    schema.decode_order(dumps(order))


def test_exactly_max_size_passes_and_one_more_byte_fails() -> None:
    base = dumps(order_dict(pad=""))
    pad = "x" * (schema.MAX_MESSAGE_BYTES - len(base))
    raw = dumps(order_dict(pad=pad))
    assert len(raw) == schema.MAX_MESSAGE_BYTES
    schema.decode_order(raw)
    expect_decode_error(schema.decode_order, dumps(order_dict(pad=pad + "x")), "size")


# --- every rule rejected ---------------------------------------------------------------

REJECTED_ORDERS: list[Any] = [
    # quantity
    pytest.param(with_item(quantity=0), "schema", id="quantity-0"),
    pytest.param(with_item(quantity=10_001), "schema", id="quantity-10001"),
    pytest.param(with_item(quantity=-1), "schema", id="quantity-negative"),
    pytest.param(with_item(quantity="1"), "schema", id="quantity-string"),
    pytest.param(with_item(quantity=True), "schema", id="quantity-bool"),
    pytest.param(with_item(quantity=1.5), "schema", id="quantity-float"),
    pytest.param(with_item(quantity=None), "schema", id="quantity-null"),
    pytest.param(with_item(quantity=2**70), "schema", id="quantity-bigint"),
    # items
    pytest.param(order_dict(items=[], total=0.0), "schema", id="0-items"),
    pytest.param(many_items(101), "schema", id="101-items"),
    pytest.param(order_dict(items={"sku": "SKU-00001"}), "schema", id="items-object"),
    pytest.param(order_dict(items=None), "schema", id="items-null"),
    pytest.param(with_item(sku=""), "schema", id="sku-empty"),
    pytest.param(with_item(sku="S" * 65), "schema", id="sku-65"),
    pytest.param(with_item(sku=1), "schema", id="sku-int"),
    # amounts
    pytest.param(with_item(unit_price=-1.0), "schema", id="price-negative"),
    pytest.param(with_item(unit_price="10.00"), "schema", id="price-string"),
    pytest.param(with_item(unit_price=1e10), "schema", id="price-above-max"),
    pytest.param(order_dict(total=-45.48), "schema", id="total-negative"),
    pytest.param(order_dict(total="45.48"), "schema", id="total-string"),
    pytest.param(order_dict(total=45.49), "validation", id="total-one-cent-over"),
    pytest.param(order_dict(total=45.47), "validation", id="total-one-cent-under"),
    pytest.param(order_dict(total=45.485), "validation", id="total-sub-cent"),
    pytest.param(with_item(unit_price=19.999), "validation", id="price-sub-cent"),
    pytest.param(with_item(unit_price=0.001), "validation", id="price-tenth-cent"),
    # sub-cent amounts large enough to hide under a relative tolerance (regression)
    pytest.param(with_item(unit_price=10_000_000.005), "validation", id="large-price-half-cent"),
    pytest.param(with_item(unit_price=999_999_999.991), "validation", id="large-price-sub-cent"),
    # currency
    pytest.param(order_dict(currency="XXX"), "validation", id="currency-unknown"),
    pytest.param(order_dict(currency="usd"), "validation", id="currency-lowercase"),
    pytest.param(order_dict(currency="US"), "schema", id="currency-short"),
    pytest.param(order_dict(currency="USDD"), "schema", id="currency-long"),
    pytest.param(order_dict(currency=840), "schema", id="currency-number"),
    # ids
    pytest.param(order_dict(order_id=""), "schema", id="order_id-empty"),
    pytest.param(order_dict(order_id="o" * 65), "schema", id="order_id-65"),
    pytest.param(order_dict(order_id=123), "schema", id="order_id-int"),
    pytest.param(order_dict(customer_id=""), "schema", id="customer_id-empty"),
    pytest.param(order_dict(customer_id="c" * 65), "schema", id="customer_id-65"),
    # created_at
    pytest.param(order_dict(created_at=-1.0), "schema", id="created_at-negative"),
    pytest.param(order_dict(created_at="2024-01-01"), "schema", id="created_at-string"),
    # schema_version
    pytest.param(order_dict(schema_version=2), "schema", id="schema_version-2"),
    pytest.param(order_dict(schema_version=0), "schema", id="schema_version-0"),
    pytest.param(order_dict(schema_version="1"), "schema", id="schema_version-string"),
    # shape
    pytest.param([order_dict()], "schema", id="top-level-array"),
    pytest.param("order", "schema", id="top-level-string"),
    pytest.param(None, "schema", id="top-level-null"),
    *(
        pytest.param(without(key), "schema", id=f"missing-{key}")
        for key in ("order_id", "customer_id", "items", "currency", "total", "created_at")
    ),
    *(
        pytest.param(without_item_field(key), "schema", id=f"missing-item-{key}")
        for key in ("sku", "quantity", "unit_price")
    ),
]


@pytest.mark.parametrize(("order", "kind"), REJECTED_ORDERS)
def test_invalid_order_is_rejected(order: Any, kind: str) -> None:
    expect_decode_error(schema.decode_order, dumps(order), kind)


VALID = dumps(order_dict())


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        pytest.param(b"", "json", id="empty-bytes"),
        pytest.param(b"not json", "json", id="text"),
        pytest.param(b"{", "json", id="truncated-open"),
        pytest.param(VALID[:-1], "json", id="truncated-close"),
        pytest.param(VALID + b"}", "json", id="trailing-garbage"),
        pytest.param(b"\x00\x01\x02\xff", "json", id="binary"),
        pytest.param(VALID.replace(b"45.48", b"NaN"), "json", id="nan-token"),
        pytest.param(VALID.replace(b"45.48", b"1e999"), "schema", id="infinite-total"),
        pytest.param(VALID.replace(b"cust-", b"cust-\xc3\x28"), "utf8", id="bad-utf8-field"),
        pytest.param(VALID.replace(b"cust-", b"cust-\xed\xa0\x80"), "utf8", id="utf8-surrogate"),
        # ignored by the typed decoder, but still not UTF-8 (regression)
        pytest.param(VALID[:-1] + b', "note": "\xff\xfe"}', "utf8", id="bad-utf8-unknown-field"),
        pytest.param(b"\xef\xbb\xbf" + VALID, "json", id="utf8-bom"),
        pytest.param(b"[" * 60_000, "schema", id="array-not-object"),
        # deep nesting inside an ignored field makes msgspec raise RecursionError
        pytest.param(b'{"x":' * 13_000, "json", id="deep-nesting"),
        pytest.param(
            dumps(order_dict(note="x" * schema.MAX_MESSAGE_BYTES)), "size", id="oversized"
        ),
        pytest.param(None, "schema", id="none"),
    ],
)
def test_undecodable_order_is_rejected(raw: bytes | None, kind: str) -> None:
    expect_decode_error(schema.decode_order, raw, kind)


def test_validation_error_carries_raw_bytes() -> None:
    raw = dumps(order_dict(total=45.49))
    with pytest.raises(DecodeError) as info:
        schema.decode_order(raw)
    assert info.value.raw == raw
    assert "45.49" in str(info.value)


def test_validate_order_on_a_constructed_struct() -> None:
    order = OrderPlaced(
        order_id="o",
        customer_id="c",
        items=(OrderItem("SKU-00001", 1, 1.0),),
        currency="USD",
        total=2.0,
        created_at=0.0,
    )
    with pytest.raises(DecodeError):
        schema.validate_order(order)
    schema.validate_order(msgspec.structs.replace(order, total=1.0))


@pytest.mark.parametrize(
    ("amount", "cents"),
    [
        (0.0, 0),
        (0.1, 10),
        (0.3, 30),
        (19.99, 1999),
        (165.47, 16547),
        (1.0, 100),
        (999_999_999.99, 99_999_999_999),
        (0.125, None),
        (19.999, None),
        (0.1 + 0.2, None),
        (10_000_000.005, None),
        (float("inf"), None),
        (float("nan"), None),
    ],
)
def test_to_cents(amount: float, cents: int | None) -> None:
    assert schema.to_cents(amount) == cents


# --- events and commands ---------------------------------------------------------------

CANCELLED = {"type": "OrderCancelled", "order_id": "ord-1", "at": 1.0}


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        pytest.param(None, "schema", id="none"),
        pytest.param(b"", "json", id="empty"),
        pytest.param(b"nope", "json", id="not-json"),
        pytest.param(dumps(CANCELLED | {"type": "OrderShipped"}), "schema", id="unknown-type"),
        pytest.param(dumps({k: v for k, v in CANCELLED.items() if k != "type"}), "schema"),
        pytest.param(dumps({"type": "OrderCancelled", "at": 1.0}), "schema", id="no-order_id"),
        pytest.param(
            dumps(
                {
                    "type": "OrderRejected",
                    "order_id": "o",
                    "reason": "BORED",
                    "detail": "",
                    "order_created_at": 1.0,
                    "at": 1.0,
                }
            ),
            "schema",
            id="bad-reason",
        ),
        pytest.param(dumps(CANCELLED | {"at": "now"}), "schema", id="at-string"),
        pytest.param(dumps(CANCELLED).replace(b"ord-1", b"ord-\xff"), "utf8", id="bad-utf8"),
        pytest.param(b"[" * 100_000, "schema", id="deep-array"),
        pytest.param(b'{"type":' * 100_000, "json", id="deep-object-regression"),
    ],
)
def test_invalid_event_is_rejected(raw: bytes | None, kind: str) -> None:
    expect_decode_error(schema.decode_event, raw, kind)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(None, id="none"),
        pytest.param(b"{]", id="not-json"),
        pytest.param(dumps({"type": "CancelOrder", "order_id": "", "requested_at": 1.0})),
        pytest.param(dumps({"type": "CancelOrder", "order_id": "o" * 65, "requested_at": 1.0})),
        pytest.param(dumps({"type": "Restock", "order_id": "o", "requested_at": 1.0})),
        pytest.param(
            dumps(
                {"type": "CancelOrder", "order_id": "o", "requested_at": 1.0, "reason": "r" * 501}
            ),
            id="reason-too-long",
        ),
        pytest.param(dumps({"order_id": "o", "requested_at": 1.0}), id="no-type"),
        pytest.param(b'{"type":' * 100_000, id="deep-object-regression"),
    ],
)
def test_invalid_command_is_rejected(raw: bytes | None) -> None:
    expect_decode_error(schema.decode_command, raw)


def test_cancel_reason_up_to_the_limit_decodes() -> None:
    raw = schema.encode(CancelOrder("o", 1.0, reason="r" * schema.MAX_CANCEL_REASON))
    assert schema.decode_command(raw).reason == "r" * 500


# --- order fingerprint -----------------------------------------------------------------


def test_fingerprint_is_the_same_for_every_encoding_of_one_order() -> None:
    base = schema.decode_order(dumps(order_dict()))
    fingerprint = schema.order_fingerprint(base)
    assert len(fingerprint) == 16
    data = order_dict(created_at=1.0, schema_version=1)
    data["items"] = data["items"][::-1]
    reencoded = json.dumps(dict(reversed(data.items())), indent=3).replace("5.5", "5.50")
    same = schema.decode_order(reencoded.encode())
    assert same != base
    assert schema.order_fingerprint(same) == fingerprint


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"order_id": "ord-2"}, id="order_id"),
        pytest.param({"customer_id": "cust-2"}, id="customer"),
        pytest.param({"currency": "EUR"}, id="currency"),
        pytest.param(
            {
                "items": [
                    {"sku": "SKU-00001", "quantity": 1, "unit_price": 19.99},
                    {"sku": "SKU-00001", "quantity": 1, "unit_price": 19.99},
                    {"sku": "SKU-00002", "quantity": 1, "unit_price": 5.5},
                ]
            },
            id="same-sku-on-two-lines",
        ),
        pytest.param(
            {
                "items": [
                    {"sku": "SKU-00001", "quantity": 1, "unit_price": 39.98},
                    {"sku": "SKU-00002", "quantity": 1, "unit_price": 5.5},
                ]
            },
            id="quantity-and-price",
        ),
        pytest.param(
            {
                "items": [
                    {"sku": "SKU-00001", "quantity": 2, "unit_price": 19.99},
                    {"sku": "SKU-00003", "quantity": 1, "unit_price": 5.5},
                ]
            },
            id="sku",
        ),
    ],
)
def test_fingerprint_differs_for_another_order(change: dict[str, Any]) -> None:
    base = schema.decode_order(dumps(order_dict()))
    other = schema.decode_order(dumps(order_dict(**change)))
    assert schema.order_fingerprint(other) != schema.order_fingerprint(base)


# --- properties ------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["USD", "OrderReserved", "OrderCancelled", "CancelOrder", "SKU-00001"])
)
json_keys = st.sampled_from(
    [
        "type",
        "order_id",
        "customer_id",
        "items",
        "sku",
        "quantity",
        "unit_price",
        "currency",
        "total",
        "created_at",
        "schema_version",
        "at",
        "reason",
        "detail",
        "requested_at",
    ]
) | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(json_keys, children, max_size=8)
    ),
    max_leaves=30,
)


def assert_only_decode_error(raw: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(raw)
        except DecodeError as exc:
            assert exc.raw is raw
        # any other exception fails the test with its own traceback


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_decode_error(raw: bytes) -> None:
    assert_only_decode_error(raw)


@FUZZ
@given(json_values)
def test_arbitrary_json_raises_only_decode_error(value: Any) -> None:
    # allow_nan=True on purpose: NaN/Infinity tokens are not JSON and must be rejected too
    assert_only_decode_error(json.dumps(value).encode())


@FUZZ
@given(
    st.sampled_from(
        [
            "order_id",
            "customer_id",
            "items",
            "currency",
            "total",
            "created_at",
            "schema_version",
            "sku",
            "quantity",
            "unit_price",
        ]
    ),
    json_values,
)
def test_one_corrupted_field_raises_only_decode_error(field: str, value: Any) -> None:
    order = copy.deepcopy(order_dict())
    if field in ("sku", "quantity", "unit_price"):
        order["items"][0][field] = value
    else:
        order[field] = value
    assert_only_decode_error(json.dumps(order).encode())


ids = st.text(min_size=1, max_size=64)
items = st.lists(
    st.tuples(
        ids,
        st.integers(min_value=1, max_value=10_000),
        # <= $1000 keeps 100 items x 10000 within MAX_AMOUNT
        st.integers(min_value=0, max_value=100_000),
    ),
    min_size=1,
    max_size=100,
)


@FUZZ
@given(
    order_id=ids,
    customer_id=ids,
    items=items,
    currency=st.sampled_from(sorted(schema.CURRENCIES)),
    created_at=st.floats(min_value=0, max_value=4e9),
)
def test_generated_valid_order_round_trips(
    order_id: str,
    customer_id: str,
    items: list[tuple[str, int, int]],
    currency: str,
    created_at: float,
) -> None:
    total_cents = sum(quantity * cents for _, quantity, cents in items)
    order = OrderPlaced(
        order_id=order_id,
        customer_id=customer_id,
        items=tuple(OrderItem(sku, quantity, cents / 100) for sku, quantity, cents in items),
        currency=currency,
        total=total_cents / 100,
        created_at=created_at,
    )
    raw = schema.encode(order)
    assert schema.decode_order(raw) == order
    schema.validate_order(order)
    assert schema.to_cents(order.total) == total_cents


@FUZZ
@given(st.integers(min_value=0, max_value=99_999_999_999))
def test_to_cents_is_exact_for_every_whole_cent(cents: int) -> None:
    assert schema.to_cents(cents / 100) == cents
    assert schema.to_cents(float(json.loads(json.dumps(cents / 100)))) == cents
