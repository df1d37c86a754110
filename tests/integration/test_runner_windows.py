"""Revokes at the runner's worst moments, on the real broker.

A rebalance can revoke partitions at any consumer call; ``MovesPartitionsAway`` makes one
happen exactly where it hurts: it is the runner's real consumer, which at the chosen call
subscribes to another topic instead (a real revoke of every partition it had, served by
the client inside that call) and returns once the revoke callback has run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from ordermesh.config import Settings
from ordermesh.kafka import runner as runner_mod
from ordermesh.kafka.client import make_consumer, make_producer
from ordermesh.kafka.runner import BatchRunner
from ordermesh.topics import COMMANDS, EVENTS, ORDERS
from tests.conftest import SettingsFactory, wait_for
from tests.integration.test_dlq import produce
from tests.integration.test_poison import Echo, committed

PARTITIONS = 6


class MovesPartitionsAway:
    """The runner's real consumer; at the first call for which ``when(self)`` is true it
    subscribes to ``elsewhere`` instead and returns (nothing) once the revoke of its
    partitions was served inside that call and the runner's callback returned.

    ``one_record_first``: until then, only calls for one record reach the client (the
    others get nothing), so a fetch's first records are the ones its one-record call got.
    """

    def __init__(
        self,
        consumer: Consumer,
        elsewhere: str,
        when: Callable[[Any], bool],
        *,
        one_record_first: bool = False,
    ) -> None:
        self.consumer = consumer
        self.elsewhere = elsewhere
        self.when = when
        self.one_record_first = one_record_first
        self.moved = False
        self.after_first_record = False  # the last call asked for one record and got it
        self.revoked: list[tuple[str, int]] = []
        self.revoke_started = threading.Event()
        self.revoke_returned = threading.Event()
        self._callbacks: dict[str, Any] = {}

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self._callbacks = callbacks
        self.consumer.subscribe(topics, **callbacks)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if not self.moved and self.when(self):
            self.moved = True
            self._move_away(num_messages)
            return []
        if self.one_record_first and not self.moved and num_messages != 1:
            return []
        msgs = list(self.consumer.consume(num_messages=num_messages, timeout=timeout))
        self.after_first_record = num_messages == 1 and bool(msgs)
        return msgs

    def _move_away(self, num_messages: int) -> None:
        on_revoke = self._callbacks["on_revoke"]

        def revoke(consumer: Any, partitions: list[TopicPartition]) -> None:
            self.revoked += [(p.topic, p.partition) for p in partitions]
            self.revoke_started.set()
            on_revoke(consumer, partitions)
            self.revoke_returned.set()

        self.consumer.subscribe([self.elsewhere], **(self._callbacks | {"on_revoke": revoke}))
        end = time.monotonic() + 60
        while not self.revoke_started.is_set() and time.monotonic() < end:
            # records of the old subscription got here are stale, and none of the new
            # one can come before the revoke: nothing the runner owns is dropped
            self.consumer.consume(num_messages=num_messages, timeout=0.1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.consumer, name)


def _runner(settings: Settings, consumer: MovesPartitionsAway, **kw: Any) -> BatchRunner:
    return BatchRunner(
        settings,
        group="echo",
        topics=[settings.topic(ORDERS)],
        handler=kw.pop("handler"),
        name="echo",
        consumer=consumer,  # type: ignore[arg-type]
        **kw,
    )


def test_records_fetched_before_their_partition_was_revoked_are_neither_handled_nor_committed(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(batch_timeout_s=1.0)
    orders, events = settings.topic(ORDERS), settings.topic(EVENTS)
    produce(settings, orders, [(f"k{i}".encode(), b"v", None) for i in range(60)])

    def between_first_record_and_the_rest(consumer: MovesPartitionsAway) -> bool:
        return consumer.after_first_record

    consumer = MovesPartitionsAway(
        make_consumer(settings, "echo"),
        settings.topic(COMMANDS),
        between_first_record_and_the_rest,
        one_record_first=True,
    )
    handler = Echo(events)
    runner = _runner(settings, consumer, handler=handler)
    runner.run(idle_exit_s=2.0)

    assert consumer.moved
    assert {p for t, p in consumer.revoked if t == orders} == set(range(PARTITIONS))
    assert handler.seen == []  # fetched while ours, revoked before it was handled
    assert all(o < 0 for o in committed(settings, "echo", orders, PARTITIONS).values())

    # the next owner gets every record and commits to the end
    again = Echo(events)
    BatchRunner(
        settings, group="echo", topics=[orders], handler=again, name="echo", outputs=[events]
    ).run(idle_exit_s=2.0)
    assert len(again.seen) == 60
    assert sum(committed(settings, "echo", orders, PARTITIONS).values()) == 60


def test_a_revoke_with_acknowledgements_outstanding_ends_by_its_deadline(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runner_mod, "REVOKE_DEADLINE_S", 1.0)
    monkeypatch.setattr(runner_mod, "STOP_DEADLINE_S", 3.0)
    monkeypatch.setattr(runner_mod, "RETRY_BACKOFF_S", (0.05, 0.2))
    orders = settings.topic(ORDERS)
    produce(settings, orders, [(f"k{i}".encode(), b"v", None) for i in range(10)])
    # a cluster that never answers: no output is ever acknowledged
    down = make_producer(
        settings, **{"bootstrap.servers": "127.0.0.1:9", "message.timeout.ms": 300}
    )
    holder: list[BatchRunner] = []

    def with_a_batch_in_flight(_consumer: MovesPartitionsAway) -> bool:
        return bool(holder and holder[0].commits.batches)

    consumer = MovesPartitionsAway(
        make_consumer(settings, "echo"), settings.topic(COMMANDS), with_a_batch_in_flight
    )
    runner = _runner(settings, consumer, handler=Echo(settings.topic(EVENTS)), producer=down)
    holder.append(runner)
    caplog.set_level(logging.WARNING, logger="ordermesh.kafka.runner")
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for(consumer.revoke_started.is_set, 60, "the revoke to start")
        # well within max.poll.interval.ms: the group need not fence the member
        wait_for(consumer.revoke_returned.is_set, 20, "the revoke to give up on its batches")
        assert thread.is_alive()
    finally:
        runner.request_stop()
        thread.join(30)
    assert not thread.is_alive()
    let_go = [
        r.getMessage() for r in caplog.records if "letting the partitions go" in r.getMessage()
    ]
    assert len(let_go) == 1, let_go
    assert runner.stats.commits == 0
    assert all(o < 0 for o in committed(settings, "echo", orders, PARTITIONS).values())
