"""Fetch the official Apache Kafka jars from Maven Central, once, into a cache."""

from __future__ import annotations

import logging
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from ordermesh.errors import JarFetchError

log = logging.getLogger(__name__)

_MARKER = ".complete"


def pom_path() -> Path:
    """The pom that declares the Kafka broker, tools and the log4j2 binding."""
    return Path(str(resources.files("ordermesh.broker") / "pom.xml"))


def jars_ready(jar_dir: Path) -> bool:
    return (jar_dir / _MARKER).exists()


def ensure_jars(jar_dir: Path, version: str) -> Path:
    """Return ``jar_dir`` holding every runtime jar of Kafka ``version``; fetch if missing."""
    if jars_ready(jar_dir):
        return jar_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise JarFetchError("Maven (mvn) is not on PATH; it is needed once to fetch the Kafka jars")
    tmp = jar_dir.with_name(jar_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(pom_path()),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}",
        "-DincludeScope=runtime",
        f"-Dkafka.version={version}",
    ]
    log.info("fetching Kafka %s jars with Maven into %s", version, jar_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise JarFetchError(f"mvn failed for Kafka {version} (exit {proc.returncode}):\n{tail}")
    if not any(tmp.glob(f"kafka_2.13-{version}.jar")):
        raise JarFetchError(f"Maven finished but kafka_2.13-{version}.jar is not in {tmp}")
    (tmp / _MARKER).write_text(version)
    # rename last so a half-fetched cache is never taken for a complete one
    shutil.rmtree(jar_dir, ignore_errors=True)
    tmp.rename(jar_dir)
    return jar_dir
