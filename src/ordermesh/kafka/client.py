"""librdkafka configuration and client factories, built from ``Settings``."""

from __future__ import annotations

import json
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from ordermesh.config import Settings

ClientConfig = dict[str, Any]


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
    return conf


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


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(common_config(settings))
