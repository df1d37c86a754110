"""Kafka's own performance tools, run from the cached jars, and their output parsed.

``ProducerPerformance`` and ``ConsumerPerformance`` (``org.apache.kafka.tools``, the
classes behind ``kafka-producer-perf-test.sh`` and ``kafka-consumer-perf-test.sh``) are
the reference the mesh is compared with: what the broker takes and gives on this machine
with Kafka's Java client. They run as ``java -cp "<jar dir>/*" <class> ...`` with the
options of Kafka 4.3 (``--bootstrap-server``, ``--command-property``, ``--num-records``;
the older ``--producer-props``/``--messages`` spellings are deprecated there).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any, Final

from ordermesh.errors import OrderMeshError

PRODUCER_PERFORMANCE: Final = "org.apache.kafka.tools.ProducerPerformance"
CONSUMER_PERFORMANCE: Final = "org.apache.kafka.tools.ConsumerPerformance"
# what kafka-run-class.sh gives the perf-test scripts
TOOL_HEAP: Final = "-Xmx512m"

# The final line of ProducerPerformance (the per-interval lines lack the percentiles):
# "200000 records sent, 42194.092827 records/sec (12.27 MB/sec), 1098.39 ms avg latency,
#  1605.00 ms max latency, 1149 ms 50th, 1560 ms 95th, 1588 ms 99th, 1604 ms 99.9th."
_PRODUCER_SUMMARY: Final = re.compile(
    r"^(?P<records>\d+) records sent, (?P<rate>[\d.]+) records/sec"
    r" \((?P<mb>[\d.]+) MB/sec\), (?P<avg>[\d.]+) ms avg latency,"
    r" (?P<max>[\d.]+) ms max latency, (?P<p50>\d+) ms 50th, (?P<p95>\d+) ms 95th,"
    r" (?P<p99>\d+) ms 99th, (?P<p999>\d+) ms 99\.9th\.$"
)
# ConsumerPerformance's header; its next line holds the values, comma-separated
_CONSUMER_HEADER: Final = "start.time, end.time,"


def java_command(jar_dir: Path) -> list[str]:
    """``java`` (``$JAVA_HOME/bin/java`` when set) with the Kafka jars on the class path."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else "java"
    return [java, TOOL_HEAP, "-Djava.awt.headless=true", "-cp", str(jar_dir / "*")]


def producer_performance_args(
    bootstrap: str, topic: str, records: int, record_size: int
) -> list[str]:
    """ProducerPerformance at full speed (``--throughput -1``) with ``acks=all``."""
    return [
        PRODUCER_PERFORMANCE,
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--num-records",
        str(records),
        "--record-size",
        str(record_size),
        "--throughput",
        "-1",
        "--command-property",
        "acks=all",
    ]


def consumer_performance_args(bootstrap: str, topic: str, records: int, group: str) -> list[str]:
    """ConsumerPerformance reading ``records`` records of ``topic`` in a new group."""
    return [
        CONSUMER_PERFORMANCE,
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--num-records",
        str(records),
        "--group",
        group,
    ]


def parse_producer_performance(output: str) -> dict[str, Any]:
    """The final summary of ProducerPerformance's output; OrderMeshError if there is none."""
    for line in reversed(output.splitlines()):
        match = _PRODUCER_SUMMARY.match(line.strip())
        if match:
            g = match.groupdict()
            return {
                "records": int(g["records"]),
                "records_per_s": round(float(g["rate"]), 1),
                "mb_per_s": float(g["mb"]),
                "latency_ms": {
                    "avg": float(g["avg"]),
                    "p50": float(g["p50"]),
                    "p95": float(g["p95"]),
                    "p99": float(g["p99"]),
                    "p99.9": float(g["p999"]),
                    "max": float(g["max"]),
                },
            }
    raise OrderMeshError(f"no summary line in ProducerPerformance's output: {output[-500:]!r}")


def parse_consumer_performance(output: str) -> dict[str, Any]:
    """ConsumerPerformance's header and value lines as numbers.

    ``records_per_s`` (``nMsg.sec``) counts the whole run, joining the group included;
    ``fetch_records_per_s`` (``fetch.nMsg.sec``) the time after the join only.
    """
    lines = [line.strip() for line in output.splitlines()]
    for i, line in enumerate(lines[:-1]):
        if not line.startswith(_CONSUMER_HEADER):
            continue
        names = [name.strip() for name in line.split(",")]
        values = [value.strip() for value in lines[i + 1].split(",")]
        if len(values) != len(names):
            break
        row = dict(zip(names, values, strict=True))
        try:
            return {
                "records": int(row["data.consumed.in.nMsg"]),
                "mb": float(row["data.consumed.in.MB"]),
                "records_per_s": round(float(row["nMsg.sec"]), 1),
                "mb_per_s": float(row["MB.sec"]),
                "fetch_records_per_s": round(float(row["fetch.nMsg.sec"]), 1),
                "fetch_mb_per_s": float(row["fetch.MB.sec"]),
                "rebalance_ms": int(row["rebalance.time.ms"]),
                "fetch_ms": int(row["fetch.time.ms"]),
            }
        except (KeyError, ValueError):
            break
    raise OrderMeshError(f"no result line in ConsumerPerformance's output: {output[-500:]!r}")


def shown_command(args: list[str]) -> str:
    """How a tool's run reads as a command line (the jars as ``$KAFKA_JARS``)."""
    return f'java -cp "$KAFKA_JARS/*" {shlex.join(args)}'


def run_tool(jar_dir: Path, args: list[str], *, timeout_s: float) -> str:
    """Run one Kafka tool; its stdout. OrderMeshError if it fails."""
    cmd = [*java_command(jar_dir), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OrderMeshError(f"{args[0]}: {exc}") from None
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-1500:]
        raise OrderMeshError(f"{args[0]} exited with {proc.returncode}: {tail}")
    return proc.stdout


def java_version() -> str:
    """The first line of ``java -version`` ("?" when java cannot be run)."""
    try:
        proc = subprocess.run(
            [java_command(Path("."))[0], "-version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[0] if lines else "?"
