"""The one settings object, read from ``ORDERMESH_*`` env vars and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ordermesh.errors import ConfigError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]

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


class Settings(BaseSettings):
    """Everything configurable; built once at the entry point and passed down."""

    model_config = SettingsConfigDict(env_prefix="ORDERMESH_", frozen=True, extra="ignore")

    # Kafka: when set, this cluster is used and nothing is started locally.
    bootstrap_servers: str | None = None
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # Extra librdkafka properties in the ``client.properties`` format of Kafka's own
    # tools (``--command-config``): how SASL/TLS settings are usually passed.
    command_config: Path | None = None

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

    # HTTP API: its own small DB (idempotency keys); comma-separated keys that POST
    # endpoints require when set
    api_db: Path | None = None
    api_keys: SecretStr | None = None

    def as_env(self) -> dict[str, str]:
        """The ``ORDERMESH_*`` environment that rebuilds these settings in a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"ORDERMESH_{name.upper()}"] = str(value)
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

    def api_key_set(self) -> frozenset[str]:
        """The configured API keys (empty: no authentication)."""
        if self.api_keys is None:
            return frozenset()
        keys = self.api_keys.get_secret_value().split(",")
        return frozenset(key.strip() for key in keys if key.strip())
