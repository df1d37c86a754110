"""The one settings object, read from ``ORDERMESH_*`` env vars and CLI flags.

Kafka client properties come in layers, each overriding the one before (the merge is
``kafka.client.common_config``):

1. the local cluster's ``client.properties``, when the local broker is the cluster used
   (``broker up --security scram-tls`` writes it);
2. the settings below: ``security_protocol``, ``sasl_*``, ``ssl_*``, ``client_id``;
3. ``ORDERMESH_KAFKA_<PROPERTY>`` env vars, any librdkafka property: the name upper-cased,
   every ``.`` written ``_`` and a ``_`` of the property's own written ``__``
   (``ORDERMESH_KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM=none`` is
   ``ssl.endpoint.identification.algorithm=none``); ``ORDERMESH_KAFKA_CACHE_DIR`` and
   ``ORDERMESH_KAFKA_VERSION`` are OrderMesh's own settings, not properties;
4. the ``--command-config`` file (``ORDERMESH_COMMAND_CONFIG``).

``bootstrap.servers`` is not a property of any layer: it is ``--bootstrap-server``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ordermesh.errors import ConfigError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]
# ``consumer``: KIP-848, the broker assigns (Kafka 4); ``classic``: the consumers do
GroupProtocol = Literal["consumer", "classic"]

KAFKA_ENV_PREFIX: Final = "ORDERMESH_KAFKA_"
# property names whose values are secrets: shown as "**********" wherever settings are
SENSITIVE_FRAGMENTS: Final = (
    "password",
    "secret",
    "key.pem",
    "jaas",
    "token",
    "oauthbearer.config",
    "credential",
)

KAFKA_VERSION = "4.3.1"


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "ordermesh"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "ordermesh"


def read_client_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a Java-style properties file (``#``/``!`` comments)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--command-config {path}: {exc.strerror or exc}") from None
    props: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        sep = min((i for i in (line.find("="), line.find(":")) if i > 0), default=-1)
        if sep < 0:
            raise ConfigError(f"--command-config {path}:{number}: expected key=value")
        props[line[:sep].strip()] = line[sep + 1 :].strip()
    return props


def property_from_env(name: str) -> str | None:
    """The librdkafka property an ``ORDERMESH_KAFKA_*`` variable sets (None: not one)."""
    if not name.upper().startswith(KAFKA_ENV_PREFIX):
        return None
    rest = name[len(KAFKA_ENV_PREFIX) :].lower()
    if not rest or f"kafka_{rest}" in Settings.model_fields:
        return None  # ORDERMESH_KAFKA_CACHE_DIR and the like are settings
    return "_".join(part.replace("_", ".") for part in rest.split("__"))


def env_for_property(prop: str) -> str:
    """The ``ORDERMESH_KAFKA_*`` variable that sets librdkafka property ``prop``."""
    return KAFKA_ENV_PREFIX + prop.replace("_", "__").replace(".", "_").upper()


def is_sensitive(prop: str) -> bool:
    """Whether the value of librdkafka property ``prop`` is a secret."""
    name = prop.lower()
    return any(fragment in name for fragment in SENSITIVE_FRAGMENTS)


def redacted(props: Mapping[str, Any]) -> dict[str, Any]:
    """``props`` with the values of secret properties hidden: the only way to show them."""
    return {k: "**********" if is_sensitive(k) else v for k, v in props.items()}


class _KafkaEnvSource(PydanticBaseSettingsSource):
    """``ORDERMESH_KAFKA_<PROPERTY>`` variables as ``librdkafka_properties``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole environment

    def __call__(self) -> dict[str, Any]:
        found = {
            prop: value
            for name, value in os.environ.items()
            if (prop := property_from_env(name)) is not None
        }
        return {"librdkafka_properties": found} if found else {}


class Settings(BaseSettings):
    """Everything configurable; built once at the entry point and passed down."""

    model_config = SettingsConfigDict(env_prefix="ORDERMESH_", frozen=True, extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # earlier sources win; dicts merge (a librdkafka_properties=... argument adds to
        # the ORDERMESH_KAFKA_* variables and wins where both name a property)
        return (
            init_settings,
            env_settings,
            _KafkaEnvSource(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    # Kafka: when set, this cluster is used and nothing is started locally.
    bootstrap_servers: str | None = None
    # None: librdkafka's default (PLAINTEXT), or what the local cluster's
    # client.properties says when the local broker is used
    security_protocol: SecurityProtocol | None = None
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # TLS: the CA that signed the brokers' certificates (PEM; None: the system's), and a
    # client certificate with its key for clusters that require one (mutual TLS)
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None
    # check that the broker's certificate names the host connected to (False only for
    # test clusters whose certificates do not)
    ssl_endpoint_identification: bool = True
    # how the cluster's logs, quotas and ACL audit name this client
    client_id: str | None = None
    # Extra librdkafka properties in the ``client.properties`` format of Kafka's own
    # tools (``--command-config``): how SASL/TLS settings are usually passed.
    command_config: Path | None = None
    # any librdkafka property, from ORDERMESH_KAFKA_<PROPERTY> variables (module docstring)
    librdkafka_properties: dict[str, str] = Field(default_factory=dict, repr=False)
    group_protocol: GroupProtocol = "consumer"

    # Topics (``topics ensure``): partitions of orders, order-commands and order-events
    # (orders-dlq gets min(3, this)); retention of every topic, None: the cluster's default
    topic_partitions: int = Field(default=6, ge=1)
    topic_retention_ms: int | None = Field(default=None, ge=-1)

    # Local broker
    data_dir: Path = Field(default_factory=_default_data_dir)
    kafka_cache_dir: Path | None = None
    kafka_version: str = KAFKA_VERSION
    broker_port: int = 9092
    broker_heap_mb: int = 1024

    # Topic and consumer-group names get this prefix (tests use a unique one each).
    topic_prefix: str = ""

    # Where the services keep their state: None or ``sqlite:`` for SQLite files under the
    # data dir (or at the *_db paths below); ``stores/factory.py`` reads it
    database_url: str | None = None

    # Local PostgreSQL (`ordermesh db up`, `ordermesh up --db postgres`): its port when it
    # is first created (0: any free port; an existing server keeps its port), and where
    # initdb/pg_ctl are (None: on PATH, else the newest /usr/lib/postgresql/*/bin)
    postgres_port: int = 0
    postgres_bin_dir: Path | None = None

    # Services
    inventory_db: Path | None = None
    tracker_db: Path | None = None
    batch_max: int = 5000
    batch_timeout_s: float = 0.05
    dlq_max_replays: int = 3
    # Prometheus /metrics of a service process; None: not served, 0: any free port
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    # HTTP API: its own small DB (idempotency keys); comma-separated keys that every
    # /orders endpoint requires when set: each key is one client, which sees only the
    # orders it placed. An operator key (also comma-separated) sees every order, the load
    # generator's too.
    api_db: Path | None = None
    api_keys: SecretStr | None = None
    api_operator_keys: SecretStr | None = None

    # An order's life (lifecycle.py). A reservation holds this long for its payment; past
    # it, the inventory's sweep expires it and the stock goes back on the shelf.
    reservation_ttl_s: float = Field(default=900.0, gt=0)
    # how often the inventory looks for reservations past their deadline and due restocks
    sweep_every_s: float = Field(default=1.0, gt=0)
    # Supply: a sku whose available units fall below ``reorder_point`` is reordered,
    # ``reorder_quantity`` units arriving ``supplier_delay_s`` later (0 points: never)
    reorder_point: int = Field(default=20_000, ge=0)
    reorder_quantity: int = Field(default=100_000, ge=1)
    supplier_delay_s: float = Field(default=30.0, ge=0)

    # Payment gateway (``ordermesh gateway``, or a real provider's adapter): where the
    # payments service reaches it; None: the local one on ``gateway_port``
    gateway_url: str | None = None
    gateway_port: int = 8070
    gateway_db: Path | None = None
    # the local gateway's faults from its start (docs/payments.md; POST /admin/faults
    # changes them while it runs): latency p50/p99 (0/0: none), the share of calls
    # declined / answered 503 / held ``gateway_hang_s`` / applied with the reply lost,
    # comma-separated customer ids that always decline, and the seed of the draws
    gateway_latency_p50_ms: float = Field(default=0.0, ge=0)
    gateway_latency_p99_ms: float = Field(default=0.0, ge=0)
    gateway_decline_rate: float = Field(default=0.0, ge=0, le=1)
    gateway_decline_customers: str = ""
    gateway_error_rate: float = Field(default=0.0, ge=0, le=1)
    gateway_timeout_rate: float = Field(default=0.0, ge=0, le=1)
    gateway_lost_response_rate: float = Field(default=0.0, ge=0, le=1)
    gateway_hang_s: float = Field(default=300.0, gt=0)
    gateway_seed: int | None = None
    # operations payments sends per request to the gateway (1: a request each)
    gateway_batch_max: int = Field(default=100, ge=1, le=1000)
    # Payments: its own DB; gateway calls in flight at once per instance; how long one
    # call may take before its outcome counts as unknown (then looked up by its key)
    payments_db: Path | None = None
    # gateway operations in flight per payments instance (batched or not)
    payments_concurrency: int = Field(default=4096, ge=1)
    payments_timeout_s: float = Field(default=5.0, gt=0)
    # Fulfilment: its own DB; the simulated pick-and-pack time of a paid order
    fulfilment_db: Path | None = None
    fulfilment_delay_s: float = Field(default=0.5, ge=0)
    # Analytics: the DLQ alert fires when the last 60 s's dead letters exceed this share
    # of that minute's ``orders`` records (a load with 1 % malformed orders is no incident)
    analytics_dlq_alert_ratio: float = Field(default=0.05, ge=0)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        yield from super().__repr_args__()
        yield "librdkafka_properties", redacted(self.librdkafka_properties)

    def as_env(self) -> dict[str, str]:
        """The ``ORDERMESH_*`` environment that rebuilds these settings in a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None or name == "librdkafka_properties":
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"ORDERMESH_{name.upper()}"] = str(value)
        for prop, value in self.librdkafka_properties.items():
            env[env_for_property(prop)] = value
        return env

    def client_properties(self) -> dict[str, str]:
        """The properties of ``command_config`` (empty when unset)."""
        if self.command_config is None:
            return {}
        return read_client_properties(self.command_config)

    def kafka_jar_dir(self) -> Path:
        """Where the Kafka jars of ``kafka_version`` are cached."""
        base = self.kafka_cache_dir or _default_cache_dir()
        return base / f"kafka-{self.kafka_version}"

    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def inventory_db_path(self) -> Path:
        return self.inventory_db or self.data_dir / "inventory.db"

    def tracker_db_path(self) -> Path:
        return self.tracker_db or self.data_dir / "tracker.db"

    def api_db_path(self) -> Path:
        return self.api_db or self.data_dir / "api.db"

    def gateway_db_path(self) -> Path:
        return self.gateway_db or self.data_dir / "gateway.db"

    def payments_db_path(self) -> Path:
        return self.payments_db or self.data_dir / "payments.db"

    def fulfilment_db_path(self) -> Path:
        return self.fulfilment_db or self.data_dir / "fulfilment.db"

    def gateway_base_url(self) -> str:
        """The payment gateway's base URL: ``gateway_url``, or the local gateway's."""
        return self.gateway_url or f"http://127.0.0.1:{self.gateway_port}"

    def api_key_set(self) -> frozenset[str]:
        """The configured API keys (empty: no authentication)."""
        if self.api_keys is None:
            return frozenset()
        keys = self.api_keys.get_secret_value().split(",")
        return frozenset(key.strip() for key in keys if key.strip())

    def api_operator_key_set(self) -> frozenset[str]:
        """The configured operator keys of the API (they see every order)."""
        if self.api_operator_keys is None:
            return frozenset()
        keys = self.api_operator_keys.get_secret_value().split(",")
        return frozenset(key.strip() for key in keys if key.strip())
