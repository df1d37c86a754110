"""Request and response bodies of the HTTP API that are not wire types.

An order request is an ``OrderPlaced`` without the fields the server sets
(``SERVER_FIELDS``): its rules are those of ``schema.OrderPlaced`` and
``schema.validate_order``, never restated here.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from ordermesh import schema
from ordermesh.stores.tracker import OrderStatus

# api_client: the client whose key placed it (``api/access.py``), never the body's say
SERVER_FIELDS: Final = ("order_id", "created_at", "schema_version", "api_client")
REQUEST_FIELDS: Final = tuple(
    name for name in schema.OrderPlaced.__struct_fields__ if name not in SERVER_FIELDS
)
# one limit for the HTTP body and the CancelOrder it becomes on Kafka
MAX_CANCEL_REASON: Final = schema.MAX_CANCEL_REASON


class OrderAccepted(msgspec.Struct, frozen=True):
    """Kafka acknowledged the order; its decision follows (``GET /orders/{id}?wait=``)."""

    order_id: str
    status: Literal["PLACED"] = "PLACED"


class CancelRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Optional body of ``POST /orders/{id}/cancel``."""

    reason: Annotated[str, Meta(max_length=MAX_CANCEL_REASON)] = ""


class CancelAccepted(msgspec.Struct, frozen=True):
    """The answer to a cancel that can apply. ``REQUESTED``: Kafka acknowledged the
    ``CancelOrder`` of an order in ``status`` (RESERVED or PAID); it turns CANCELLED
    once the inventory applied it, or stays as it is if the order shipped or ended
    first (a ``CancelRejected`` in its history says why). ``ALREADY_CANCELLED``: the order
    is CANCELLED; nothing was sent (a repeated cancel is answered, not refused)."""

    order_id: str
    status: OrderStatus
    cancel: Literal["REQUESTED", "ALREADY_CANCELLED"] = "REQUESTED"
