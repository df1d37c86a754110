"""OrderMesh: Kafka-based order processing with real stock, tracking and a replayable DLQ.

The public surface of the top-level package: the one configuration object, the wire
types with their encoder and decoders, and the root of the error tree. Everything else is
reached through its package: ``ordermesh.services`` (the pure cores), ``ordermesh.api``,
``ordermesh.kafka``, ``ordermesh.stores``, ``ordermesh.broker``, ``ordermesh.bench``.
"""

from ordermesh.config import Settings
from ordermesh.errors import DecodeError, OrderMeshError
from ordermesh.schema import (
    CancelOrder,
    CancelRejected,
    ItemQty,
    OrderCancelled,
    OrderItem,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    StockReleased,
    decode_command,
    decode_event,
    decode_order,
    encode,
)

__version__ = "0.1.0"

__all__ = [
    "CancelOrder",
    "CancelRejected",
    "DecodeError",
    "ItemQty",
    "OrderCancelled",
    "OrderItem",
    "OrderMeshError",
    "OrderPlaced",
    "OrderRejected",
    "OrderReserved",
    "Settings",
    "StockReleased",
    "__version__",
    "decode_command",
    "decode_event",
    "decode_order",
    "encode",
]
