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
    ├── CommitError              consumed offsets could not be committed
    │   └── AckDeadlineError     a stop's deadline passed with acknowledgements outstanding
    ├── StoreError               a database operation failed
    │   └── StoreConflictError   a concurrent transaction won a lock or a row; retry the batch
    ├── GatewayError             a payment gateway call gave no outcome
    │   ├── GatewayUnavailableError    not applied (5xx, refused): retry, same key
    │   └── GatewayUnknownOutcomeError no answer (timeout, lost reply): look the key up
    └── VerificationError        `ordermesh verify` found a broken invariant
"""

from __future__ import annotations

from typing import Literal

# What kind of input a DecodeError rejected (``DecodeError.<kind>`` in DLQ headers):
# ``json`` not JSON, ``utf8`` not UTF-8, ``schema`` wrong shape or empty, ``validation``
# well-formed but invalid (currency, totals), ``size`` over the message size limit.
DecodeKind = Literal["json", "utf8", "schema", "validation", "size"]


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
    ``kind`` is a short machine-readable class of the failure (``DecodeKind``).
    """

    def __init__(
        self, message: str, raw: bytes | None = None, kind: DecodeKind = "validation"
    ) -> None:
        super().__init__(message)
        self.raw = raw
        self.kind: DecodeKind = kind


class DeliveryError(OrderMeshError):
    """Kafka did not acknowledge a produced record."""


class CommitError(OrderMeshError):
    """Consumed offsets could not be committed (the batch will be redelivered)."""


class AckDeadlineError(CommitError):
    """A stop's deadline passed with acknowledgements outstanding: what they cover is
    not committed, and the next run redoes it."""


class StoreError(OrderMeshError):
    """A database operation failed."""


class StoreConflictError(StoreError):
    """A transaction lost to a concurrent one (deadlock, serialization failure, a row
    another instance stored first) and was rolled back; running it again from scratch,
    re-reading everything, is expected to succeed."""


class GatewayError(OrderMeshError):
    """A payment gateway call that did not produce an outcome."""


class GatewayUnavailableError(GatewayError):
    """The call was not applied (5xx, connection refused): retry later, same key."""


class GatewayUnknownOutcomeError(GatewayError):
    """No answer came: the call may have been applied. Look the key up before retrying."""


class VerificationError(OrderMeshError):
    """An invariant checked by ``ordermesh verify`` does not hold."""
