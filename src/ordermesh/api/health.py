"""``GET /health``: Kafka, the tracker DB, the API DB and the consumer lag of the pipeline.

Healthy (200) means the API can do its job: Kafka answers with its topics, and both
databases answer. Consumer lag is reported, not judged: a backlog after a burst is normal
operation, and what counts as too much is the operator's alerting rule on the
``ordermesh_consumer_lag`` metric.

Kafka checks are blocking librdkafka calls, so they run on a worker thread and are
cached (metadata ~1 s, lag a few s); concurrent requests share one refresh, and a request
waits for a refresh only briefly before answering with the last known value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from ordermesh.config import Settings
from ordermesh.kafka.admin import Admin, cluster_view
from ordermesh.kafka.lag import PartitionLag, group_lag
from ordermesh.topics import COMMANDS, ORDERS
from ordermesh.topology import group_topics

log = logging.getLogger(__name__)

METADATA_TTL_S: Final = 1.0
METADATA_TIMEOUT_S: Final = 1.0
LAG_TTL_S: Final = 5.0
# how long a request waits for a refresh before it answers with the previous value
REFRESH_WAIT_S: Final = 2.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class Snapshot(Generic[_T]):
    value: _T | None
    error: str | None
    at: float | None  # monotonic time of the refresh; None: never refreshed

    def age_s(self) -> float | None:
        return None if self.at is None else round(time.monotonic() - self.at, 3)


class CachedCheck(Generic[_T]):
    """The result of a blocking ``probe``, refreshed on a thread at most every ``ttl_s``."""

    def __init__(self, name: str, probe: Callable[[], _T], ttl_s: float) -> None:
        self.name = name
        self._probe = probe
        self._ttl_s = ttl_s
        self._snapshot: Snapshot[_T] = Snapshot(None, "not checked yet", None)
        self._refresh: asyncio.Task[None] | None = None

    @property
    def snapshot(self) -> Snapshot[_T]:
        return self._snapshot

    async def get(self, wait_s: float = REFRESH_WAIT_S) -> Snapshot[_T]:
        snap = self._snapshot
        if snap.at is not None and time.monotonic() - snap.at < self._ttl_s:
            return snap
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._run(), name=f"refresh-{self.name}")
        # past wait_s, answer with the last value; the refresh goes on
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._refresh), wait_s)
        return self._snapshot

    async def _run(self) -> None:
        try:
            value = await asyncio.to_thread(self._probe)
        except Exception as exc:  # noqa: BLE001 - any failure of a probe is its answer
            self._snapshot = Snapshot(self._snapshot.value, str(exc), time.monotonic())
            log.debug("%s check failed: %s", self.name, exc)
        else:
            self._snapshot = Snapshot(value, None, time.monotonic())


@dataclass(frozen=True)
class KafkaState:
    brokers: int
    missing_topics: list[str]


# the groups whose lag the health check reports (the stateful ones: their lag is the
# pipeline's backlog), with the topics each consumes
LAG_GROUPS: Final[dict[str, tuple[str, ...]]] = group_topics(stateful_only=True)

GroupLags = dict[str, PartitionLag]


class HealthChecks:
    """The cached Kafka checks of one app."""

    def __init__(self, settings: Settings, admin: Admin) -> None:
        self.settings = settings
        self._admin = admin
        self.kafka: CachedCheck[KafkaState] = CachedCheck("kafka", self._kafka, METADATA_TTL_S)
        self.lag: CachedCheck[GroupLags] = CachedCheck("lag", self._lag, LAG_TTL_S)

    def _kafka(self) -> KafkaState:
        view = cluster_view(self._admin, METADATA_TIMEOUT_S)
        wanted = [self.settings.topic(ORDERS), self.settings.topic(COMMANDS)]
        missing = [t for t in wanted if t not in view.topics]
        return KafkaState(brokers=view.brokers, missing_topics=missing)

    def _lag(self) -> GroupLags:
        kafka = self.kafka.snapshot
        if kafka.at is not None and kafka.error is not None:
            # each group_lag call would wait out its own timeouts against a dead cluster
            raise RuntimeError("kafka unreachable")
        return {
            group: group_lag(self.settings, group, [self.settings.topic(t) for t in topics])
            for group, topics in LAG_GROUPS.items()
        }

    async def kafka_report(self) -> tuple[bool, dict[str, Any]]:
        snap = await self.kafka.get()
        state = snap.value
        ok = snap.error is None and state is not None and state.brokers > 0
        report: dict[str, Any] = {"ok": ok, "error": snap.error, "age_s": snap.age_s()}
        if state is not None:
            report["brokers"] = state.brokers
            report["missing_topics"] = state.missing_topics
            if state.missing_topics:
                ok = False
                report["ok"] = False
                report["error"] = report["error"] or "topics missing"
        return ok, report

    async def lag_report(self) -> dict[str, Any]:
        snap = await self.lag.get()
        groups: dict[str, Any] = {}
        for group, lag in (snap.value or {}).items():
            groups[group] = {
                "total": sum(lag.values()),
                "partitions": {f"{t}[{p}]": n for (t, p), n in sorted(lag.items())},
            }
        return {"groups": groups, "error": snap.error, "age_s": snap.age_s()}
