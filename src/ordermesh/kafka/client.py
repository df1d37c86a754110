"""librdkafka configuration and client factories, built from ``Settings``."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from ordermesh.config import Settings, read_client_properties
from ordermesh.errors import ConfigError, KafkaUnavailableError, OrderMeshError
from ordermesh.topology import Fetch

ClientConfig = dict[str, Any]

log = logging.getLogger(__name__)

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


# what OrderMesh's guarantees rest on: no layer of user properties may change these
PRODUCER_GUARDED: Final[Mapping[str, Any]] = {"enable.idempotence": True, "acks": "all"}
CONSUMER_GUARDED: Final = frozenset(
    {
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "group.protocol",
        "group.remote.assignor",
        "partition.assignment.strategy",
    }
)
_warned: set[str] = set()
_warned_lock = threading.Lock()


def _local_cluster(settings: Settings) -> dict[str, Any]:
    """What ``cluster.json`` of the local broker says (empty when there is none)."""
    state = settings.broker_dir() / "cluster.json"
    try:
        raw = json.loads(state.read_text())
    except (ValueError, OSError):
        return {}
    return raw if isinstance(raw, dict) else {}


def bootstrap_servers(settings: Settings) -> str:
    """The cluster to talk to: configured, else the local broker's recorded address."""
    if settings.bootstrap_servers:
        return settings.bootstrap_servers
    recorded = _local_cluster(settings).get("bootstrap_servers")
    if recorded:
        return str(recorded)
    return f"127.0.0.1:{settings.broker_port}"


def local_client_properties(settings: Settings, bootstrap: str) -> dict[str, str]:
    """The local cluster's client.properties when ``bootstrap`` is that cluster (a
    secured ``broker up`` writes them); empty otherwise."""
    state = _local_cluster(settings)
    path = state.get("client_config")
    if not path or state.get("bootstrap_servers") != bootstrap:
        return {}
    return read_client_properties(Path(path))


def settings_properties(settings: Settings) -> dict[str, str]:
    """The librdkafka properties of the security settings and ``client_id``."""
    props: dict[str, str] = {}
    if settings.security_protocol is not None:
        props["security.protocol"] = settings.security_protocol
    if settings.sasl_mechanism is not None:
        props["sasl.mechanism"] = settings.sasl_mechanism
    if settings.sasl_username:
        props["sasl.username"] = settings.sasl_username
    if settings.sasl_password is not None:
        props["sasl.password"] = settings.sasl_password.get_secret_value()
    if settings.ssl_ca_location is not None:
        props["ssl.ca.location"] = str(settings.ssl_ca_location)
    if settings.ssl_certificate_location is not None:
        props["ssl.certificate.location"] = str(settings.ssl_certificate_location)
    if settings.ssl_key_location is not None:
        props["ssl.key.location"] = str(settings.ssl_key_location)
    if settings.ssl_key_password is not None:
        props["ssl.key.password"] = settings.ssl_key_password.get_secret_value()
    if not settings.ssl_endpoint_identification:
        props["ssl.endpoint.identification.algorithm"] = "none"
    if settings.client_id:
        props["client.id"] = settings.client_id
    return props


def client_properties(settings: Settings) -> dict[str, str]:
    """Every user-given client property, merged in the order of ``ordermesh.config``'s
    docstring: local cluster < settings < ``ORDERMESH_KAFKA_*`` < ``--command-config``."""
    bootstrap = bootstrap_servers(settings)
    props = local_client_properties(settings, bootstrap)
    props.update(settings_properties(settings))
    props.update(settings.librdkafka_properties)
    props.update(settings.client_properties())
    if props.pop("bootstrap.servers", bootstrap) != bootstrap:
        _warn_once(
            "bootstrap.servers",
            "a bootstrap.servers property is ignored: the cluster is --bootstrap-server"
            " (ORDERMESH_BOOTSTRAP_SERVERS), else the local broker",
        )
    protocol = props.get("security.protocol", "PLAINTEXT").upper()
    if "sasl.username" in props and not protocol.startswith("SASL"):
        raise ConfigError(
            f"a SASL user is configured but security.protocol is {protocol}: set"
            " ORDERMESH_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT)"
        )
    return props


def common_config(settings: Settings) -> ClientConfig:
    """The settings every client shares: the cluster, how to connect, the logger."""
    conf: ClientConfig = {"bootstrap.servers": bootstrap_servers(settings)}
    conf.update(client_properties(settings))
    conf["logger"] = logging.getLogger(LIBRDKAFKA_LOGGER)
    return conf


def _warn_once(key: str, message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("%s", message)


def _guard(conf: ClientConfig, guarded: Mapping[str, Any]) -> None:
    """Set ``guarded`` in ``conf``, saying once when a user property wanted otherwise."""
    for key, value in guarded.items():
        if key in conf and str(conf[key]).lower() != str(value).lower():
            _warn_once(
                key,
                f"client property {key}={conf[key]} is ignored: OrderMesh's delivery"
                f" guarantees need {key}={value}",
            )
        conf[key] = value


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
        # a refused login or TLS handshake looks like an unreachable cluster from the
        # call that failed (a metadata timeout); a fresh client tells them apart
        return diagnose_connection(settings) or unreachable_error(settings, exc)
    if isinstance(exc, KafkaException) and exc.args:
        err = exc.args[0]
        if isinstance(err, KafkaError):
            refused = refusal_error(settings, err)
            if refused is not None:
                return refused
        return OrderMeshError(f"Kafka: {err.str() if isinstance(err, KafkaError) else err}")
    return None


# errors of the connection itself: the cluster answered but would not let us in
REFUSALS: Final = frozenset({KafkaError._AUTHENTICATION, KafkaError._SSL})
PROBE_TIMEOUT_S: Final = 3.0
_TIMING: Final = re.compile(r"\s*\(after \d+ms in state \w+\)$")


def refusal_error(settings: Settings, err: KafkaError) -> ConfigError | None:
    """One readable line for a refused login or TLS handshake (None for other errors).

    librdkafka's text names the broker, the mechanism and the reason, never a password.
    """
    if err.code() not in REFUSALS:
        return None
    try:
        props = client_properties(settings)
    except ConfigError:
        props = {}  # the refusal is the news, not how the settings read
    # "sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: ... (after 316ms
    # in state AUTH_REQ)" -> the reason
    reason = _TIMING.sub("", err.str().split(": ", 1)[-1])
    where = bootstrap_servers(settings)
    if err.code() == KafkaError._SSL:
        return ConfigError(f"TLS handshake with Kafka at {where} failed ({reason})")
    user = props.get("sasl.username")
    mechanism = props.get("sasl.mechanism", "GSSAPI")
    who = f"for user {user} " if user else ""
    return ConfigError(
        f"Kafka at {where} refused the credentials {who}(SASL {mechanism}: {reason})"
    )


def diagnose_connection(settings: Settings) -> ConfigError | None:
    """Why a secured connection fails when the cluster refuses it (bad credentials, an
    untrusted certificate); None when it works or is simply unreachable."""
    try:
        props = client_properties(settings)
    except ConfigError as exc:
        return exc
    protocol = props.get("security.protocol", "PLAINTEXT").upper()
    if protocol == "PLAINTEXT":
        return None  # nothing to refuse: only the network can be in the way
    seen: list[KafkaError] = []
    conf: ClientConfig = {
        "bootstrap.servers": bootstrap_servers(settings),
        **props,
        "error_cb": seen.append,
        "logger": logging.getLogger(LIBRDKAFKA_LOGGER),
    }
    try:
        admin = AdminClient(conf)
    except KafkaException:
        return None
    end = time.monotonic() + PROBE_TIMEOUT_S
    while time.monotonic() < end:
        try:
            admin.list_topics(timeout=0.5)
            return None  # it works (now)
        except KafkaException:
            pass
        admin.poll(0)  # serves the error callbacks
        for err in seen:
            refused = refusal_error(settings, err)
            if refused is not None:
                return refused
        if seen:
            return None  # another failure: the network's
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
    """OrderMesh's producer: tuned defaults (user properties may change them), then the
    guarded properties (they may not), then the caller's ``overrides``."""
    conf: ClientConfig = {
        # measured: 1 ms (fewer records per request) costs the broker more CPU than it
        # saves in waiting, and at 5,000 orders/s on 2 cores the tail latency doubles
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 500_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "compression.type": "lz4",
        "message.max.bytes": 2_000_000,
    }
    conf.update(common_config(settings))
    # idempotence implies acks=all and bounded in-flight; set acks anyway for clarity
    _guard(conf, PRODUCER_GUARDED)
    conf.update(overrides)
    return conf


def group_protocol_config(settings: Settings) -> dict[str, Any]:
    """The group protocol of ``settings.group_protocol`` and its assignor.

    Both assign with ``range``: it spreads every topic over the members, and since every
    member reads both ``orders`` and ``order-commands``, which have as many partitions,
    partition i of both goes to the same member (an order and its cancel meet in one
    instance). The default assignors may give one instance all of ``orders`` and the
    other only the idle ``order-commands``.
    """
    if settings.group_protocol == "classic":
        # the consumers assign, eagerly: every member gives up all of its partitions
        # (on_revoke) and gets its new share (on_assign) at each rebalance
        return {"group.protocol": "classic", "partition.assignment.strategy": "range"}
    # KIP-848 (Kafka 4): the broker assigns partitions incrementally; no stop-the-world
    # rebalance when an instance joins or leaves
    return {"group.protocol": "consumer", "group.remote.assignor": "range"}


def consumer_config(
    settings: Settings, group: str, *, fetch: Fetch | None = None, **overrides: Any
) -> ClientConfig:
    """OrderMesh's consumer: tuned defaults (user properties may change them), then the
    guarded properties (they may not), then the caller's ``overrides``.

    ``fetch``: how long the broker may hold a fetch (a service's ``ServiceSpec.fetch``);
    without it, a fetch is answered at its first byte (tools reading once).
    """
    conf: ClientConfig = {
        "auto.offset.reset": "earliest",
        "max.poll.interval.ms": 120_000,
        "fetch.min.bytes": 1,
        "queued.max.messages.kbytes": 262_144,
        "enable.partition.eof": False,
    }
    if fetch is not None:
        conf["fetch.min.bytes"] = fetch.min_bytes
        conf["fetch.wait.max.ms"] = fetch.max_wait_ms
    if settings.group_protocol == "classic":
        # a classic member's session is the client's to set (KIP-848's is the broker's):
        # the local broker's 10 s, so a killed instance's partitions move on as soon
        conf.update({"session.timeout.ms": 10_000, "heartbeat.interval.ms": 2_000})
    conf.update(common_config(settings))
    guarded = {
        "group.id": settings.group(group),
        # offsets are committed by the runner only after effects are durable
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        **group_protocol_config(settings),
    }
    for key in CONSUMER_GUARDED - guarded.keys():
        # the other group protocol's assignor: librdkafka refuses it with this one
        if conf.pop(key, None) is not None:
            _warn_once(
                key,
                f"client property {key} is ignored with group.protocol="
                f"{settings.group_protocol} (ORDERMESH_GROUP_PROTOCOL)",
            )
    _guard(conf, guarded)
    conf.update(overrides)
    return conf


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_consumer(
    settings: Settings, group: str, *, fetch: Fetch | None = None, **overrides: Any
) -> Consumer:
    return Consumer(consumer_config(settings, group, fetch=fetch, **overrides))


def make_plain_producer(settings: Settings, **overrides: Any) -> Producer:
    """A producer with the client defaults only (no idempotence, no batching tuned): how
    a foreign client writes, for tools that imitate one."""
    conf = common_config(settings)
    conf.update(overrides)
    return Producer(conf)


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(common_config(settings))
