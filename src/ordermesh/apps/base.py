"""A runner built from a service's ``ServiceSpec``, and running it until stopped."""

from __future__ import annotations

from typing import Any

from ordermesh.config import Settings
from ordermesh.kafka.runner import BatchHandler, BatchRunner, RunnerStats
from ordermesh.topology import ServiceSpec


def service_runner(
    settings: Settings, spec: ServiceSpec, handler: BatchHandler, **options: Any
) -> BatchRunner:
    """A runner of ``handler`` in ``spec``'s group over the topics ``spec`` consumes.

    ``options`` go to ``BatchRunner`` (``positions`` for an every-partition reader).
    """
    if spec.group is None:
        raise ValueError(f"{spec.name} consumes nothing: it has no runner")
    runner = BatchRunner(
        settings,
        group=spec.group,
        topics=[settings.topic(t) for t in spec.consumes],
        handler=handler,
        name=spec.name,
        assignment="every-partition" if spec.per_partition_assignment else "group",
        fetch=spec.fetch,
        **options,
    )
    runner.metrics.watch(runner.stats)  # /health reports the runner's own state
    return runner


def run_until_stopped(runner: BatchRunner, idle_exit_s: float | None) -> RunnerStats:
    """Run until SIGTERM/SIGINT (or idle); in-flight batches are committed before exit."""
    runner.install_signal_handlers()
    return runner.run(idle_exit_s=idle_exit_s)
