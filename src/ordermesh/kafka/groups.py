"""Consumer groups as the cluster sees them: members, assignments and lag per partition.

``describe_groups`` asks the AdminClient; ``GroupsMonitor`` refreshes it every
``GROUPS_REFRESH_S`` in a thread of its own, so readers (the analytics dashboard's
``/groups``) get the cached result at once. A group that does not exist (``DEAD``) gets
no lag: its "lag" would be the whole topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

from confluent_kafka.admin import AdminClient

from ordermesh.config import Settings
from ordermesh.kafka.client import make_admin
from ordermesh.kafka.lag import group_lag

log = logging.getLogger(__name__)

GROUPS_REFRESH_S: Final = 2.0


def _logical(settings: Settings, topic: str) -> str:
    prefix = settings.topic_prefix
    return topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic


def describe_groups(
    settings: Settings,
    admin: AdminClient,
    groups: Mapping[str, Sequence[str]],
    readers: Collection[str] = (),
) -> dict[str, Any]:
    """Members, assignments and lag per partition of ``groups`` (name -> the topics it
    reads, names before the prefix). ``readers``: groups whose consumers read every
    partition without joining (they have no members)."""
    ids = {settings.group(name): name for name in groups}
    futures = admin.describe_consumer_groups(list(ids), request_timeout=5)
    found: dict[str, Any] = {}
    for group_id, future in futures.items():
        name = ids[group_id]
        entry: dict[str, Any] = {
            "group_id": group_id,
            "state": "UNKNOWN",
            "type": "UNKNOWN",
            "membership": "reader" if name in readers else "group",
            "member_count": 0,
            "members": [],
            "partitions": [],
            "total_lag": None,
            "error": None,
        }
        found[name] = entry
        try:
            desc = future.result()
        except Exception as exc:  # noqa: BLE001 - one group failing must not hide the others
            entry["error"] = str(exc)
            continue
        entry["state"] = getattr(desc.state, "name", str(desc.state))
        entry["type"] = getattr(desc.type, "name", str(desc.type))
        owner: dict[tuple[str, int], str] = {}
        for member in sorted(desc.members, key=lambda m: (m.client_id, m.member_id)):
            tps = sorted(
                (_logical(settings, tp.topic), tp.partition)
                for tp in (member.assignment.topic_partitions if member.assignment else [])
            )
            entry["members"].append(
                {
                    "member_id": member.member_id,
                    "client_id": member.client_id,
                    "host": member.host,
                    "partitions": [f"{t}[{p}]" for t, p in tps],
                }
            )
            for tp in tps:
                owner[tp] = member.client_id or member.member_id
        entry["member_count"] = len(entry["members"])
        if entry["state"] == "DEAD":
            continue  # no such group: no committed offsets, no lag to speak of
        topics = [settings.topic(t) for t in groups[name]]
        try:
            lag = group_lag(settings, name, topics)
        except Exception as exc:  # noqa: BLE001 - shown on the dashboard, retried next round
            entry["error"] = f"lag: {exc}"
            continue
        rows = sorted(((_logical(settings, t), p), n) for (t, p), n in lag.items())
        entry["partitions"] = [
            {"topic": t, "partition": p, "lag": n, "member": owner.get((t, p))}
            for (t, p), n in rows
        ]
        entry["total_lag"] = sum(n for _tp, n in rows)
    return {"generated_at": time.time(), "groups": found}


class GroupsMonitor:
    """Refreshes ``describe_groups`` every ``every_s`` in a thread of its own."""

    def __init__(
        self,
        settings: Settings,
        groups: Mapping[str, Sequence[str]],
        readers: Collection[str] = (),
        every_s: float = GROUPS_REFRESH_S,
    ) -> None:
        self.settings = settings
        self.groups = dict(groups)
        self.readers = frozenset(readers)
        self.every_s = every_s
        self._latest: dict[str, Any] = {"generated_at": None, "groups": {}, "error": None}
        self._lock = threading.Lock()
        self._admin: AdminClient | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="groups-monitor", daemon=True)

    def latest(self) -> dict[str, Any]:
        with self._lock:
            return self._latest

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if self._admin is None:
                    self._admin = make_admin(self.settings)
                found = describe_groups(self.settings, self._admin, self.groups, self.readers)
                found["error"] = None
                failures = 0
            except Exception as exc:  # noqa: BLE001 - keep the last good view, say why
                failures += 1
                if failures == 1:
                    log.warning("describing consumer groups failed: %s", exc)
                with self._lock:
                    found = dict(self._latest)
                found["error"] = str(exc)
            with self._lock:
                self._latest = found
            self._stop.wait(self.every_s)
