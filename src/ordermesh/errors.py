"""The one exception tree of OrderMesh.

::

    OrderMeshError
    ├── ConfigError              bad settings or environment
    ├── BrokerError              the local Kafka broker could not be fetched, started or stopped
    │   └── JarFetchError        Maven could not fetch the Kafka jars
    ├── KafkaUnavailableError    the Kafka cluster cannot be reached (CLI exit code 3)
    ├── TopicError               a topic exists with another shape, or could not be created
    ├── DecodeError              a message could not be decoded or failed validation
    │                            (keeps the raw bytes so the DLQ can forward them unchanged)
    ├── DeliveryError            Kafka did not acknowledge a produced record
    ├── StoreError               a database operation failed
    └── VerificationError        `ordermesh verify` found a broken invariant
"""

from __future__ import annotations


class OrderMeshError(Exception):
    """Root of every error OrderMesh raises on purpose."""


class ConfigError(OrderMeshError):
    """Settings or environment are not usable."""


class BrokerError(OrderMeshError):
    """The local Kafka broker could not be fetched, started or stopped."""


class JarFetchError(BrokerError):
    """Maven could not fetch the Kafka jars."""


class KafkaUnavailableError(OrderMeshError):
    """The Kafka cluster cannot be reached: nothing listens, DNS fails, or it times out."""


class TopicError(OrderMeshError):
    """A topic exists with another shape than its spec, or could not be created."""


class DecodeError(OrderMeshError):
    """A message could not be decoded or failed validation.

    ``raw`` keeps the original bytes so a dead-letter record can carry them unchanged.
    ``kind`` is a short machine-readable class of the failure (``json``, ``utf8``,
    ``schema``, ``validation``, ``size``).
    """

    def __init__(self, message: str, raw: bytes | None = None, kind: str = "validation") -> None:
        super().__init__(message)
        self.raw = raw
        self.kind = kind


class DeliveryError(OrderMeshError):
    """Kafka did not acknowledge a produced record."""


class StoreError(OrderMeshError):
    """A database operation failed."""


class VerificationError(OrderMeshError):
    """An invariant checked by ``ordermesh verify`` does not hold."""
