"""The naive baseline of ``ordermesh bench inventory``: stdlib ``json``, one message a poll.

The original design parsed every order with the stdlib ``json`` module and committed each
message on its own. The one-message-per-poll half is a runner setting (``batch_max=1``,
not pipelined); the stdlib half lives here, so the production core has no decoder knob:

- ``decode_order_stdlib`` is ``schema.decode_order`` with the stdlib parser: same rules,
  same errors, the same messages accepted;
- ``StdlibDecoding`` wraps the unchanged ``InventoryService`` as the runner's handler and
  parses every order of a batch with ``decode_order_stdlib`` before handing the batch on.
  The core then decodes it once more with msgspec, a few microseconds per order next to
  the per-message transaction and synchronous commit, so the baseline is at most that
  much slower than the original design, never faster.
"""

from __future__ import annotations

import contextlib
import json

import msgspec

from ordermesh import schema
from ordermesh.errors import DecodeError
from ordermesh.records import InRecord, OutRecord
from ordermesh.services.inventory import InventoryService


def decode_order_stdlib(raw: bytes | None) -> schema.OrderPlaced:
    """``schema.decode_order`` parsing with the stdlib ``json`` module.

    Same rules and errors; only the JSON parser differs (msgspec still converts/validates
    the parsed object, so both paths accept exactly the same messages).
    """
    if raw is None:
        raise DecodeError("empty message value", raw=raw, kind="schema")
    if len(raw) > schema.MAX_MESSAGE_BYTES:
        raise DecodeError(
            f"message of {len(raw)} bytes exceeds {schema.MAX_MESSAGE_BYTES}", raw=raw, kind="size"
        )
    try:
        obj = json.loads(raw.decode("utf-8"))
        order = msgspec.convert(obj, schema.OrderPlaced)
    except UnicodeDecodeError as exc:
        raise DecodeError(f"bad order: invalid UTF-8: {exc}", raw=raw, kind="utf8") from None
    except msgspec.ValidationError as exc:
        raise DecodeError(f"bad order: schema violation: {exc}", raw=raw, kind="schema") from None
    except Exception as exc:  # noqa: BLE001 - json raises ValueError, RecursionError, ...
        raise DecodeError(f"bad order: not valid JSON: {exc}", raw=raw, kind="json") from None
    try:
        schema.validate_order(order)
    except DecodeError as exc:
        exc.raw = raw
        raise
    return order


class StdlibDecoding:
    """A batch handler: parse each order with the stdlib, then run the inventory core."""

    def __init__(self, service: InventoryService) -> None:
        self.service = service

    def handle(self, batch: list[InRecord]) -> list[OutRecord]:
        orders_topic = self.service.orders_topic
        for record in batch:
            if record.topic == orders_topic:
                # a rejected order is dead-lettered by the core: both decoders reject it
                with contextlib.suppress(DecodeError):
                    decode_order_stdlib(record.value)
        return self.service.handle(batch)
