"""The consume -> handle -> produce -> commit loop every service runs.

Commit discipline (ARCHITECTURE.md, "Guarantees"): a batch's offsets are committed only
after the handler returned (its DB transaction is committed) and every record it asked
for, events and DLQ copies alike, was acknowledged by Kafka. A crash anywhere before the
commit redelivers the batch; handlers are idempotent per order_id, so that is safe.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from ordermesh.config import Settings
from ordermesh.errors import DeliveryError
from ordermesh.kafka.client import make_consumer, make_producer
from ordermesh.kafka.metrics import RunnerMetrics, sample_lag
from ordermesh.records import InRecord, OutRecord
from ordermesh.topics import DLQ

log = logging.getLogger(__name__)

DELIVERY_ATTEMPTS = 3
MAX_IN_FLIGHT = 2
LAG_SAMPLE_EVERY_S = 2.0
SUMMARY_EVERY_S = 10.0


class BatchHandler(Protocol):
    def handle(self, batch: list[InRecord]) -> list[OutRecord]: ...


@dataclass
class RunnerStats:
    """Counters of one runner, read by metrics and the final log line."""

    records_in: int = 0
    records_out: int = 0
    batches: int = 0
    commits: int = 0
    commit_failures: int = 0
    rebalances: int = 0
    last_batch_size: int = 0
    handle_seconds: float = 0.0
    produce_seconds: float = 0.0
    poll_seconds: float = 0.0
    # monotonic times of the first batch's start and the last successful commit
    first_batch_at: float | None = None
    last_commit_at: float | None = None
    assigned: set[tuple[str, int]] = field(default_factory=set)


class _Delivery:
    """Collects delivery reports of one batch."""

    __slots__ = ("failed", "pending")

    def __init__(self) -> None:
        self.pending = 0
        self.failed: list[tuple[OutRecord, str]] = []

    def callback(self, record: OutRecord) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, _msg: Any) -> None:
            self.pending -= 1
            if err is not None:
                self.failed.append((record, str(err)))

        return on_delivery


class _Batch:
    """A handled batch whose outputs are not all acknowledged yet."""

    __slots__ = ("attempts", "delivery", "offsets")

    def __init__(self, offsets: list[TopicPartition], delivery: _Delivery) -> None:
        self.offsets = offsets
        self.delivery = delivery
        self.attempts = 1


def _next_offsets(records: list[InRecord]) -> list[TopicPartition]:
    """The offsets to commit after ``records``: last offset + 1 per partition."""
    highest: dict[tuple[str, int], int] = {}
    for rec in records:
        key = (rec.topic, rec.partition)
        if rec.offset >= highest.get(key, -1):
            highest[key] = rec.offset
    return [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]


def to_in_record(msg: Any) -> InRecord:
    headers = msg.headers()
    return InRecord(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        msg.key(),
        msg.value(),
        headers if headers is not None else [],
        msg.timestamp()[1],
    )


class BatchRunner:
    """Runs ``handler`` over batches from ``topics`` in consumer group ``group``."""

    def __init__(
        self,
        settings: Settings,
        *,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        name: str,
        consumer: Consumer | None = None,
        producer: Producer | None = None,
        pipelined: bool = True,
    ) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.handler = handler
        self.name = name
        self.max_batch = settings.batch_max
        self.timeout = settings.batch_timeout_s
        self.consumer = consumer or make_consumer(settings, group, on_commit=self._on_commit)
        self.producer = producer or make_producer(settings)
        self.stats = RunnerStats()
        self._stop = threading.Event()
        self.pipelined = pipelined
        self._in_flight: deque[_Batch] = deque()
        self.metrics = RunnerMetrics(name, settings.group(group))
        self._dlq_topic = settings.topic(DLQ)

    # --- control ---------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    # --- rebalance callbacks ---------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not partitions:
            return  # the incremental protocol reports "nothing new" too
        self.stats.rebalances += 1
        self.metrics.rebalances.labels(self.name).inc()
        self.stats.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("%s: assigned %s", self.name, _fmt(partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # finish the in-flight batches and commit them before the partitions move on, so
        # the next owner does not redo them
        self._settle(drain=True)
        self.stats.rebalances += 1
        self.metrics.rebalances.labels(self.name).inc()
        self.stats.assigned -= {(p.topic, p.partition) for p in partitions}
        log.info("%s: revoked %s", self.name, _fmt(partitions))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions already belong to someone else: committing would be wrong, so
        # in-flight batches are forgotten (their outputs may still be delivered: the new
        # owner's redelivery then yields identical copies, which at-least-once allows).
        self._in_flight.clear()
        self.stats.rebalances += 1
        self.metrics.rebalances.labels(self.name).inc()
        self.stats.assigned -= {(p.topic, p.partition) for p in partitions}
        log.warning("%s: lost %s (not committing them)", self.name, _fmt(partitions))

    # --- loop ------------------------------------------------------------------------

    def run(self, *, idle_exit_s: float | None = None) -> RunnerStats:
        """Process until stopped (signal, ``request_stop``) or idle for ``idle_exit_s``."""
        self.consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info("%s: consuming %s", self.name, ", ".join(self.topics))
        if self.settings.metrics_port is not None:
            self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        last_summary = time.monotonic()
        last_lag = 0.0
        last_data = time.monotonic()
        summary_in = 0
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                msgs = self.consumer.consume(num_messages=self.max_batch, timeout=self.timeout)
                now = time.monotonic()
                if msgs:
                    self.stats.poll_seconds += now - t0
                if msgs:
                    records = self._records(msgs)
                    if records:
                        self.process(records)
                        last_data = now
                elif self._in_flight:
                    # nothing new: commit what has been acknowledged meanwhile
                    self._settle(wait=True)
                elif not self.stats.assigned:
                    last_data = now  # idle time counts only while we own partitions
                elif idle_exit_s is not None and now - last_data > idle_exit_s:
                    break
                if now - last_lag >= LAG_SAMPLE_EVERY_S:
                    self.metrics.lag = sample_lag(self.consumer, self.stats.assigned)
                    last_lag = now
                if now - last_summary >= SUMMARY_EVERY_S:
                    rate = (self.stats.records_in - summary_in) / (now - last_summary)
                    log.info(
                        "%s: %d in (%.0f/s), %d out, %d batches, %d commits",
                        self.name,
                        self.stats.records_in,
                        rate,
                        self.stats.records_out,
                        self.stats.batches,
                        self.stats.commits,
                    )
                    summary_in = self.stats.records_in
                    last_summary = now
        finally:
            self.close()
        return self.stats

    def _records(self, msgs: list[Any]) -> list[InRecord]:
        records = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                records.append(to_in_record(msg))
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.warning("%s: consumer error: %s", self.name, err)
        return records

    def process(self, records: list[InRecord]) -> None:
        """Handle one batch and produce its outputs; its offsets commit once all are acked.

        Pipelined: while the acks of a batch are outstanding the next batch is handled,
        and at most ``MAX_IN_FLIGHT`` batches wait. Commits stay in batch order.
        """
        t0 = time.perf_counter()
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.monotonic()
        outs = self.handler.handle(records)
        t1 = time.perf_counter()
        offsets = _next_offsets(records)
        if self.pipelined:
            delivery = _Delivery()
            for out in outs:
                delivery.pending += 1
                self._produce(out, delivery.callback(out))
            self.producer.poll(0)
            self._in_flight.append(_Batch(offsets, delivery))
            self._settle(wait=len(self._in_flight) > MAX_IN_FLIGHT)
        else:
            self._produce_all(outs)
            self._commit(offsets, asynchronous=False)
        t2 = time.perf_counter()
        self.metrics.observe_batch(
            Counter(r.topic for r in records),
            Counter(o.topic for o in outs),
            self._dlq_topic,
            t1 - t0,
            t2 - t1,
        )
        st = self.stats
        st.records_in += len(records)
        st.records_out += len(outs)
        st.batches += 1
        st.last_batch_size = len(records)
        st.handle_seconds += t1 - t0
        st.produce_seconds += t2 - t1

    def _settle(self, *, wait: bool = False, drain: bool = False) -> None:
        """Commit the acknowledged batches at the head of the queue, in order.

        ``wait``: block until at least the head batch is done; ``drain``: until all are.
        """
        done: list[_Batch] = []
        self.producer.poll(0)
        while self._in_flight:
            head = self._in_flight[0]
            if head.delivery.pending > 0:
                if not (wait or drain):
                    break
                self.producer.poll(0.005)
                continue
            if head.delivery.failed:
                self._retry(head)
                continue
            done.append(self._in_flight.popleft())
            wait = False
        if done:
            merged: dict[tuple[str, int], int] = {}
            for batch in done:
                for tp in batch.offsets:
                    merged[(tp.topic, tp.partition)] = tp.offset
            offsets = [TopicPartition(t, p, o) for (t, p), o in merged.items()]
            # the last commit before partitions move or the process ends is synchronous
            self._commit(offsets, asynchronous=not drain)

    def _retry(self, batch: _Batch) -> None:
        failed = batch.delivery.failed
        batch.attempts += 1
        log.warning(
            "%s: %d records not acknowledged (attempt %d): %s",
            self.name,
            len(failed),
            batch.attempts - 1,
            failed[0][1],
        )
        if batch.attempts > DELIVERY_ATTEMPTS:
            raise DeliveryError(
                f"{len(failed)} records not acknowledged after {DELIVERY_ATTEMPTS} tries"
            )
        retry = _Delivery()
        for out, _err in failed:
            retry.pending += 1
            self._produce(out, retry.callback(out))
        batch.delivery = retry

    def _produce_all(self, outs: list[OutRecord]) -> None:
        pending = outs
        for attempt in range(1, DELIVERY_ATTEMPTS + 1):
            delivery = _Delivery()
            for out in pending:
                delivery.pending += 1
                self._produce(out, delivery.callback(out))
            self.producer.flush()
            if delivery.pending:
                # flush() without a timeout returns only when the queue is empty
                raise DeliveryError(f"{delivery.pending} deliveries unreported after flush")
            if not delivery.failed:
                return
            log.warning(
                "%s: %d of %d records not acknowledged (attempt %d): %s",
                self.name,
                len(delivery.failed),
                len(pending),
                attempt,
                delivery.failed[0][1],
            )
            pending = [rec for rec, _ in delivery.failed]
        raise DeliveryError(
            f"{len(pending)} records not acknowledged after {DELIVERY_ATTEMPTS} tries"
        )

    def _produce(self, out: OutRecord, on_delivery: Callable[[Any, Any], None]) -> None:
        while True:
            try:
                self.producer.produce(
                    out.topic,
                    out.value,
                    out.key,
                    headers=out.headers or None,  # type: ignore[arg-type]
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                # local queue full: serve delivery reports to make room
                self.producer.poll(0.05)

    def _commit(self, offsets: list[TopicPartition], *, asynchronous: bool) -> None:
        try:
            if asynchronous:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            self.stats.commits += 1
            self.metrics.commits.labels(self.name).inc()
            self.stats.last_commit_at = time.monotonic()
        except KafkaException as exc:
            # e.g. the partitions moved during the batch: the new owner gets the batch
            # again and per-order idempotency makes that harmless
            self.stats.commit_failures += 1
            self.metrics.commit_failures.labels(self.name).inc()
            log.warning("%s: commit failed (%s); batch will be redelivered", self.name, exc)

    def _on_commit(self, err: Any, partitions: list[TopicPartition]) -> None:
        if err is not None:
            self.stats.commit_failures += 1
            self.metrics.commit_failures.labels(self.name).inc()
            log.warning("%s: async commit failed (%s); may be redelivered", self.name, err)

    def close(self) -> None:
        try:
            self._settle(drain=True)
            self.producer.flush(10)
        finally:
            self.consumer.close()
            self.metrics.stop()
        log.info(
            "%s: stopped after %d records in, %d out, %d batches",
            self.name,
            self.stats.records_in,
            self.stats.records_out,
            self.stats.batches,
        )


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"
