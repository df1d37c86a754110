"""Durable work done beside a runner: a worker thread and the outbox it publishes.

Payments and fulfilment record *intents* in their batch handler (so a batch's offsets
commit behind rows in the database) and do the work later, here:

- ``Worker`` is a thread running an asyncio loop. Each round it asks its ``WorkSteps``
  to move (claim due work from the store under a lease, start it, record the outcomes
  that came in, each with its events as outbox rows, in one transaction), then lets the
  ``OutboxPublisher`` produce what is unpublished. An idle round sleeps ``idle_s``.
- ``OutboxPublisher`` claims unpublished outbox rows (with a lease, so instances sharing
  a database split them), produces them with the worker's own idempotent producer, and
  marks them published once Kafka acknowledged them. A row is never marked before its
  ack; a crash produces it again on the next start (its lease runs out), which the
  consumers' per-order idempotency makes harmless.

A failing store or a bug in a step never ends the thread: it is logged (the first and
then every 50th in a row) and the round is tried again after a pause.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from ordermesh.errors import OrderMeshError
from ordermesh.kafka.producer import Producer
from ordermesh.kafka.runner import BatchRunner, RunnerStats
from ordermesh.repeats import Repeats
from ordermesh.stores.outbox import OutboxStore

log = logging.getLogger(__name__)

# how long an outbox row's claim holds before another publisher may produce it again
OUTBOX_LEASE_S: Final = 30.0
OUTBOX_BATCH: Final = 1000
# records produced and not acknowledged yet: no more claims past this
MAX_UNACKED: Final = 20_000
IDLE_S: Final = 0.05
# A busy round is followed by this short pause, not by the next round at once: answers
# and deliveries that come in meanwhile are recorded together. Back to back, rounds of
# one or two answers each were four write transactions apiece (record, claim, outbox
# claim, published), each a commit to disk, and the store's write lock and this loop
# (its calls' replies) waited on them: measured under `up`, 36% of the payments process
# was in BEGIN and COMMIT.
BUSY_ROUND_S: Final = 0.01
ERROR_PAUSE_S: Final = 1.0
# how long a stop waits for in-flight work and outbox acknowledgements
STOP_DEADLINE_S: Final = 10.0


class WorkSteps(Protocol):
    """A service's share of the worker: performing its durable work."""

    async def start(self) -> None:
        """Called once on the worker's loop before the first ``step``."""
        ...

    async def step(self, now: float) -> bool:
        """Claim, start and record work; whether anything happened (else the worker
        sleeps a little). Must not block the loop for long."""
        ...

    async def drain(self, deadline: float) -> None:
        """On stop: finish (or give up on, by the monotonic ``deadline``) what is in
        flight, recording what finished."""
        ...

    def idle(self) -> bool:
        """Nothing in flight and nothing due or waiting for a retry (as of the last step)."""
        ...

    async def close(self) -> None: ...


class OutboxPublisher:
    """Produce a store's unpublished outbox rows; mark them published once acked."""

    def __init__(
        self,
        name: str,
        store: OutboxStore,
        producer: Producer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.store = store
        self.producer = producer
        self._clock = clock
        self._acked: list[int] = []
        self._failed: list[int] = []
        self._unacked = 0
        self._failures = Repeats(every=50)
        self.published = 0

    def _callback(self, row_id: int) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, _msg: Any) -> None:
            self._unacked -= 1
            if err is None:
                self._acked.append(row_id)
            else:
                self._failed.append(row_id)
                if self._failures.failed():
                    log.warning(
                        "%s: outbox row %d not acknowledged (%s, %d in a row); producing it again",
                        self.name,
                        row_id,
                        err,
                        self._failures.count,
                    )

        return on_delivery

    def pump(self) -> bool:
        """Serve delivery reports, record acks, produce newly claimable rows; whether
        anything moved."""
        self.producer.poll(0)
        moved = self._settle()
        if self._unacked < MAX_UNACKED:
            rows = self.store.claim_outbox(self._clock(), OUTBOX_LEASE_S, OUTBOX_BATCH)
            for row in rows:
                # never blocks: a full local queue leaves the rest claimed, and their
                # lease brings them back
                if not self.producer.produce(
                    row.topic, row.value, row.key, on_delivery=self._callback(row.id), until=0.0
                ):
                    self._failed.append(row.id)
                    break
                self._unacked += 1
            moved = moved or bool(rows)
        return moved

    def _settle(self) -> bool:
        acked, self._acked = self._acked, []
        failed, self._failed = self._failed, []
        if acked:
            self.store.mark_published(acked, self._clock())
            self.published += len(acked)
            if self._failures.succeeded():
                log.info("%s: outbox records acknowledged again", self.name)
        if failed:
            self.store.release_outbox(failed)
        return bool(acked or failed)

    def flush(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for outstanding acks and record them."""
        self.producer.flush(max(0.0, timeout_s))
        self.producer.poll(0)
        self._settle()

    @property
    def unacked(self) -> int:
        return self._unacked


class Worker:
    """A thread that runs ``steps`` and publishes ``outbox`` until stopped."""

    def __init__(
        self,
        name: str,
        steps: WorkSteps,
        outbox: OutboxPublisher,
        *,
        idle_s: float = IDLE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.steps = steps
        self.outbox = outbox
        self.idle_s = idle_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = Repeats(every=50)
        self.rounds = 0
        # monotonic time since which rounds found nothing to do and nothing unpublished
        self.quiet_since: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = STOP_DEADLINE_S + 5.0) -> None:
        """Ask the loop to finish its in-flight work, publish, and end; wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("%s: worker did not stop within %.0fs", self.name, timeout_s)

    def wait_quiet(self, quiet_s: float) -> None:
        """Block until the worker had nothing to do for ``quiet_s`` (or was stopped):
        ``--idle-exit`` must not leave due work behind."""
        while not self._stop.is_set() and self.is_alive():
            since = self.quiet_since
            if since is not None and time.monotonic() - since >= quiet_s:
                return
            self._stop.wait(min(0.2, quiet_s))

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(self.main())
        except Exception:
            log.exception("%s: worker ended on an unexpected error", self.name)

    async def main(self) -> None:
        """The loop (public for tests that run it on their own loop)."""
        await self.steps.start()
        log.info("%s: worker started", self.name)
        try:
            while not self._stop.is_set():
                busy = await self._round()
                self.rounds += 1
                if busy or not self.steps.idle() or self.outbox.unacked:
                    self.quiet_since = None
                elif self.quiet_since is None:
                    self.quiet_since = time.monotonic()
                await asyncio.sleep(BUSY_ROUND_S if busy else self.idle_s)
            deadline = time.monotonic() + STOP_DEADLINE_S
            try:
                await self.steps.drain(deadline)
                self.outbox.pump()
                self.outbox.flush(deadline - time.monotonic())
            except Exception:
                log.exception("%s: stopping the worker", self.name)
        finally:
            await self.steps.close()
            log.info(
                "%s: worker stopped; %d events published, %d not acknowledged",
                self.name,
                self.outbox.published,
                self.outbox.unacked,
            )

    async def _round(self) -> bool:
        try:
            busy = await self.steps.step(self._clock())
            busy = self.outbox.pump() or busy
        except Exception as exc:
            if self._errors.failed():
                log.warning(
                    "%s: worker round failed (%d in a row), retrying in %.0fs: %s",
                    self.name,
                    self._errors.count,
                    ERROR_PAUSE_S,
                    exc,
                    exc_info=not isinstance(exc, OrderMeshError),
                )
            await asyncio.sleep(ERROR_PAUSE_S)
            return False
        if self._errors.succeeded():
            log.info("%s: worker rounds succeed again", self.name)
        return busy


def run_with_worker(runner: BatchRunner, worker: Worker, idle_exit_s: float | None) -> RunnerStats:
    """Run ``runner`` with ``worker`` beside it until a signal (or both are idle)."""

    def stop(*_: object) -> None:
        runner.request_stop()
        worker.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.start()
    try:
        stats = runner.run(idle_exit_s=idle_exit_s)
        if idle_exit_s is not None:
            # idle input is not idle work: shipments and retries still due finish first
            worker.wait_quiet(idle_exit_s)
        return stats
    finally:
        worker.stop()
