"""The payments process: intents from ``order-events``, gateway calls in a worker.

- The runner (``apps/base.py``) feeds ``PaymentsService``, which records each order's
  intents in the payments store; its offsets commit behind them.
- A ``Worker`` thread (``apps/worker.py``) runs ``PaymentSteps`` on an asyncio loop
  with its own store connection, gateway client and producer: it claims due rows under
  a lease, keeps at most ``payments_concurrency`` gateway calls in flight (a slow
  gateway holds calls, not a partition), records each answer with its events in the
  outbox, and the outbox is produced and marked published after the ack.

Gateway answers, as ``gateway/protocol.py`` says to treat them: a decision is recorded;
``GatewayUnavailableError`` retries later with back-off, same key; an unknown outcome
is looked up by its key (found: that is the outcome; not found: retried, same key). A
key is never replaced, so an order is never charged twice. The gateway going away is
one WARNING and its return one INFO, with counts; a summary every ``SUMMARY_EVERY_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, fields
from typing import Final, Literal, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from ordermesh.apps.base import service_runner
from ordermesh.apps.worker import OutboxPublisher, Worker, run_with_worker
from ordermesh.config import Settings
from ordermesh.errors import GatewayError, GatewayUnavailableError, GatewayUnknownOutcomeError
from ordermesh.gateway.protocol import Operation, Outcome, PaymentGateway, operation_key
from ordermesh.kafka.producer import Producer
from ordermesh.kafka.runner import BatchRunner, RunnerStats
from ordermesh.services.payments import (
    UNKNOWN_RETRY_S,
    PaymentsService,
    after_failure,
    apply_outcome,
    outbox_records,
)
from ordermesh.stores.factory import open_payments_store
from ordermesh.stores.payments import PaymentRow, PaymentsStore
from ordermesh.topics import DLQ, EVENTS
from ordermesh.topology import ServiceSpec, service

log = logging.getLogger(__name__)

SPEC: Final[ServiceSpec] = service("payments")
SUMMARY_EVERY_S: Final = 10.0
DUE_COUNT_EVERY_S: Final = 2.0
# rows claimed per round at most (the concurrency bounds it too)
CLAIM_BATCH: Final = 500

GatewayFactory = Callable[[], PaymentGateway]


class NotDecided(NamedTuple):
    """A try after which the gateway's decision is still unknown: retry, same key."""

    why: Literal["unavailable", "unknown", "error"]
    detail: str
    # the pause before the retry; None: the back-off
    delay_s: float | None = None


@dataclass
class PaymentStats:
    """Counters of the worker since start (the gauges are refreshed every round)."""

    authorized: int = 0
    declined: int = 0
    captured: int = 0
    voided: int = 0
    refunded: int = 0
    failed: int = 0
    retries: int = 0
    unknown_outcomes: int = 0
    # outcomes of a lease another worker took over meanwhile (its outcome is recorded)
    lost_claims: int = 0
    in_flight: int = 0
    due: int = 0

    def snapshot(self) -> PaymentStats:
        return PaymentStats(**{f.name: getattr(self, f.name) for f in fields(self)})


_DONE_STATE: Final[dict[str, str]] = {
    "authorized": "authorized",
    "declined": "declined",
    "captured": "captured",
    "voided": "voided",
    "refunded": "refunded",
    "failed": "failed",
}


class PaymentSteps:
    """The worker's payments steps: claim due rows, call the gateway, record answers."""

    def __init__(
        self,
        store: PaymentsStore,
        gateway_factory: GatewayFactory,
        *,
        events_topic: str,
        concurrency: int,
        timeout_s: float,
        name: str = "payments",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.name = name
        self.events_topic = events_topic
        self.concurrency = concurrency
        # an outer bound on a call the client should already time out itself
        self.call_guard_s = 2 * timeout_s
        # a call plus its look-up, both at their guard, fit in the lease with room
        self.lease_s = 2 * self.call_guard_s + 5.0
        self.token = uuid.uuid4().hex
        self.stats = PaymentStats()
        self._clock = clock
        self._factory = gateway_factory
        self._gateway: PaymentGateway | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: list[tuple[PaymentRow, Outcome | NotDecided]] = []
        self._down_since: float | None = None
        self._retries_while_down = 0
        self._last_due = -DUE_COUNT_EVERY_S
        self._last_summary = time.monotonic()
        self._summarised = self.stats.snapshot()

    @property
    def gateway(self) -> PaymentGateway:
        if self._gateway is None:
            raise RuntimeError("PaymentSteps.start() was not called")
        return self._gateway

    async def start(self) -> None:
        self._gateway = self._factory()

    async def close(self) -> None:
        if self._gateway is not None:
            await self._gateway.close()

    def idle(self) -> bool:
        return not self._tasks and not self._done and self.stats.due == 0

    async def step(self, now: float) -> bool:
        moved = self._record(now)
        claimed: list[PaymentRow] = []
        free = self.concurrency - len(self._tasks)
        if free > 0:
            claimed = self.store.claim(now, self.lease_s, min(free, CLAIM_BATCH), self.token)
            for row in claimed:
                task = asyncio.create_task(self._perform(row))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self.stats.in_flight = len(self._tasks)
        mono = time.monotonic()
        # a count over the due rows: every few seconds while calls are in flight, not every
        # round (that was a tenth of the process under load); at once when all settled
        running = any(not task.done() for task in self._tasks)
        settled = not running and (moved or bool(claimed))
        if settled or mono - self._last_due >= DUE_COUNT_EVERY_S:
            self.stats.due = self.store.due_count()
            self._last_due = mono
        if mono - self._last_summary >= SUMMARY_EVERY_S:
            self._summary(mono)
        return moved or bool(claimed)

    async def drain(self, deadline: float) -> None:
        if self._tasks:
            log.info("%s: stopping; waiting for %d gateway calls", self.name, len(self._tasks))
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        self._record(self._clock())

    # --- one operation ---------------------------------------------------------------

    async def _perform(self, row: PaymentRow) -> None:
        try:
            result = await self.call(row)
        except asyncio.CancelledError:
            # stopping: released now rather than when the lease runs out; the retry uses
            # the same key, so a call that did land is not applied twice
            self._done.append((row, NotDecided("unknown", "cancelled on stop", 0.0)))
            raise
        self._done.append((row, result))

    async def call(self, row: PaymentRow) -> Outcome | NotDecided:
        """The gateway's decision on ``row.op``, or why there is none yet."""
        op = row.op
        if op is None:
            return NotDecided("error", "no operation to perform")
        key = operation_key(row.order_id, op)
        try:
            return await asyncio.wait_for(self._invoke(op, key, row), self.call_guard_s)
        except GatewayUnavailableError as exc:
            return NotDecided("unavailable", str(exc))
        except (GatewayUnknownOutcomeError, TimeoutError) as exc:
            self.stats.unknown_outcomes += 1
            return await self._resolve(key, exc)
        except GatewayError as exc:
            # refused as a bad request: a retry cannot help, but neither may the row be
            # given up (the key stays the one); an operator's case, retried slowly
            log.error("%s: gateway refused %s: %s", self.name, key, exc)
            return NotDecided("error", str(exc))
        except Exception as exc:
            log.exception("%s: %s of order %s failed unexpectedly", self.name, op, row.order_id)
            return NotDecided("error", repr(exc))

    async def _resolve(self, key: str, cause: BaseException) -> Outcome | NotDecided:
        """An unknown outcome: the gateway's record of ``key`` decides."""
        try:
            found = await asyncio.wait_for(self.gateway.lookup(key), self.call_guard_s)
        except (GatewayError, TimeoutError) as exc:
            # still unknown: retrying the call with the same key is safe either way
            return NotDecided("unavailable", f"look-up of {key} failed: {exc!r}")
        if found is not None:
            log.info("%s: unknown outcome of %s resolved by look-up (%s)", self.name, key, cause)
            return found
        return NotDecided("unknown", f"{key} was never applied", UNKNOWN_RETRY_S)

    async def _invoke(self, op: Operation, key: str, row: PaymentRow) -> Outcome:
        gateway = self.gateway
        if op == "authorize":
            return await gateway.authorize(
                key,
                order_id=row.order_id,
                amount_cents=row.amount_cents,
                currency=row.currency,
                customer_id=row.customer_id,
                card=row.card,
            )
        if op == "capture":
            return await gateway.capture(
                key, authorization_id=row.authorization_id, amount_cents=row.amount_cents
            )
        if op == "void":
            return await gateway.void(key, authorization_id=row.authorization_id)
        return await gateway.refund(
            key, authorization_id=row.authorization_id, amount_cents=row.amount_cents
        )

    # --- recording ---------------------------------------------------------------------

    def _record(self, now: float) -> bool:
        """Record the answers that came in, with their events, in one transaction."""
        done, self._done = self._done, []
        if not done:
            return False
        try:
            self._record_all(done, now)
        except BaseException:
            self._done = done + self._done  # tried again next round; leases still hold
            raise
        return True

    def _record_all(self, done: list[tuple[PaymentRow, Outcome | NotDecided]], now: float) -> None:
        stats = self.stats
        unavailable: NotDecided | None = None
        decided = 0
        with self.store.transaction():
            current = self.store.load({row.order_id for row, _ in done})
            saves: dict[str, PaymentRow] = {}
            outbox = []
            for claimed, result in done:
                row = current.get(claimed.order_id)
                if row is None or row.claim_token != claimed.claim_token or claimed.op is None:
                    stats.lost_claims += 1
                    continue
                if isinstance(result, Outcome):
                    new, events = apply_outcome(row, claimed.op, result, now)
                    decided += 1
                    state = _DONE_STATE.get(new.state)
                    if state is not None and new.state != row.state:
                        setattr(stats, state, getattr(stats, state) + 1)
                    if new.state == "failed":
                        log.error(
                            "%s: the gateway refused the %s of order %s (%s); the order needs"
                            " an operator",
                            self.name,
                            claimed.op,
                            row.order_id,
                            result.reason or "no reason",
                        )
                    outbox += outbox_records(self.events_topic, row.order_id, events)
                else:
                    new = after_failure(row, now, result.delay_s)
                    stats.retries += 1
                    if result.why == "unavailable":
                        unavailable = result
                current[row.order_id] = saves[row.order_id] = new
            self.store.save(list(saves.values()))
            self.store.add_outbox(outbox, now)
        self._availability(unavailable, decided, sum(isinstance(r, NotDecided) for _, r in done))

    def _availability(self, unavailable: NotDecided | None, decided: int, retries: int) -> None:
        """One WARNING when the gateway goes away, one INFO when it is back."""
        if self._down_since is None:
            if unavailable is not None and not decided:
                self._down_since = time.monotonic()
                self._retries_while_down = retries
                log.warning(
                    "%s: payment gateway unavailable (%s); %d calls in flight, %d orders"
                    " due, retrying with back-off",
                    self.name,
                    unavailable.detail,
                    len(self._tasks),
                    self.stats.due,
                )
            return
        self._retries_while_down += retries
        if decided:
            log.info(
                "%s: payment gateway back after %.1fs; %d retries meanwhile, %d orders due",
                self.name,
                time.monotonic() - self._down_since,
                self._retries_while_down,
                self.stats.due,
            )
            self._down_since = None

    def _summary(self, mono: float) -> None:
        now, before = self.stats.snapshot(), self._summarised
        moved = {
            f.name: getattr(now, f.name) - getattr(before, f.name)
            for f in fields(now)
            if f.name not in ("in_flight", "due")
        }
        if any(moved.values()) or now.in_flight or now.due:
            log.info(
                "%s: last %.0fs: %s; %d in flight, %d due",
                self.name,
                mono - self._last_summary,
                ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in moved.items() if n) or "idle",
                now.in_flight,
                now.due,
            )
        self._summarised = now
        self._last_summary = mono


class PaymentsCollector(Collector):
    """The worker's counters on the process's ``/metrics``."""

    def __init__(self, stats: PaymentStats, service_name: str = "payments") -> None:
        self._stats = stats
        self._service = service_name

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._stats
        ops = CounterMetricFamily(
            "ordermesh_payments_outcomes",
            "Gateway decisions recorded, by outcome.",
            labels=["service", "outcome"],
        )
        for outcome in _DONE_STATE:
            ops.add_metric([self._service, outcome], getattr(s, outcome))
        yield ops
        for name, help_text in (
            ("retries", "Gateway tries that decided nothing (retried with the same key)."),
            ("unknown_outcomes", "Gateway calls without an answer (looked up by key)."),
        ):
            counter = CounterMetricFamily(
                f"ordermesh_payments_{name}", help_text, labels=["service"]
            )
            counter.add_metric([self._service], getattr(s, name))
            yield counter
        for name, help_text in (
            ("in_flight", "Gateway calls in flight."),
            ("pending", "Orders with a gateway operation due or waiting for a retry."),
        ):
            gauge = GaugeMetricFamily(f"ordermesh_payments_{name}", help_text, labels=["service"])
            gauge.add_metric([self._service], s.in_flight if name == "in_flight" else s.due)
            yield gauge


def payments_runner(settings: Settings, store: PaymentsStore) -> BatchRunner:
    core = PaymentsService(
        store, events_topic=settings.topic(EVENTS), dlq_topic=settings.topic(DLQ)
    )
    return service_runner(settings, SPEC, core)


def payments_worker(
    settings: Settings,
    store: PaymentsStore,
    gateway_factory: GatewayFactory,
    *,
    registry: CollectorRegistry | None = None,
) -> Worker:
    """The worker performing payments' gateway calls; its counters on ``registry``."""
    steps = PaymentSteps(
        store,
        gateway_factory,
        events_topic=settings.topic(EVENTS),
        concurrency=settings.payments_concurrency,
        timeout_s=settings.payments_timeout_s,
    )
    if registry is not None:
        registry.register(PaymentsCollector(steps.stats))
    producer = Producer.for_topics(settings, [settings.topic(EVENTS)])
    return Worker(SPEC.name, steps, OutboxPublisher(SPEC.name, store, producer))


def _default_gateway(settings: Settings) -> GatewayFactory:
    def make() -> PaymentGateway:
        from ordermesh.gateway.client import open_gateway

        return open_gateway(settings)

    return make


def run_payments(
    settings: Settings,
    *,
    idle_exit_s: float | None = None,
    gateway_factory: GatewayFactory | None = None,
) -> RunnerStats:
    """The payments service until SIGTERM/SIGINT (or idle, with no work left)."""
    factory = gateway_factory or _default_gateway(settings)
    with (
        closing(open_payments_store(settings)) as store,
        closing(open_payments_store(settings)) as work_store,
    ):
        runner = payments_runner(settings, store)
        worker = payments_worker(settings, work_store, factory, registry=runner.metrics.registry)
        return run_with_worker(runner, worker, idle_exit_s)
