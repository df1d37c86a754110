"""The DLQ logger process: one alert line per dead-lettered record; produces nothing."""

from __future__ import annotations

from typing import Final

from ordermesh.apps.base import run_until_stopped, service_runner
from ordermesh.config import Settings
from ordermesh.kafka.runner import RunnerStats
from ordermesh.services.dlq import DlqLogger
from ordermesh.topology import ServiceSpec, service

SPEC: Final[ServiceSpec] = service("dlq-logger")


def run_dlq_logger(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """Log every DLQ record until SIGTERM/SIGINT (or idle), then a summary."""
    core = DlqLogger()
    try:
        return run_until_stopped(service_runner(settings, SPEC, core), idle_exit_s)
    finally:
        core.log_summary()
