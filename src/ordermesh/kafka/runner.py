"""The consume -> handle -> produce -> commit loop every service runs.

Commit discipline (ARCHITECTURE.md, "Guarantees"): a batch's offsets are committed only
after the handler returned (its DB transaction is committed) and every record it asked
for, events and DLQ copies alike, was acknowledged by Kafka. A crash anywhere before the
commit redelivers the batch; handlers are idempotent per order_id, so that is safe. The
offsets of the batches done meanwhile are committed together, at most every
``COMMIT_EVERY_S``.

No input stops a partition for good, and none crashes the process:

- a message whose headers cannot be decoded never reaches the handler: the runner
  dead-letters it itself (key and value kept, class ``HeaderDecodeError``);
- a produce error a retry can cure (broker down, leader moving, timeout) is retried with
  back-off for as long as the runner runs;
- a permanent one (too large, not authorized, unknown topic, invalid record) on an output
  dead-letters the input it came from (stage ``produce``); on a DLQ copy it produces a
  size-bounded copy (value truncated, original headers dropped); if even that is refused,
  the partition is paused, logged once at ERROR and counted in
  ``ordermesh_partitions_blocked``, and nothing past that record is committed while the
  other partitions keep flowing;
- a database that fails a batch (``StoreError`` from the handler: nothing of the batch
  was stored) is a pause, not an end: the runner holds the batch, pauses its partitions
  while it keeps polling (the group keeps the member), hands the same batch to the
  handler again with back-off, and resumes once the handler takes it (``outage.py``).
  One WARNING when it starts, one INFO when it ends; ``ordermesh_store_unavailable`` is
  1 meanwhile. Nothing at or past the held batch is committed.

A stop (SIGTERM) waits at most ``STOP_DEADLINE_S`` for outstanding acknowledgements, then
exits without committing what was not acknowledged: the next run redoes it. A revoke
waits at most ``REVOKE_DEADLINE_S`` (the group waits for it only ``max.poll.interval.ms``),
then lets the revoked partitions go without committing what of them was not
acknowledged: their next owner redoes it. A fatal producer error stops the runner and
commits nothing of the batch it hit, nor of any batch after it.

Only partitions this member owns are committed, and a record of a partition revoked
or lost after it was fetched is not handled: its next owner gets it again.

Commits are asked again until the group coordinator confirms them, whatever the order in
which it reports on them (``confirmations.py``).

Which offsets may be committed when is decided in ``commits.py``; producing (with the
back-off on a full local queue) goes through ``producer.Producer``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from ordermesh.config import Settings
from ordermesh.errors import (
    AckDeadlineError,
    CommitError,
    ConfigError,
    DeliveryError,
    StoreError,
)
from ordermesh.kafka.assignment import Assignment, EveryPartition, Positions
from ordermesh.kafka.client import make_consumer
from ordermesh.kafka.commits import CommitQueue, InFlightBatch, commit
from ordermesh.kafka.confirmations import Confirmations
from ordermesh.kafka.metrics import RunnerMetrics, sample_lag
from ordermesh.kafka.outage import StoreOutage
from ordermesh.kafka.producer import Delivery, Producer, ProducerClient, is_permanent
from ordermesh.records import (
    ERROR_HEADER_PREFIX,
    HEADER_DECODE_ERROR,
    UNDECODABLE_HEADER,
    InRecord,
    OutRecord,
    dead_letter,
    header,
    is_truncated,
    truncated_dead_letter,
)
from ordermesh.topics import DLQ, SPECS
from ordermesh.topology import Fetch

log = logging.getLogger(__name__)

# batches handled while earlier ones await their acks: at most this many records' worth
# of full batches, and at most this many batches (small ones at low rates)
MAX_IN_FLIGHT = 2
MAX_IN_FLIGHT_BATCHES = 64
# how long an idle runner waits for a record while batches still await their acks (short:
# their offsets commit as soon as the acks arrive)
ACK_WAIT_S = 0.005
LAG_SAMPLE_EVERY_S = 2.0
SUMMARY_EVERY_S = 10.0
# how long a stop may wait for acknowledgements before it gives up on them
STOP_DEADLINE_S = 12.0
# how long a revoke may wait for acknowledgements: it runs inside the consumer's poll, and
# the group waits for it at most max.poll.interval.ms (120 s) before it fences the member
REVOKE_DEADLINE_S = 10.0
# a commit the coordinator has not confirmed this long after it was asked is asked again
RECOMMIT_EVERY_S = 2.0
# Offsets of done batches are committed at most this often (and always, synchronously,
# before partitions move on or the runner stops). At low rates batches are small, and a
# commit per batch was hundreds of OffsetCommit requests a second per service, each a
# write to the broker's offsets log; now it is at most ten. A crash redoes up to this
# much more work, which per-order idempotency makes harmless.
COMMIT_EVERY_S = 0.1
# after losing every partition (fenced) with none back this long, join with a new consumer
REJOIN_AFTER_S = 20.0
RETRY_BACKOFF_S = (0.5, 30.0)  # first and longest pause between retries of a batch
# longest poll during a store outage: a stop is seen this soon
OUTAGE_POLL_S = 0.2

FaultPoint = Literal["after-handle", "after-produce"]
FAULT_POINTS: Final[tuple[FaultPoint, ...]] = ("after-handle", "after-produce")
FAULT_ENV: Final = "ORDERMESH_FAULT"
FAULT_AFTER_ENV: Final = "ORDERMESH_FAULT_AFTER"


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
    undecodable: int = 0
    produce_retries: int = 0
    produce_dead_lettered: int = 0
    handle_seconds: float = 0.0
    produce_seconds: float = 0.0
    poll_seconds: float = 0.0
    # monotonic times of the first batch's start and the last successful commit
    first_batch_at: float | None = None
    last_commit_at: float | None = None
    last_poll_at: float | None = None
    assigned: set[tuple[str, int]] = field(default_factory=set)
    # (topic, partition) -> offset of the record that blocks it
    blocked: dict[tuple[str, int], int] = field(default_factory=dict)


def to_in_record(msg: Any) -> InRecord:
    """The record of a polled message; raises if its headers cannot be decoded."""
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


def undecodable_record(msg: Any, exc: BaseException) -> InRecord:
    """The record of a message whose headers could not be decoded: key and value kept,
    headers replaced by one ``UNDECODABLE_HEADER`` saying why."""
    # confluent-kafka decodes header names as UTF-8 and fails on the first bad one with a
    # SystemError (a UnicodeDecodeError as its cause). A second headers() call returns a
    # list holding a NULL: never call it again on this message.
    cause = exc.__cause__ or exc.__context__ or exc
    reason = f"header names are not valid UTF-8 ({type(cause).__name__}: {cause})"
    return InRecord(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        msg.key(),
        msg.value(),
        [(UNDECODABLE_HEADER, reason[:1000].encode("utf-8", "replace"))],
        msg.timestamp()[1],
    )


def read_record(msg: Any) -> InRecord:
    """``to_in_record``, or ``undecodable_record`` when the headers cannot be decoded."""
    try:
        return to_in_record(msg)
    except Exception as exc:  # noqa: BLE001 - SystemError/UnicodeDecodeError from the client
        return undecodable_record(msg, exc)


def _fault_from_env() -> tuple[FaultPoint | None, int]:
    """The crash-test fault hook: ``ORDERMESH_FAULT`` point and after how many batches."""
    point = os.environ.get(FAULT_ENV)
    if not point:
        return None, 0
    if point not in FAULT_POINTS:
        raise ConfigError(f"{FAULT_ENV}={point!r}: expected one of {', '.join(FAULT_POINTS)}")
    try:
        after = int(os.environ.get(FAULT_AFTER_ENV, "1"))
    except ValueError:
        raise ConfigError(f"{FAULT_AFTER_ENV} must be an integer") from None
    return point, max(1, after)


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
        producer: Producer | ProducerClient | None = None,
        pipelined: bool = True,
        outputs: Sequence[str] | None = None,
        assignment: Assignment = "group",
        positions: Positions | None = None,
        fetch: Fetch | None = None,
    ) -> None:
        """``outputs``: the topics the handler produces to (default: every mesh topic);
        the producer refuses locally what the smallest of their size limits would refuse.

        ``assignment``: ``group`` joins consumer group ``group``; ``every-partition``
        reads every partition of ``topics`` without joining, each from where
        ``positions`` says (default: the beginning), and commits under ``group``.

        ``fetch``: how long the broker may hold its consumer's fetches (``topology.Fetch``).
        """
        self.settings = settings
        self.topics = list(topics)
        self.handler = handler
        self.name = name
        self.max_batch = settings.batch_max
        self.timeout = settings.batch_timeout_s
        self._dlq_topic = settings.topic(DLQ)
        self._group = group
        # only a consumer of our own making can be replaced to rejoin the group
        self._can_rejoin = consumer is None and assignment == "group"
        self._fetch_tuning = fetch
        client = consumer or make_consumer(settings, group, fetch=fetch, on_commit=self._on_commit)
        self.consumer: Consumer | EveryPartition = (
            EveryPartition(client, positions) if assignment == "every-partition" else client
        )
        if producer is None:
            targets = outputs if outputs is not None else [settings.topic(s.name) for s in SPECS]
            producer = Producer.for_topics(settings, targets)
        elif not isinstance(producer, Producer):
            producer = Producer(producer)
        self.producer = producer
        self.stats = RunnerStats()
        self._stop = threading.Event()
        self._deadline: float | None = None
        self.pipelined = pipelined
        self.commits = CommitQueue(self.stats.blocked)
        self._blocked = self.stats.blocked
        self.metrics = RunnerMetrics(name, settings.group(group))
        # read once: the hook costs one `is None` test per batch when unset
        self._fault, self._fault_after = _fault_from_env()
        # the offsets asked to be committed against what the coordinator confirmed: one
        # whose commit failed, or whose report never came, is asked again
        self.confirmations = Confirmations(RECOMMIT_EVERY_S)
        self._last_recommit = 0.0
        # partitions revoked or lost during the current fetch (see _fetch)
        self._moved: set[tuple[str, int]] = set()
        # the fatal producer error that stopped the runner
        self._fatal: DeliveryError | None = None
        # offsets of done batches not committed yet (see COMMIT_EVERY_S)
        self._due: dict[tuple[str, int], int] = {}
        # when every partition was lost (fenced) and none came back since
        self._lost_all_at: float | None = None
        # the batch the store failed, while it is retried; the partitions paused for it
        self._outage: StoreOutage | None = None
        self._outage_paused: set[tuple[str, int]] = set()

    # --- control ---------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + STOP_DEADLINE_S
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
        self._lost_all_at = None
        log.info("%s: assigned %s", self.name, _fmt(partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self._moved |= gone
        # finish the in-flight batches and commit them before the partitions move on, so
        # the next owner does not redo them; but not for longer than the group waits
        try:
            self._settle(drain=True, until=time.monotonic() + REVOKE_DEADLINE_S)
        except AckDeadlineError:
            if self._deadline is not None and time.monotonic() > self._deadline:
                self._give_up()
            else:
                self._let_go(gone)
        finally:
            # even after a fatal producer error: nothing of them is committed any more
            self.stats.rebalances += 1
            self.metrics.rebalances.labels(self.name).inc()
            self.stats.assigned -= gone
            self._forget_commits(gone)
            self._unblock(gone)
            self._release_held(gone)
            log.info("%s: revoked %s", self.name, _fmt(partitions))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions already belong to someone else: committing them would be wrong,
        # so their offsets are dropped from the in-flight batches (their outputs may still
        # be delivered: the new owner's redelivery then yields identical copies, which
        # at-least-once allows). The other partitions' offsets stay and are committed.
        gone = {(p.topic, p.partition) for p in partitions}
        self._moved |= gone
        self.commits.drop_partitions(gone)
        self.stats.rebalances += 1
        self.metrics.rebalances.labels(self.name).inc()
        self.stats.assigned -= gone
        self._forget_commits(gone)
        self._unblock(gone)
        self._release_held(gone)
        if not self.stats.assigned:
            self._lost_all_at = time.monotonic()
        log.warning("%s: lost %s (not committing them)", self.name, _fmt(partitions))

    def _let_go(self, gone: set[tuple[str, int]]) -> None:
        """A revoke's deadline passed with batches not acknowledged: nothing more of the
        revoked partitions is committed (their outputs may still be delivered: the next
        owner's redo then yields identical copies, which at-least-once allows)."""
        waiting = sum(
            1
            for batch in self.commits.batches
            if any((tp.topic, tp.partition) in gone for tp in batch.offsets)
        )
        self.commits.drop_partitions(gone)
        log.warning(
            "%s: revoke of %s: %d batches not acknowledged after %.0fs; letting the "
            "partitions go without committing them (the next owner redoes them)",
            self.name,
            _fmt([TopicPartition(t, p) for t, p in sorted(gone)]),
            waiting,
            REVOKE_DEADLINE_S,
        )

    def _forget_commits(self, gone: set[tuple[str, int]]) -> None:
        for key in gone:
            self._due.pop(key, None)
        self.confirmations.forget(gone)

    # --- loop ------------------------------------------------------------------------

    def run(self, *, idle_exit_s: float | None = None) -> RunnerStats:
        """Process until stopped (signal, ``request_stop``) or idle for ``idle_exit_s``."""
        self._subscribe()
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
                if self._outage is not None:
                    self._ride_out()
                    now = last_data = time.monotonic()  # not idle: a batch is held
                    self.stats.last_poll_at = now
                else:
                    msgs = self._fetch()
                    now = time.monotonic()
                    self.stats.last_poll_at = now
                    if msgs:
                        self.stats.poll_seconds += now - t0
                        records, poison = self._records(msgs)
                        if records or poison:
                            self._process_or_hold(records, poison)
                            last_data = now
                    elif self.commits.batches or self._due:
                        # nothing new: commit what has been acknowledged meanwhile
                        self._settle(wait=bool(self.commits.batches))
                    elif not self.stats.assigned:
                        last_data = now  # idle time counts only while we own partitions
                        lost_at = self._lost_all_at
                        if lost_at is not None and now - lost_at > REJOIN_AFTER_S:
                            self._rejoin()
                    elif idle_exit_s is not None and now - last_data > idle_exit_s:
                        break
                if now - self._last_recommit >= RECOMMIT_EVERY_S:
                    # busy or idle: a partition whose commit failed may get no new batch
                    self._recommit(now, asynchronous=True)
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
        except AckDeadlineError:
            pass  # close() gives up on the rest and says so
        finally:
            self.close()
        return self.stats

    def _fetch(self) -> list[Any]:
        """The next batch: what is fetched already, at once; only when nothing is, wait
        (up to ``batch_timeout_s``) for the first record, and take it with whatever came
        along. A record never waits for a batch to fill: at low rates batches are small
        and quick, under a backlog they are full (``batch_max``). Likewise an output never
        waits for ``linger.ms`` while the runner has nothing else to do."""
        consumer = self.consumer
        msgs: list[Any] = consumer.consume(num_messages=self.max_batch, timeout=0)
        if msgs:
            return msgs
        if self.commits.batches and len(self.producer) > 0:
            # Idle with outputs lingering: send them now rather than after linger.ms.
            # Under a backlog this is never reached, and linger.ms batches as before.
            self.producer.flush(ACK_WAIT_S)
            msgs = consumer.consume(num_messages=self.max_batch, timeout=0)
            if msgs:
                return msgs
        wait = ACK_WAIT_S if self.commits.batches else self.timeout
        # a batch of one returns as soon as one record is there
        first: list[Any] = consumer.consume(num_messages=1, timeout=wait)
        if not first or self.max_batch == 1:
            return first
        moved = self._moved
        moved.clear()
        rest = list(consumer.consume(num_messages=self.max_batch - 1, timeout=0))
        if moved:
            # Revoked or lost during the second call: the records fetched before it are
            # the next owner's (the client drops those of its own call). None of them is
            # handled, so none is committed, and the next owner starts before them.
            first = [m for m in first if (m.topic(), m.partition()) not in moved]
            log.info(
                "%s: %s moved while fetching; leaving its fetched records to the next owner",
                self.name,
                _fmt([TopicPartition(t, p) for t, p in sorted(moved)]),
            )
        return first + rest

    def _records(self, msgs: list[Any]) -> tuple[list[InRecord], list[InRecord]]:
        """The decodable records of ``msgs`` and the undecodable ones (to dead-letter)."""
        records = []
        poison: list[InRecord] = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                try:
                    records.append(to_in_record(msg))
                except Exception as exc:  # noqa: BLE001 - see undecodable_record
                    poison.append(undecodable_record(msg, exc))
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.warning("%s: consumer error: %s", self.name, err)
        if self._blocked:
            # fetched before the pause: leave them to whoever unblocks the partition
            blocked = self._blocked
            records = [r for r in records if (r.topic, r.partition) not in blocked]
            poison = [r for r in poison if (r.topic, r.partition) not in blocked]
        return records, poison

    def process(self, records: list[InRecord], poison: Sequence[InRecord] = ()) -> None:
        """Handle one batch and produce its outputs; its offsets commit once all are acked.

        ``poison``: records that cannot be decoded; they skip the handler and go to the
        DLQ. Pipelined: while the acks of a batch are outstanding the next batch is
        handled, within ``_in_flight_full``. Commits stay in batch order.
        """
        t0 = time.perf_counter()
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.monotonic()
        outs = self.handler.handle(records) if records else []
        if self._fault is not None:
            self._fault_point("after-handle")
        t1 = time.perf_counter()
        if poison:
            outs = outs + [self._dead_letter_undecodable(rec) for rec in poison]
            records = records + list(poison)
        delivery = Delivery()
        self.producer.send_all(outs, delivery)
        self.producer.poll(0)
        self.commits.add(records, delivery)
        if self.pipelined:
            self._settle(wait=self._in_flight_full())
        else:
            # flush sends at once instead of waiting linger.ms; bounded, as the broker may
            # be down (the drain below keeps waiting, under the stop deadline)
            self.producer.flush(1.0)
            self._settle(drain=True)
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

    def _in_flight_full(self) -> bool:
        """True when no further batch may be handled before the oldest is acknowledged:
        ``MAX_IN_FLIGHT`` full batches' worth of records, or ``MAX_IN_FLIGHT_BATCHES``."""
        batches = self.commits.batches
        if len(batches) > MAX_IN_FLIGHT_BATCHES:
            return True
        limit = MAX_IN_FLIGHT * self.max_batch
        waiting = 0
        for batch in batches:
            waiting += len(batch.records)
            if waiting > limit:
                return True
        return False

    def _dead_letter_undecodable(self, rec: InRecord) -> OutRecord:
        reason = header(rec.headers, UNDECODABLE_HEADER) or b"headers not decodable"
        self.stats.undecodable += 1
        log.warning("%s: %s has undecodable headers; dead-lettering it", self.name, rec.where())
        return dead_letter(
            rec._replace(headers=[]),
            dlq_topic=self._dlq_topic,
            service=self.name,
            stage="decode",
            error_class=HEADER_DECODE_ERROR,
            message=reason.decode(errors="replace"),
        )

    def _settle(
        self, *, wait: bool = False, drain: bool = False, until: float | None = None
    ) -> None:
        """Commit the acknowledged batches at the head of the queue, in order.

        ``wait``: block until at least the head batch is done; ``drain``: until all are,
        or until the monotonic time ``until`` (and the stop deadline) passed: then what
        is done is committed and AckDeadlineError raised. A fatal producer error raises
        DeliveryError once what was done before it is committed.
        """
        done: list[InFlightBatch] = []
        queue = self.commits
        failure: AckDeadlineError | DeliveryError | None = None
        self.producer.poll(0)
        while queue.batches:
            head = queue.head()
            if head.delivery.pending > 0:
                if not (wait or drain):
                    break
                deadline = self._ack_deadline(until)
                if deadline is not None and time.monotonic() > deadline:
                    failure = AckDeadlineError(f"{self.name}: acknowledgements still outstanding")
                    break
                self.producer.poll(0.005)
                continue
            if head.delivery.failed:
                try:
                    self._resolve(head, self._ack_deadline(until))
                except DeliveryError as exc:
                    failure = exc
                    break
                continue
            done.append(queue.pop_head())
            wait = False
        if done:
            if self._fault is not None:
                self._fault_point("after-produce")
            assigned = self.stats.assigned
            for tp in queue.committable(done):
                key = (tp.topic, tp.partition)
                if key in assigned:  # a partition that moved on is its new owner's to commit
                    self._due[key] = tp.offset
        last = self.stats.last_commit_at
        final = drain or failure is not None
        if self._due and (final or last is None or time.monotonic() - last >= COMMIT_EVERY_S):
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._due.items()]
            self._due.clear()
            # the last commit before partitions move or the process ends is synchronous
            self._commit(offsets, asynchronous=not final)
        if failure is not None:
            raise failure

    def _ack_deadline(self, until: float | None) -> float | None:
        # read each time: a stop may come while acknowledgements are awaited
        stop = self._deadline
        if until is None:
            return stop
        return until if stop is None else min(stop, until)

    # --- store outages ---------------------------------------------------------------

    def _process_or_hold(self, records: list[InRecord], poison: list[InRecord]) -> None:
        """``process`` the batch; a ``StoreError`` from the handler starts an outage."""
        try:
            self.process(records, poison)
        except StoreError as exc:
            self._hold(records, poison, exc)

    def _hold(self, records: list[InRecord], poison: list[InRecord], exc: StoreError) -> None:
        """The store failed a batch: nothing of it was stored, produced or committed. Keep
        it to hand to the handler again, and stop fetching meanwhile."""
        now = time.monotonic()
        outage = self._outage = StoreOutage(records, poison, exc, now)
        self.metrics.store_unavailable.labels(self.name).set(1)
        self._pause_for_outage(set(self.stats.assigned) | outage.partitions())
        first = [TopicPartition(t, p, o) for (t, p), o in sorted(outage.first_offsets().items())]
        log.warning(
            "%s: store unavailable (%s); holding the batch of %d records (from %s on, "
            "nothing is committed), %d partitions paused, retrying it in %.1fs and backing "
            "off up to %.1fs",
            self.name,
            outage.error,
            len(outage),
            _fmt_offsets(first),
            len(self._outage_paused),
            outage.delay,
            outage.cap,
        )

    def _ride_out(self) -> None:
        """One turn of the loop during a store outage: poll (the group keeps the member),
        hold what still comes in, commit what earlier batches got acknowledged, and hand
        the held batch to the handler again once its back-off is over."""
        outage = self._outage
        if outage is None:
            return
        now = time.monotonic()
        if outage.empty:
            self._end_outage(now, recovered=False)
            return
        if not outage.due(now):
            wait = min(OUTAGE_POLL_S, outage.wait_s(now))
            msgs = self.consumer.consume(num_messages=self.max_batch, timeout=wait)
            if msgs:
                records, poison = self._records(msgs)
                if records or poison:
                    self._pause_for_outage(outage.hold(records, poison))
            if self.commits.batches or self._due:
                self._settle()
            return
        outage.retrying()
        self.metrics.store_retries.labels(self.name).inc()
        try:
            self.process(outage.records, outage.poison)
        except StoreError as exc:
            outage.failed(exc, time.monotonic())
            log.debug(
                "%s: store still unavailable (retry %d, next in %.1fs): %s",
                self.name,
                outage.retries,
                outage.delay,
                outage.error,
            )
            return
        self._end_outage(time.monotonic(), recovered=True)

    def _end_outage(self, now: float, *, recovered: bool) -> None:
        outage = self._outage
        if outage is None:
            return
        self._outage = None
        # a partition blocked meanwhile stays paused (see _block)
        resume = {key for key in self._outage_paused if key not in self._blocked}
        self._outage_paused = set()
        self._resume(resume)
        self.metrics.store_unavailable.labels(self.name).set(0)
        if recovered:
            log.info(
                "%s: store available again after %.1fs and %d retries; resumed %d partitions",
                self.name,
                outage.lasted(now),
                outage.retries,
                len(resume),
            )
        else:
            log.info(
                "%s: every partition of the held batch moved on after %.1fs and %d retries "
                "of the store; resumed %d partitions",
                self.name,
                outage.lasted(now),
                outage.retries,
                len(resume),
            )

    def _pause_for_outage(self, partitions: set[tuple[str, int]]) -> None:
        new = {
            key
            for key in partitions
            if key in self.stats.assigned
            and key not in self._blocked
            and key not in self._outage_paused
        }
        if not new:
            return
        tps = [TopicPartition(t, p) for t, p in sorted(new)]
        try:
            self.consumer.pause(tps)
        except KafkaException as exc:
            # not fatal: what still comes in joins the held batch and is paused again
            log.warning("%s: pausing %s: %s", self.name, _fmt(tps), exc)
            return
        self._outage_paused |= new

    def _resume(self, partitions: set[tuple[str, int]]) -> None:
        if not partitions:
            return
        tps = [TopicPartition(t, p) for t, p in sorted(partitions)]
        try:
            self.consumer.resume(tps)
        except KafkaException as exc:
            log.warning("%s: resuming %s: %s", self.name, _fmt(tps), exc)

    def _release_held(self, gone: set[tuple[str, int]]) -> None:
        """Partitions revoked or lost during a store outage: their held records are their
        next owner's (none was committed), and their pause is lifted, so that they are
        fetched again should they come back to this member."""
        paused = self._outage_paused & gone
        if paused:
            self._outage_paused -= paused
            self._resume(paused)
        if self._outage is not None:
            self._outage.drop(gone)

    # --- produce errors --------------------------------------------------------------

    def _resolve(self, batch: InFlightBatch, deadline: float | None = None) -> None:
        """Deal with the refused records of ``batch``: retry, dead-letter or block; the
        pause before a retry ends at the monotonic time ``deadline``."""
        failed = batch.delivery.failed
        fatal = next(((out, err) for out, err in failed if _is_fatal(err)), None)
        if fatal is not None:
            self._fail(*fatal)
        batch.delivery.failed = []
        retry: list[OutRecord] = []
        for out, err in failed:
            permanent = is_permanent(err)
            self.metrics.produce_errors.labels(
                self.name, err.name(), "permanent" if permanent else "retriable"
            ).inc()
            if not permanent:
                retry.append(out)
                continue
            replacement = self._after_permanent(batch, out, err)
            if replacement is not None:
                self.metrics.dlq_writes.labels(self.name).inc()
                self.producer.send_all((replacement,), batch.delivery)
        if retry:
            batch.attempts += 1
            self.stats.produce_retries += len(retry)
            low, high = RETRY_BACKOFF_S
            pause = min(high, low * 2 ** (batch.attempts - 2))
            log.warning(
                "%s: %d records not acknowledged (attempt %d), retrying in %.1fs: %s",
                self.name,
                len(retry),
                batch.attempts - 1,
                pause,
                _describe(retry[0], failed),
            )
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            # a stop wakes this up; the retry then runs under the stop deadline
            self._stop.wait(pause)
            self.producer.send_all(retry, batch.delivery)

    def _fail(self, out: OutRecord, err: KafkaError) -> None:
        """A fatal producer error: the idempotent producer is unusable, a restart gets a
        new one. Nothing of the batch it hit is committed, nor of any later batch
        (commits keep batch order): the next run redoes them."""
        self.metrics.produce_errors.labels(self.name, err.name(), "fatal").inc()
        dropped = self.commits.clear()
        self._fatal = DeliveryError(f"fatal producer error on {out.topic}: {err}")
        log.error(
            "%s: fatal producer error on %s (%s); stopping without committing the %d "
            "batches not acknowledged (they will be redelivered)",
            self.name,
            out.topic,
            err,
            dropped,
        )
        self._stop.set()
        raise self._fatal

    def _after_permanent(
        self, batch: InFlightBatch, out: OutRecord, err: KafkaError
    ) -> OutRecord | None:
        """The record to produce instead of ``out``, which Kafka refused for good; None
        when there is none (the partition is then blocked)."""
        why = f"producing to {out.topic} failed: {err.str()}"
        if out.topic != self._dlq_topic:
            source = out.source or _same_key(batch.records, out.key)
            if source is not None:
                self.stats.produce_dead_lettered += 1
                log.warning("%s: %s: %s; dead-lettering it", self.name, source.where(), why)
                return dead_letter(
                    source,
                    dlq_topic=self._dlq_topic,
                    service=self.name,
                    stage="produce",
                    error_class=err.name(),
                    message=why,
                )
        elif not is_truncated(out):
            log.warning("%s: DLQ copy refused (%s); sending a truncated copy", self.name, why)
            return truncated_dead_letter(out)
        where = _origin(out, batch)
        if where is None:
            # nothing tells which input this was: none of the batch's partitions may move
            for tp in batch.offsets:
                self._block(tp.topic, tp.partition, batch.first_offset(tp.topic, tp.partition), why)
        else:
            self._block(*where, why)
        return None

    def _block(self, topic: str, partition: int, offset: int, why: str) -> None:
        key = (topic, partition)
        if key not in self.stats.assigned:
            return  # already revoked or lost: the next owner retries it
        if not self.commits.block(key, offset):
            return
        self.consumer.pause([TopicPartition(topic, partition)])
        self.metrics.partitions_blocked.labels(self.name).set(len(self._blocked))
        log.error(
            "%s: %s[%d]@%d blocked: not processable and not dead-letterable (%s); "
            "partition paused, nothing from this offset on is committed",
            self.name,
            topic,
            partition,
            offset,
            why,
        )

    def _unblock(self, partitions: set[tuple[str, int]]) -> None:
        # the next owner starts from the committed offset and tries the record again
        if self.commits.unblock(partitions):
            self.metrics.partitions_blocked.labels(self.name).set(len(self._blocked))

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _rejoin(self) -> None:
        """Every partition was lost (fenced after a broker stall) and none came back:
        leave the group for good and join again with a new consumer."""
        self._lost_all_at = None
        if not self._can_rejoin:
            return
        log.warning(
            "%s: no partitions for %.0fs since they were lost; rejoining group %s",
            self.name,
            REJOIN_AFTER_S,
            self._group,
        )
        old = self.consumer
        self.consumer = make_consumer(
            self.settings, self._group, fetch=self._fetch_tuning, on_commit=self._on_commit
        )
        try:
            old.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("%s: closing the old consumer: %s", self.name, exc)
        self._subscribe()

    def _recommit(self, now: float, *, asynchronous: bool, min_age: float | None = None) -> None:
        """Commit again the asked offsets the coordinator has not confirmed, of
        partitions still ours, asked at least ``min_age`` (``RECOMMIT_EVERY_S``) ago."""
        self._last_recommit = now
        offsets = self.confirmations.stale(self.stats.assigned, now, min_age=min_age)
        if offsets:
            log.info(
                "%s: committing again what the coordinator has not confirmed: %s",
                self.name,
                _fmt_offsets(offsets),
            )
            self._commit(offsets, asynchronous=asynchronous)

    def _commit(self, offsets: list[TopicPartition], *, asynchronous: bool) -> None:
        now = time.monotonic()
        self.confirmations.asked(offsets, now)
        try:
            answer = commit(self.consumer, offsets, asynchronous=asynchronous)
            if not asynchronous:
                # without an answer (a stand-in client) the commit is taken as confirmed
                self._on_commit(None, offsets if answer is None else answer)
            self.stats.commits += 1
            self.metrics.commits.labels(self.name).inc()
            self.stats.last_commit_at = now
        except CommitError as exc:
            # e.g. the partitions moved during the batch: the new owner gets the batch
            # again and per-order idempotency makes that harmless
            self.stats.commit_failures += 1
            self.metrics.commit_failures.labels(self.name).inc()
            log.warning("%s: commit failed (%s); will commit again", self.name, exc)

    def _on_commit(self, err: Any, partitions: list[TopicPartition]) -> None:
        if err is None:
            self.confirmations.confirmed([tp for tp in partitions if tp.error is None])
            err = next((tp.error for tp in partitions if tp.error is not None), None)
        if err is not None:
            # nothing to remember: what is asked and not confirmed is asked again
            self.stats.commit_failures += 1
            self.metrics.commit_failures.labels(self.name).inc()
            log.warning(
                "%s: commit of %s failed (%s); will commit again",
                self.name,
                _fmt_offsets(partitions),
                err,
            )

    def _fault_point(self, point: FaultPoint) -> None:
        """Crash-test hook: SIGKILL this process at ``point`` after N batches."""
        if point != self._fault:
            return
        self._fault_after -= 1
        if self._fault_after <= 0:
            log.warning("%s: %s=%s reached: killing the process", self.name, FAULT_ENV, point)
            os.kill(os.getpid(), signal.SIGKILL)

    def _give_up(self) -> None:
        """After the stop deadline: forget what is not acknowledged, commit nothing of it."""
        if self.commits.batches:
            log.warning(
                "%s: stop deadline of %.0fs passed with %d batches not acknowledged; "
                "exiting without committing them (they will be redelivered)",
                self.name,
                STOP_DEADLINE_S,
                self.commits.clear(),
            )
        self.producer.purge()  # at-least-once: what is unacked is redone by the next run

    def close(self) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + STOP_DEADLINE_S
        outage = self._outage
        if outage is not None and not outage.empty:
            log.info(
                "%s: stopping with the store unavailable for %.1fs; the held batch of %d "
                "records is not committed (it is handled again on the next start)",
                self.name,
                outage.lasted(time.monotonic()),
                len(outage),
            )
        try:
            try:
                self._settle(drain=True)
                if self._fatal is None:
                    self.producer.flush(max(0.0, self._deadline - time.monotonic()))
            except AckDeadlineError:
                self._give_up()
            except DeliveryError:
                pass  # raised again below, once the consumer is closed
            if self._fatal is not None:
                self.producer.purge()  # unusable: nothing it still holds is waited for
            # asynchronous: with the coordinator away a synchronous commit could hold
            # the stop; the close below waits for what is in flight
            self._recommit(time.monotonic(), asynchronous=True, min_age=0.0)
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
        if self._fatal is not None:
            raise self._fatal


def _is_fatal(err: KafkaError) -> bool:
    """A producer error after which the idempotent producer cannot go on (``_FATAL``:
    a record queued after the fatal error was raised)."""
    return bool(err.fatal()) or err.code() == KafkaError._FATAL


def _same_key(records: list[InRecord], key: bytes | None) -> InRecord | None:
    """The last record of ``records`` with ``key`` (services key every output by order_id)."""
    if key is None:
        return None
    for rec in reversed(records):
        if rec.key == key:
            return rec
    return None


def _origin(out: OutRecord, batch: InFlightBatch) -> tuple[str, int, int] | None:
    """topic, partition and offset of the input a DLQ record ``out`` stands for."""
    if out.source is not None:
        return out.source.topic, out.source.partition, out.source.offset
    topic = header(out.headers, ERROR_HEADER_PREFIX + "topic")
    partition = header(out.headers, ERROR_HEADER_PREFIX + "partition")
    offset = header(out.headers, ERROR_HEADER_PREFIX + "offset")
    if topic is not None and partition is not None and offset is not None:
        try:
            return topic.decode(), int(partition), int(offset)
        except ValueError:
            pass
    source = _same_key(batch.records, out.key)
    return None if source is None else (source.topic, source.partition, source.offset)


def _describe(out: OutRecord, failed: list[tuple[OutRecord, KafkaError]]) -> str:
    for record, err in failed:
        if record is out:
            return f"{out.topic}: {err.name()} ({err.str()})"
    return out.topic


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"


def _fmt_offsets(offsets: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]@{p.offset}" for p in offsets) or "nothing"
