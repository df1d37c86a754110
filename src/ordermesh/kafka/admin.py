"""Cluster administration: create the topics of their specs, look at the cluster.

The specs themselves (names, partitions, replication) are in ``ordermesh.topics``; this
module turns them into AdminClient calls.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from ordermesh.config import Settings
from ordermesh.errors import TopicError
from ordermesh.topics import (
    COMMANDS,
    ORDERS,
    EnsureOutcome,
    TopicReport,
    TopicSpec,
    copartition_warning,
    judge_topic,
    replication_for,
    topic_specs,
)

log = logging.getLogger(__name__)

# the admin client of the cluster (callers outside kafka/ name the type from here)
Admin = AdminClient


@dataclass(frozen=True)
class ClusterView:
    """What the cluster's metadata says: how many brokers, which topics are usable."""

    brokers: int
    topics: frozenset[str]


def cluster_view(admin: AdminClient, timeout_s: float) -> ClusterView:
    """The brokers and the topics without error; raises KafkaException when unreachable."""
    md = admin.list_topics(timeout=timeout_s)
    usable = frozenset(name for name, meta in md.topics.items() if meta.error is None)
    return ClusterView(brokers=len(md.brokers), topics=usable)


def _describe(admin: AdminClient, names: list[str]) -> dict[str, tuple[int, int]]:
    md = admin.list_topics(timeout=10)
    found: dict[str, tuple[int, int]] = {}
    for name in names:
        topic = md.topics.get(name)
        if topic is None or topic.error is not None:
            continue
        partitions = topic.partitions
        rf = min((len(p.replicas) for p in partitions.values()), default=0)
        found[name] = (len(partitions), rf)
    return found


def _wait_visible(
    admin: AdminClient, names: dict[str, str], specs: Sequence[TopicSpec]
) -> dict[str, tuple[int, int]]:
    # metadata of a just-created topic can lag the create response by a moment
    deadline = time.monotonic() + 15
    while True:
        existing = _describe(admin, list(names.values()))
        complete = all(existing.get(names[s.name], (0, 0))[0] >= s.partitions for s in specs)
        if complete or time.monotonic() > deadline:
            return existing
        time.sleep(0.2)


def _retention(admin: AdminClient, names: Sequence[str]) -> dict[str, str]:
    """topic -> its retention.ms (only topics whose configs could be read)."""
    if not names:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
    found: dict[str, str] = {}
    for resource, future in admin.describe_configs(resources, request_timeout=15).items():
        try:
            entry = future.result().get("retention.ms")
        except Exception as exc:  # noqa: BLE001 - a config we may not read: not compared
            log.warning("cannot read the configs of topic %s: %s", resource.name, exc)
            continue
        if entry is not None and entry.value is not None:
            found[resource.name] = str(entry.value)
    return found


def ensure_topics(
    admin: AdminClient, settings: Settings, specs: Sequence[TopicSpec] | None = None
) -> list[TopicReport]:
    """Create missing topics; raise TopicError for any that exist with a shape the mesh
    cannot use (``topics.judge_topic``), and report the ones that differ but work.

    ``specs`` default: the mesh's topics with ``settings.topic_partitions``.
    """
    if specs is None:
        specs = topic_specs(settings.topic_partitions)
    brokers = len(admin.list_topics(timeout=10).brokers)
    if brokers == 0:
        raise TopicError("the cluster reports no brokers")
    rf, min_isr = replication_for(brokers)
    names = {spec.name: settings.topic(spec.name) for spec in specs}
    existing = _describe(admin, list(names.values()))
    config = {"min.insync.replicas": str(min_isr)}
    if settings.topic_retention_ms is not None:
        config["retention.ms"] = str(settings.topic_retention_ms)
    to_create = [
        NewTopic(
            names[spec.name],
            num_partitions=spec.partitions,
            replication_factor=rf,
            config=config,
        )
        for spec in specs
        if names[spec.name] not in existing
    ]
    created: set[str] = set()
    if to_create:
        for name, future in admin.create_topics(to_create, request_timeout=30).items():
            try:
                future.result()
                created.add(name)
                log.info("created topic %s (rf=%d, min.insync.replicas=%d)", name, rf, min_isr)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise TopicError(f"could not create topic {name}: {exc}") from exc
        existing = _wait_visible(admin, names, specs)
    retention = (
        _retention(admin, [n for n in names.values() if n in existing and n not in created])
        if settings.topic_retention_ms is not None
        else {}
    )
    reports = []
    problems = []
    for spec in specs:
        name = names[spec.name]
        partitions, actual_rf = existing.get(name, (0, 0))
        judged = judge_topic(
            name,
            spec,
            partitions=partitions,
            replication_factor=actual_rf,
            expected_rf=rf,
            retention_ms=retention.get(name),
            expected_retention_ms=settings.topic_retention_ms,
        )
        problems += judged.problems
        outcome: EnsureOutcome = "created" if name in created else "exists"
        reports.append(TopicReport(name, partitions, actual_rf, outcome, judged.warnings))
    if problems:
        raise TopicError("topics exist with another shape:\n  " + "\n  ".join(problems))
    counts = {r.name: r.partitions for r in reports}
    if ORDERS in names and COMMANDS in names:
        orders, commands = names[ORDERS], names[COMMANDS]
        warning = copartition_warning((orders, counts[orders]), (commands, counts[commands]))
        if warning is not None:
            reports = [
                dataclasses.replace(r, warnings=[*r.warnings, warning]) if r.name == orders else r
                for r in reports
            ]
    for report in reports:
        for warning in report.warnings:
            log.warning("%s", warning)
    return reports
