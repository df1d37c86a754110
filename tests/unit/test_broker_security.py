"""The secured local cluster's pieces that need no JVM: SCRAM credentials, the listener
properties, private files and the ``--security`` option."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import stat
from pathlib import Path

from typer.testing import CliRunner

from ordermesh.broker.local import ClusterState, LocalCluster, NodeState
from ordermesh.broker.tls import (
    BROKER_USER,
    CLIENT_USER,
    SecurityFiles,
    client_properties_text,
    scram_credential,
    write_private,
)
from ordermesh.cli import app
from ordermesh.config import read_client_properties


def _files(tmp_path: Path) -> SecurityFiles:
    return SecurityFiles(
        directory=tmp_path / "tls",
        ca_pem=tmp_path / "tls" / "ca.pem",
        keystore=tmp_path / "tls" / "broker.p12",
        keystore_password="ks-secret",
        broker_password="broker-secret",
        client_password="client-secret",
        client_config=tmp_path / "client.properties",
    )


def test_scram_credential_is_salted_and_hashed_as_rfc_5802_says() -> None:
    value = scram_credential("alice", "s3cret", iterations=4096)
    assert "s3cret" not in value
    match = re.fullmatch(
        r'SCRAM-SHA-512=\[name=alice,iterations=4096,salt="([^"]+)",saltedpassword="([^"]+)"\]',
        value,
    )
    assert match, value
    salt, salted = (base64.b64decode(g) for g in match.groups())
    expected = hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, 4096)
    assert hmac.compare_digest(salted, expected)
    assert scram_credential("alice", "s3cret") != scram_credential("alice", "s3cret")  # salt


def test_secured_nodes_share_one_sasl_ssl_listener(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "broker", tmp_path / "jars")
    state = ClusterState("id", [NodeState(1, 9093, 9094)], security="scram-tls")
    files = _files(tmp_path)
    props = dict(
        line.split("=", 1)
        for line in cluster._properties(state, state.nodes[0], files).splitlines()
    )
    assert props["listeners"] == "SASL_SSL://127.0.0.1:9093,CONTROLLER://127.0.0.1:9094"
    assert props["advertised.listeners"] == "SASL_SSL://127.0.0.1:9093"
    assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
    assert props["inter.broker.listener.name"] == "SASL_SSL"
    assert props["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    assert (
        f'username="{BROKER_USER}" password="broker-secret"'
        in (props["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"])
    )
    plain = dict(
        line.split("=", 1) for line in cluster._properties(state, state.nodes[0]).splitlines()
    )
    assert plain["inter.broker.listener.name"] == "PLAINTEXT"
    assert "sasl.enabled.mechanisms" not in plain
    # both users exist from the format on, neither password on the command line
    args = files.scram_arguments()
    assert args[::2] == ["--add-scram", "--add-scram"]
    assert f"name={BROKER_USER}," in args[1] and f"name={CLIENT_USER}," in args[3]
    assert not any("secret" in arg for arg in args)


def test_client_properties_are_private_and_readable_by_command_config(tmp_path: Path) -> None:
    files = _files(tmp_path)
    write_private(files.client_config, client_properties_text(files))
    assert stat.S_IMODE(files.client_config.stat().st_mode) == 0o600
    assert read_client_properties(files.client_config) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": CLIENT_USER,
        "sasl.password": "client-secret",
        "ssl.ca.location": str(files.ca_pem),
    }


def test_an_unknown_security_mode_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["broker", "up", "--security", "kerberos", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "none, scram-tls" in result.output
    assert not (tmp_path / "broker").exists()
