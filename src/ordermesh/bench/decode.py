"""Micro-benchmark: decode + validate throughput of one order with four JSON stacks.

It backs the choice of msgspec in ``schema.py``. Every contender applies the same rules
as ``schema.decode_order`` (types without bool-as-int, lengths, ranges, currency, exact
cents), so the numbers compare equal work. orjson and pydantic are optional: a contender
whose library is missing is left out of the result.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, Final

from ordermesh import schema
from ordermesh.errors import DecodeError

Decode = Callable[[bytes], object]

SAMPLE: Final = schema.OrderPlaced(
    order_id="ord-42-000123456",
    customer_id="cust-04711",
    items=(
        schema.OrderItem("SKU-00001", 2, 19.99),
        schema.OrderItem("SKU-00017", 1, 5.49),
        schema.OrderItem("SKU-00230", 3, 120.0),
    ),
    currency="USD",
    total=405.47,
    created_at=1_700_000_000.123456,
)


def sample_bytes() -> bytes:
    """The realistic order every contender decodes (3 items, about 300 bytes)."""
    return schema.encode(SAMPLE)


def _is_number(value: object) -> bool:
    # bool is an int subclass; JSON true must not pass as 1
    return type(value) in (int, float)


def _text(obj: dict[str, Any], key: str, lo: int, hi: int) -> str:
    value = obj[key]
    if type(value) is not str or not lo <= len(value) <= hi:
        raise DecodeError(f"{key}: expected a string of {lo}..{hi} characters", kind="schema")
    return value


def _amount(obj: dict[str, Any], key: str) -> float:
    value = obj[key]
    if not _is_number(value) or not 0 <= value <= schema.MAX_AMOUNT:
        raise DecodeError(f"{key}: expected an amount", kind="schema")
    return float(value)


def validate_dict(obj: Any) -> None:
    """The rules of ``OrderPlaced`` + ``validate_order``, by hand on parsed JSON."""
    try:
        if type(obj) is not dict:
            raise DecodeError("expected an object", kind="schema")
        _text(obj, "order_id", 1, 64)
        _text(obj, "customer_id", 1, 64)
        currency = _text(obj, "currency", 3, 3)
        total = _amount(obj, "total")
        created_at = obj["created_at"]
        if not _is_number(created_at) or created_at < 0:
            raise DecodeError("created_at: expected a timestamp", kind="schema")
        version = obj.get("schema_version", schema.SCHEMA_VERSION)
        if type(version) is not int or version != schema.SCHEMA_VERSION:
            raise DecodeError("unsupported schema_version", kind="schema")
        items = obj["items"]
        if type(items) is not list or not 1 <= len(items) <= 100:
            raise DecodeError("items: expected 1..100 items", kind="schema")
        expected = 0
        for item in items:
            if type(item) is not dict:
                raise DecodeError("item: expected an object", kind="schema")
            _text(item, "sku", 1, 64)
            quantity = item["quantity"]
            if type(quantity) is not int or not 1 <= quantity <= 10_000:
                raise DecodeError("quantity: expected 1..10000", kind="schema")
            cents = schema.to_cents(_amount(item, "unit_price"))
            if cents is None:
                raise DecodeError("unit_price: sub-cent amount", kind="validation")
            expected += cents * quantity
    except KeyError as exc:
        raise DecodeError(f"missing field {exc}", kind="schema") from None
    if currency not in schema.CURRENCIES:
        raise DecodeError(f"unknown currency {currency!r}", kind="validation")
    if schema.to_cents(total) != expected:
        raise DecodeError("total != sum of items", kind="validation")


def _stdlib(raw: bytes) -> object:
    obj = json.loads(raw)
    validate_dict(obj)
    return obj


def _contenders() -> dict[str, Decode]:
    found: dict[str, Decode] = {"msgspec": schema.decode_order}
    try:
        import orjson
    except ImportError:
        pass
    else:

        def _orjson(raw: bytes) -> object:
            obj = orjson.loads(raw)
            validate_dict(obj)
            return obj

        found["orjson"] = _orjson
    with contextlib.suppress(ImportError):  # pydantic is optional here
        found["pydantic"] = _pydantic_decoder()
    found["json"] = _stdlib
    return found


def _pydantic_decoder() -> Decode:
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field, model_validator

    # strict: no "1" -> 1 or true -> 1 coercion, the same contract as the msgspec types
    class Item(BaseModel):
        model_config = ConfigDict(strict=True, frozen=True)
        sku: Annotated[str, Field(min_length=1, max_length=64)]
        quantity: Annotated[int, Field(ge=1, le=10_000)]
        unit_price: Annotated[float, Field(ge=0, le=schema.MAX_AMOUNT)]

    class Order(BaseModel):
        model_config = ConfigDict(strict=True, frozen=True)
        order_id: Annotated[str, Field(min_length=1, max_length=64)]
        customer_id: Annotated[str, Field(min_length=1, max_length=64)]
        items: Annotated[tuple[Item, ...], Field(min_length=1, max_length=100)]
        currency: Annotated[str, Field(min_length=3, max_length=3)]
        total: Annotated[float, Field(ge=0, le=schema.MAX_AMOUNT)]
        created_at: Annotated[float, Field(ge=0)]
        schema_version: int = schema.SCHEMA_VERSION

        @model_validator(mode="after")
        def _business_rules(self) -> Order:
            if self.schema_version != schema.SCHEMA_VERSION:
                raise ValueError("unsupported schema_version")
            if self.currency not in schema.CURRENCIES:
                raise ValueError("unknown currency")
            expected = 0
            for item in self.items:
                cents = schema.to_cents(item.unit_price)
                if cents is None:
                    raise ValueError("sub-cent unit_price")
                expected += cents * item.quantity
            if schema.to_cents(self.total) != expected:
                raise ValueError("total != sum of items")
            return self

    return Order.model_validate_json


def _rate(decode: Decode, raw: bytes, n: int) -> float:
    for _ in range(min(n, 1_000)):  # warm caches and lazy initialisation first
        decode(raw)
    start = time.perf_counter()
    for _ in range(n):
        decode(raw)
    return n / (time.perf_counter() - start)


def bench_decode(n: int = 50_000) -> dict[str, float]:
    """Orders per second that each available JSON stack decodes and validates."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    raw = sample_bytes()
    # a wrong total must be rejected by every contender, or it would be timing less work
    wrong = raw.replace(b'"total":405.47', b'"total":405.48')
    if wrong == raw:
        raise AssertionError("the sample no longer carries the total this check edits")
    contenders = _contenders()
    for name, decode in contenders.items():
        decode(raw)
        try:
            decode(wrong)
        except (DecodeError, ValueError):
            pass
        else:
            raise AssertionError(f"{name} accepted a wrong total")
    return {name: _rate(decode, raw, n) for name, decode in contenders.items()}
