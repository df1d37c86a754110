"""Cluster administration: create the topics of their specs, look at the cluster.

The specs themselves (names, partitions, replication) are in ``ordermesh.topics``; this
module turns them into AdminClient calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ordermesh.config import Settings
from ordermesh.errors import TopicError
from ordermesh.topics import SPECS, EnsureOutcome, TopicReport, TopicSpec, replication_for

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
        complete = all(existing.get(names[s.name], (0, 0))[0] == s.partitions for s in specs)
        if complete or time.monotonic() > deadline:
            return existing
        time.sleep(0.2)


def ensure_topics(
    admin: AdminClient, settings: Settings, specs: Sequence[TopicSpec] = SPECS
) -> list[TopicReport]:
    """Create missing topics; raise TopicError for any that exist with another shape."""
    brokers = len(admin.list_topics(timeout=10).brokers)
    if brokers == 0:
        raise TopicError("the cluster reports no brokers")
    rf, min_isr = replication_for(brokers)
    names = {spec.name: settings.topic(spec.name) for spec in specs}
    existing = _describe(admin, list(names.values()))
    to_create = [
        NewTopic(
            names[spec.name],
            num_partitions=spec.partitions,
            replication_factor=rf,
            config={"min.insync.replicas": str(min_isr)},
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
    reports = []
    problems = []
    for spec in specs:
        name = names[spec.name]
        partitions, actual_rf = existing.get(name, (0, 0))
        if partitions != spec.partitions or actual_rf != rf:
            problems.append(
                f"{name}: has {partitions} partitions and RF {actual_rf}, "
                f"expected {spec.partitions} partitions and RF {rf}"
            )
        outcome: EnsureOutcome = "created" if name in created else "exists"
        reports.append(TopicReport(name, partitions, actual_rf, outcome))
    if problems:
        raise TopicError("topics exist with another shape:\n  " + "\n  ".join(problems))
    return reports
