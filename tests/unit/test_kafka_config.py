"""Kafka client settings: the layers of properties, the group protocols, the secrets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException

from ordermesh.config import Settings, env_for_property, property_from_env
from ordermesh.errors import ConfigError, KafkaUnavailableError
from ordermesh.kafka.client import (
    LIBRDKAFKA_LOGGER,
    as_ordermesh_error,
    common_config,
    consumer_config,
    kafka_errors,
    make_admin,
    producer_config,
)
from ordermesh.topology import OFF_PATH, ORDER_PATH, service

PASSWORD = "pa55-w0rd-that-must-never-show"


@pytest.fixture(autouse=True)
def _no_kafka_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests set the ORDERMESH_KAFKA_* variables they need, nothing else leaks in."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("ORDERMESH_"):
            monkeypatch.delenv(name)


def test_kafka_env_variables_name_librdkafka_properties() -> None:
    assert property_from_env("ORDERMESH_KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM") == (
        "ssl.endpoint.identification.algorithm"
    )
    assert property_from_env("ORDERMESH_KAFKA_SASL_OAUTHBEARER_CLIENT_ID") == (
        "sasl.oauthbearer.client.id"
    )
    # a double underscore is an underscore of the property's own name
    assert property_from_env("ORDERMESH_KAFKA_SOME__NAME_X") == "some_name.x"
    assert env_for_property("some_name.x") == "ORDERMESH_KAFKA_SOME__NAME_X"
    # OrderMesh's own settings that share the prefix are not properties
    assert property_from_env("ORDERMESH_KAFKA_CACHE_DIR") is None
    assert property_from_env("ORDERMESH_KAFKA_VERSION") is None
    assert property_from_env("ORDERMESH_BATCH_MAX") is None


def test_kafka_env_properties_reach_the_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERMESH_KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM", "none")
    monkeypatch.setenv("ORDERMESH_KAFKA_LINGER_MS", "50")
    monkeypatch.setenv("ORDERMESH_KAFKA_CACHE_DIR", "/tmp/jars")
    settings = Settings(bootstrap_servers="h:9")
    assert settings.kafka_cache_dir == Path("/tmp/jars")
    conf = producer_config(settings)
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert conf["linger.ms"] == "50"  # a tuned default a user may change
    assert "cache.dir" not in conf


def test_layers_settings_then_env_then_command_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the local cluster's client.properties is the lowest layer, for the local broker only
    broker = tmp_path / "data" / "broker"
    broker.mkdir(parents=True)
    local = tmp_path / "local.properties"
    local.write_text("security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\nclient.id=l\n")
    (broker / "cluster.json").write_text(
        json.dumps({"bootstrap_servers": "127.0.0.1:9", "client_config": str(local)})
    )
    command = tmp_path / "client.properties"
    command.write_text("client.id=from-file\nbootstrap.servers=elsewhere:1\n")
    monkeypatch.setenv("ORDERMESH_KAFKA_CLIENT_ID", "from-env")
    monkeypatch.setenv("ORDERMESH_KAFKA_SASL_USERNAME", "env-user")

    settings = Settings(data_dir=tmp_path / "data", client_id="from-settings", sasl_username="u")
    conf = common_config(settings)
    assert conf["bootstrap.servers"] == "127.0.0.1:9"
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["client.id"] == "from-env" and conf["sasl.username"] == "env-user"

    with_file = settings.model_copy(update={"command_config": command})
    conf = common_config(with_file)
    assert conf["client.id"] == "from-file"
    assert conf["bootstrap.servers"] == "127.0.0.1:9"  # the cluster is never a property

    # another cluster: the local broker's properties do not apply
    monkeypatch.delenv("ORDERMESH_KAFKA_SASL_USERNAME")
    other = Settings(data_dir=tmp_path / "data", bootstrap_servers="kafka.example:9092")
    assert "security.protocol" not in common_config(other)


def test_security_settings_as_properties(tmp_path: Path) -> None:
    settings = Settings(
        bootstrap_servers="h:9",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="alice",
        sasl_password=PASSWORD,
        ssl_ca_location=tmp_path / "ca.pem",
        ssl_certificate_location=tmp_path / "client.pem",
        ssl_key_location=tmp_path / "client.key",
        ssl_key_password="keypw",
        ssl_endpoint_identification=False,
        client_id="mesh-1",
    )
    conf = common_config(settings)
    assert {k: v for k, v in conf.items() if k != "logger"} == {
        "bootstrap.servers": "h:9",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "alice",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(tmp_path / "ca.pem"),
        "ssl.certificate.location": str(tmp_path / "client.pem"),
        "ssl.key.location": str(tmp_path / "client.key"),
        "ssl.key.password": "keypw",
        "ssl.endpoint.identification.algorithm": "none",
        "client.id": "mesh-1",
    }
    assert "security.protocol" not in common_config(Settings(bootstrap_servers="h:9"))


def test_sasl_credentials_without_a_sasl_protocol_are_refused() -> None:
    settings = Settings(bootstrap_servers="h:9", sasl_username="alice", sasl_password="x")
    with pytest.raises(ConfigError, match="ORDERMESH_SECURITY_PROTOCOL=SASL_SSL"):
        common_config(settings)


def test_group_protocols_map_to_their_own_assignor_properties() -> None:
    consumer = consumer_config(Settings(bootstrap_servers="h:9"), "inventory")
    assert consumer["group.protocol"] == "consumer"
    assert consumer["group.remote.assignor"] == "range"
    # librdkafka refuses the classic-only properties with the consumer protocol
    assert not {"partition.assignment.strategy", "session.timeout.ms"} & consumer.keys()

    classic = consumer_config(
        Settings(bootstrap_servers="h:9", group_protocol="classic", topic_prefix="t-"),
        "inventory",
    )
    assert classic["group.protocol"] == "classic"
    assert classic["partition.assignment.strategy"] == "range"
    assert classic["session.timeout.ms"] == 10_000
    assert "group.remote.assignor" not in classic
    assert classic["group.id"] == "t-inventory"

    with pytest.raises(ValueError, match="group_protocol"):
        Settings(group_protocol="eager")


def test_a_services_fetch_tuning_is_a_default_a_user_may_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(bootstrap_servers="h:9")
    tool = consumer_config(settings, "verify")
    assert tool["fetch.min.bytes"] == 1 and "fetch.wait.max.ms" not in tool
    inventory = consumer_config(settings, "inventory", fetch=service("inventory").fetch)
    assert (inventory["fetch.min.bytes"], inventory["fetch.wait.max.ms"]) == ORDER_PATH
    analytics = consumer_config(settings, "analytics", fetch=service("analytics").fetch)
    assert (analytics["fetch.min.bytes"], analytics["fetch.wait.max.ms"]) == OFF_PATH
    assert service("tracker").fetch == ORDER_PATH and service("dlq-logger").fetch == OFF_PATH
    monkeypatch.setenv("ORDERMESH_KAFKA_FETCH_WAIT_MAX_MS", "50")
    changed = consumer_config(Settings(bootstrap_servers="h:9"), "inventory", fetch=ORDER_PATH)
    assert changed["fetch.wait.max.ms"] == "50"


def test_user_properties_cannot_change_what_the_guarantees_need(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ORDERMESH_KAFKA_ENABLE_AUTO_COMMIT", "true")
    monkeypatch.setenv("ORDERMESH_KAFKA_ACKS", "1")
    monkeypatch.setenv("ORDERMESH_KAFKA_PARTITION_ASSIGNMENT_STRATEGY", "roundrobin")
    monkeypatch.setenv("ORDERMESH_KAFKA_FETCH_MIN_BYTES", "1024")
    settings = Settings(bootstrap_servers="h:9")
    with caplog.at_level(logging.WARNING):
        consumer = consumer_config(settings, "inventory")
        producer = producer_config(settings)
    assert consumer["enable.auto.commit"] is False
    assert "partition.assignment.strategy" not in consumer  # a classic-only property
    assert consumer["fetch.min.bytes"] == "1024"
    assert producer["acks"] == "all" and producer["enable.idempotence"] is True


def test_settings_survive_into_a_child_process_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ORDERMESH_KAFKA_SASL_OAUTHBEARER_METHOD", "oidc")
    parent = Settings(
        bootstrap_servers="h:9",
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        sasl_password=PASSWORD,
        ssl_key_password="kp",
        group_protocol="classic",
        topic_partitions=12,
        topic_retention_ms=3_600_000,
        librdkafka_properties={"some_name.x": "1"},
    )
    env = parent.as_env()
    assert env["ORDERMESH_KAFKA_SASL_OAUTHBEARER_METHOD"] == "oidc"
    assert env["ORDERMESH_KAFKA_SOME__NAME_X"] == "1"
    assert "ORDERMESH_LIBRDKAFKA_PROPERTIES" not in env
    monkeypatch.delenv("ORDERMESH_KAFKA_SASL_OAUTHBEARER_METHOD")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert child == parent
    assert common_config(child) == common_config(parent)


def test_secrets_never_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERMESH_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", PASSWORD)
    monkeypatch.setenv("ORDERMESH_KAFKA_SSL_KEY_PEM", PASSWORD)
    monkeypatch.setenv("ORDERMESH_KAFKA_CLIENT_RACK", "rack-7")
    settings = Settings(
        sasl_username="alice",
        sasl_password=PASSWORD,
        ssl_key_password=PASSWORD,
        api_keys=PASSWORD,
    )
    for shown in (repr(settings), str(settings)):
        assert PASSWORD not in shown
        assert "alice" in shown and "rack-7" in shown  # what is not secret stays visible


def test_a_refused_login_is_one_line_naming_the_user_not_the_password() -> None:
    settings = Settings(
        bootstrap_servers="127.0.0.1:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password=PASSWORD,
    )
    err = KafkaError(
        KafkaError._AUTHENTICATION,
        "sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication"
        " failed during authentication due to invalid credentials with SASL mechanism"
        " SCRAM-SHA-512",
    )
    known = as_ordermesh_error(settings, KafkaException(err))
    assert isinstance(known, ConfigError)
    text = str(known)
    assert "\n" not in text and PASSWORD not in text
    assert text.startswith("Kafka at 127.0.0.1:9093 refused the credentials for user alice")
    assert "(SASL SCRAM-SHA-512: SASL authentication error: Authentication failed" in text


def test_a_failed_connection_logs_no_password(caplog: pytest.LogCaptureFixture) -> None:
    from ordermesh.broker.local import free_ports

    settings = Settings(
        bootstrap_servers=f"127.0.0.1:{free_ports(1)[0]}",  # nothing listens there
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password=PASSWORD,
        ssl_key_password=PASSWORD,
    )
    with (
        caplog.at_level(logging.DEBUG, logger=LIBRDKAFKA_LOGGER),
        caplog.at_level(logging.DEBUG),
        pytest.raises(KafkaUnavailableError) as failed,
        kafka_errors(settings),
    ):
        make_admin(settings).list_topics(timeout=1)
    assert str(failed.value).startswith(f"cannot reach Kafka at {settings.bootstrap_servers}")
    assert PASSWORD not in str(failed.value)
    assert caplog.records, "librdkafka's lines should be in the log"
    assert PASSWORD not in caplog.text
