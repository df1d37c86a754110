"""librdkafka configuration and client factories, built from ``Settings``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from ordermesh.config import Settings
from ordermesh.errors import KafkaUnavailableError, OrderMeshError

ClientConfig = dict[str, Any]

# librdkafka's own log lines ("%3|...|FAIL|...") go through Python logging under this
# name; the CLI keeps it quiet unless -v is given.
LIBRDKAFKA_LOGGER = "ordermesh.librdkafka"

# errors that mean "the cluster is not there (yet)", as opposed to a refusal by it
UNREACHABLE = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._MSG_TIMED_OUT,
    }
)


def bootstrap_servers(settings: Settings) -> str:
    """The cluster to talk to: configured, else the local broker's recorded address."""
    if settings.bootstrap_servers:
        return settings.bootstrap_servers
    state = settings.broker_dir() / "cluster.json"
    if state.exists():
        try:
            return str(json.loads(state.read_text())["bootstrap_servers"])
        except (ValueError, KeyError, OSError):
            pass
    return f"127.0.0.1:{settings.broker_port}"


def common_config(settings: Settings) -> ClientConfig:
    conf: ClientConfig = {
        "bootstrap.servers": bootstrap_servers(settings),
        "security.protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        conf["sasl.mechanism"] = settings.sasl_mechanism
    if settings.sasl_username:
        conf["sasl.username"] = settings.sasl_username
    if settings.sasl_password is not None:
        conf["sasl.password"] = settings.sasl_password.get_secret_value()
    conf.update(settings.client_properties())
    conf["logger"] = logging.getLogger(LIBRDKAFKA_LOGGER)
    return conf


@contextmanager
def kafka_errors(settings: Settings) -> Iterator[None]:
    """Raise client errors inside the block as OrderMeshError (KafkaUnavailableError...)."""
    try:
        yield
    except KafkaException as exc:
        known = as_ordermesh_error(settings, exc)
        raise (known or OrderMeshError(str(exc))) from exc


def as_ordermesh_error(settings: Settings, exc: BaseException) -> OrderMeshError | None:
    """A client error as one of ours (None when ``exc`` is not a Kafka client error)."""
    if is_unreachable(exc):
        return unreachable_error(settings, exc)
    if isinstance(exc, KafkaException) and exc.args:
        err = exc.args[0]
        return OrderMeshError(f"Kafka: {err.str() if isinstance(err, KafkaError) else err}")
    return None


def is_unreachable(exc: BaseException) -> bool:
    """True for a KafkaException that says the cluster could not be reached."""
    if not isinstance(exc, KafkaException) or not exc.args:
        return False
    err = exc.args[0]
    return isinstance(err, KafkaError) and err.code() in UNREACHABLE


def unreachable_error(settings: Settings, exc: BaseException) -> KafkaUnavailableError:
    """One readable line for an unreachable cluster."""
    reason = exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else str(exc)
    return KafkaUnavailableError(f"cannot reach Kafka at {bootstrap_servers(settings)} ({reason})")


def producer_config(settings: Settings, **overrides: Any) -> ClientConfig:
    conf = common_config(settings)
    conf.update(
        {
            # idempotence implies acks=all and bounded in-flight; set acks anyway for clarity
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 500_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "compression.type": "lz4",
            "message.max.bytes": 2_000_000,
        }
    )
    conf.update(overrides)
    return conf


def consumer_config(settings: Settings, group: str, **overrides: Any) -> ClientConfig:
    conf = common_config(settings)
    conf.update(
        {
            "group.id": settings.group(group),
            # offsets are committed by the runner only after effects are durable
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # KIP-848 group protocol (Kafka 4): the broker assigns partitions
            # incrementally; no stop-the-world rebalance when an instance joins or leaves
            "group.protocol": "consumer",
            # range spreads every topic over the members; the default (uniform) may give
            # one instance all of `orders` and the other only the idle `order-commands`
            "group.remote.assignor": "range",
            "max.poll.interval.ms": 120_000,
            "fetch.min.bytes": 1,
            "queued.max.messages.kbytes": 262_144,
            "enable.partition.eof": False,
        }
    )
    conf.update(overrides)
    return conf


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_consumer(settings: Settings, group: str, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(settings, group, **overrides))


def make_plain_producer(settings: Settings, **overrides: Any) -> Producer:
    """A producer with the client defaults only (no idempotence, no batching tuned): how
    a foreign client writes, for tools that imitate one."""
    conf = common_config(settings)
    conf.update(overrides)
    return Producer(conf)


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(common_config(settings))
