"""Security of the local cluster (``broker up --security scram-tls``): a private CA, the
broker's TLS key and certificate, SCRAM-SHA-512 users and the client properties file.

The certificates are made with Java's ``keytool``: the broker needs a JVM anyway, so it is
always there (``openssl`` is not on every slim image). The broker reads a PKCS12 keystore
and the CA as a PEM truststore; clients (librdkafka) get the CA as PEM.

Passwords are generated, never passed on a command line (``keytool -storepass:env``; the
SCRAM credentials go to the storage tool already salted and hashed, as
``saltedpassword=``) and kept only in files of mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from ordermesh.errors import BrokerError

Security = Literal["none", "scram-tls"]
SECURITY_MODES: Final[tuple[Security, ...]] = ("none", "scram-tls")

MECHANISM: Final = "SCRAM-SHA-512"
CLIENT_USER: Final = "ordermesh"
BROKER_USER: Final = "ordermesh-broker"
# Kafka refuses fewer than 4096 iterations for SCRAM-SHA-512
SCRAM_ITERATIONS: Final = 8192
CERT_DAYS: Final = 825
# names the broker certificate is valid for: clients verify them (librdkafka's default
# ssl.endpoint.identification.algorithm=https), and so do brokers talking to each other
CERT_SAN: Final = "dns:localhost,ip:127.0.0.1"


@dataclass(frozen=True)
class SecurityFiles:
    """What a secured local cluster needs: the broker's TLS files, its SCRAM user, and
    the client side (the user and the properties file for ``--command-config``)."""

    directory: Path
    ca_pem: Path
    keystore: Path
    keystore_password: str
    broker_password: str
    client_password: str
    client_config: Path

    def scram_arguments(self) -> list[str]:
        """``--add-scram`` arguments of the storage tool that create both users."""
        return [
            arg
            for user, password in (
                (BROKER_USER, self.broker_password),
                (CLIENT_USER, self.client_password),
            )
            for arg in ("--add-scram", scram_credential(user, password))
        ]

    def broker_properties(self) -> dict[str, str]:
        """server.properties entries of the SASL_SSL listener (named ``SASL_SSL``)."""
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{BROKER_USER}" password="{self.broker_password}";'
        )
        return {
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.keystore),
            "ssl.keystore.password": self.keystore_password,
            "ssl.key.password": self.keystore_password,
            # brokers talk to each other over the same listener: they trust our CA
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_pem),
            "ssl.client.auth": "none",
        }


def new_password() -> str:
    """A random password (URL-safe characters: no quoting in any file format)."""
    return secrets.token_urlsafe(24)


def scram_credential(user: str, password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """The storage tool's ``--add-scram`` value for ``user``, salted and hashed here
    (RFC 5802's SaltedPassword) so the password itself is never on a command line."""
    salt = secrets.token_bytes(24)
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return (
        f"{MECHANISM}=[name={user},iterations={iterations},"
        f'salt="{b64(salt).decode()}",saltedpassword="{b64(salted).decode()}"]'
    )


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from the start)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def client_properties_text(files: SecurityFiles) -> str:
    """The client.properties of the local cluster, in librdkafka's property names."""
    return (
        "# OrderMesh local cluster (broker up --security scram-tls): use with\n"
        "# --command-config or ORDERMESH_COMMAND_CONFIG (librdkafka property names)\n"
        "security.protocol=SASL_SSL\n"
        f"sasl.mechanism={MECHANISM}\n"
        f"sasl.username={CLIENT_USER}\n"
        f"sasl.password={files.client_password}\n"
        f"ssl.ca.location={files.ca_pem}\n"
    )


def _keytool() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "keytool").exists():
        return str(Path(java_home) / "bin" / "keytool")
    found = shutil.which("keytool")
    if found is None:
        raise BrokerError("keytool (part of the Java runtime) is not on PATH or in JAVA_HOME")
    return found


def _run_keytool(args: list[str], passwords: dict[str, str]) -> None:
    env = {**os.environ, **passwords}
    proc = subprocess.run(
        [_keytool(), *args], env=env, capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()[-1500:]
        raise BrokerError(f"keytool {args[0]} failed (exit {proc.returncode}): {out}")


def make_security(directory: Path) -> SecurityFiles:
    """Create the CA, the broker keystore, the passwords and client.properties under
    ``directory`` (mode 0700; every file 0600). The CA's key is deleted once it signed
    the broker's certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca_store = directory / "ca.p12"
    keystore = directory / "broker.p12"
    ca_pem = directory / "ca.pem"
    csr = directory / "broker.csr"
    signed = directory / "broker.crt"
    for stale in (ca_store, keystore, ca_pem, csr, signed):
        stale.unlink(missing_ok=True)
    ca_password, keystore_password = new_password(), new_password()
    pw = {"OM_CA_PASS": ca_password, "OM_KS_PASS": keystore_password}
    ca = ["-keystore", str(ca_store), "-storetype", "PKCS12", "-storepass:env", "OM_CA_PASS"]
    ks = ["-keystore", str(keystore), "-storetype", "PKCS12", "-storepass:env", "OM_KS_PASS"]
    key = ["-keyalg", "EC", "-groupname", "secp256r1", "-validity", str(CERT_DAYS)]
    # PKCS12 keeps one password: the key's is the store's (no -keypass)
    ca_name = ["-alias", "ca", "-dname", "CN=OrderMesh local CA", "-ext", "bc:c"]
    _run_keytool(["-genkeypair", *ca_name, *key, *ca], pw)
    _run_keytool(["-exportcert", "-rfc", "-alias", "ca", "-file", str(ca_pem), *ca], pw)
    _run_keytool(["-genkeypair", "-alias", "broker", "-dname", "CN=localhost", *key, *ks], pw)
    _run_keytool(["-certreq", "-alias", "broker", "-file", str(csr), *ks], pw)
    _run_keytool(
        [
            "-gencert",
            "-alias",
            "ca",
            "-rfc",
            "-infile",
            str(csr),
            "-outfile",
            str(signed),
            "-validity",
            str(CERT_DAYS),
            "-ext",
            f"san={CERT_SAN}",
            "-ext",
            "eku=serverAuth,clientAuth",
            "-ext",
            "ku:c=digitalSignature,keyAgreement",
            *ca,
        ],
        pw,
    )
    # the chain: the CA first, then the signed reply replaces the self-signed broker cert
    _run_keytool(["-importcert", "-noprompt", "-alias", "ca", "-file", str(ca_pem), *ks], pw)
    _run_keytool(["-importcert", "-alias", "broker", "-file", str(signed), *ks], pw)
    # the CA's key has signed the one certificate it is for: nothing else may be signed
    csr.unlink()
    ca_store.unlink()
    for path in (keystore, ca_pem, signed):
        path.chmod(0o600)
    files = SecurityFiles(
        directory=directory,
        ca_pem=ca_pem,
        keystore=keystore,
        keystore_password=keystore_password,
        broker_password=new_password(),
        client_password=new_password(),
        client_config=directory.parent / "client.properties",
    )
    write_private(files.client_config, client_properties_text(files))
    return files
