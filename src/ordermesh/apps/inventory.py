"""The inventory process: the core over its store and the runner, plus the deadline sweep.

The sweep is a daemon thread beside the runner, with its own store connection and its
own producer. Every ``sweep_every_s`` it reads (no transaction, no locks) the RESERVED
orders past their deadline and the reorders that are due, and asks for them on
``order-commands``: ``ExpireReservation`` keyed by the order (so it is ordered with the
order's cancels) and ``Restock`` keyed by the sku. It writes nothing to the database:
the core decides each command when it consumes it, re-checking the deadline and applying
a restock once per restock id, so the duplicates that N instances' sweeps send (or one
sweep sends again after a lost delivery) are no-ops. It stops with the runner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import Final

from ordermesh import schema
from ordermesh.apps.base import run_until_stopped, service_runner
from ordermesh.config import Settings
from ordermesh.kafka.producer import Producer
from ordermesh.kafka.runner import BatchRunner, RunnerStats
from ordermesh.repeats import Repeats
from ordermesh.schema import ExpireReservation, Restock
from ordermesh.services.inventory import InventoryService
from ordermesh.stores.factory import open_inventory_store
from ordermesh.stores.inventory import InventoryStore
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS
from ordermesh.topology import ServiceSpec, service

logger = logging.getLogger(__name__)

SPEC: Final[ServiceSpec] = service("inventory")

# Most commands of each kind one pass asks for: a backlog of expiries (a stopped mesh
# restarted) is worked off over several passes instead of one burst, oldest first.
EXPIRIES_PER_PASS: Final = 1000
RESTOCKS_PER_PASS: Final = 100
# An order (or a restock) asked for is not asked for again this soon: the command is on
# its way, and the core has not consumed it yet. Later, still there: asked again (its
# delivery may have failed).
ASK_AGAIN_AFTER_S: Final = 5.0
# how long a stopping sweep waits for its last commands to be acknowledged
STOP_FLUSH_S: Final = 5.0


def inventory_core(
    settings: Settings, store: InventoryStore, *, clock: Callable[[], float] = time.time
) -> InventoryService:
    """The inventory core of these settings (topics, deadlines, supply model)."""
    return InventoryService(
        store,
        orders_topic=settings.topic(ORDERS),
        commands_topic=settings.topic(COMMANDS),
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
        clock=clock,
        reservation_ttl_s=settings.reservation_ttl_s,
        reorder_point=settings.reorder_point,
        reorder_quantity=settings.reorder_quantity,
        supplier_delay_s=settings.supplier_delay_s,
    )


def inventory_runner(settings: Settings, store: InventoryStore) -> BatchRunner:
    return service_runner(settings, SPEC, inventory_core(settings, store))


@dataclass
class SweepPass:
    """What one pass asked for."""

    expiries: int = 0
    restocks: int = 0


class DeadlineSweep:
    """Asks for the expiries and restocks that are due; reads the store, writes commands.

    ``sweep_once`` is one pass (tests call it directly); ``start``/``stop`` run passes
    every ``settings.sweep_every_s`` in a daemon thread.
    """

    def __init__(
        self,
        settings: Settings,
        store: InventoryStore,
        producer: Producer,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.producer = producer
        self.topic = settings.topic(COMMANDS)
        self._clock = clock
        self._monotonic = monotonic
        # order ids and restock ids asked for -> when (monotonic)
        self._asked: dict[str, float] = {}
        self._failures = Repeats(every=100)
        self.delivery_failures = 0
        self.totals = SweepPass()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one pass --------------------------------------------------------------------

    def sweep_once(self) -> SweepPass:
        """Produce the commands due now (acknowledgements are served, not awaited)."""
        now = self._clock()
        tick = self._monotonic()
        asked = self._asked
        for key in [k for k, at in asked.items() if tick - at >= ASK_AGAIN_AFTER_S]:
            del asked[key]
        done = SweepPass()
        # read past the ones asked for lately, so that they do not hide the rest
        expired = self.store.expired_reservations(now, EXPIRIES_PER_PASS + len(asked))
        for order_id, _deadline in expired:
            if done.expiries >= EXPIRIES_PER_PASS:
                break
            if order_id in asked:
                continue
            command = ExpireReservation(order_id=order_id, requested_at=now)
            self._produce(order_id.encode(), schema.encode(command))
            asked[order_id] = tick
            done.expiries += 1
        for reorder in self.store.due_reorders(now, RESTOCKS_PER_PASS + len(asked)):
            if done.restocks >= RESTOCKS_PER_PASS:
                break
            if reorder.restock_id in asked:
                continue
            restock = Restock(
                restock_id=reorder.restock_id,
                sku=reorder.sku,
                quantity=reorder.quantity,
                requested_at=now,
            )
            self._produce(reorder.sku.encode(), schema.encode(restock))
            asked[reorder.restock_id] = tick
            done.restocks += 1
        self.producer.poll(0)
        if done.expiries or done.restocks:
            self.totals.expiries += done.expiries
            self.totals.restocks += done.restocks
            logger.info(
                "inventory sweep: asked %d expiries (oldest deadline %.1f s ago) and %d"
                " restocks on %s",
                done.expiries,
                now - expired[0][1] if expired else 0.0,
                done.restocks,
                self.topic,
            )
        return done

    def _produce(self, key: bytes, value: bytes) -> None:
        self.producer.produce(self.topic, value, key, on_delivery=self._on_delivery)

    def _on_delivery(self, err: object, _msg: object) -> None:
        if err is not None:
            # asked again after ASK_AGAIN_AFTER_S: the order is still RESERVED in the db
            self.delivery_failures += 1
            logger.warning(
                "inventory sweep: a command to %s was not delivered: %s", self.topic, err
            )

    # --- the thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inventory-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        left = self.producer.flush(STOP_FLUSH_S)
        if left:
            logger.warning("inventory sweep: %d commands not acknowledged at stop", left)
        logger.info(
            "inventory sweep: stopped after asking %d expiries and %d restocks",
            self.totals.expiries,
            self.totals.restocks,
        )

    def _loop(self) -> None:
        every = self.settings.sweep_every_s
        while not self._stop.wait(every):
            try:
                self.sweep_once()
                if count := self._failures.succeeded():
                    logger.info("inventory sweep: working again after %d failed passes", count)
            except Exception as exc:  # noqa: BLE001 - the next pass tries again
                if self._failures.failed():
                    logger.warning(
                        "inventory sweep: pass failed (%d in a row): %s",
                        self._failures.count,
                        exc,
                    )


def run_inventory(settings: Settings, *, idle_exit_s: float | None = None) -> RunnerStats:
    """The inventory service and its sweep until SIGTERM/SIGINT (or idle)."""
    with closing(open_inventory_store(settings)) as store:
        runner = inventory_runner(settings, store)
        # its own connection: the runner's is busy with batches (and is not thread-safe)
        with closing(open_inventory_store(settings, readonly=True)) as sweep_store:
            producer = Producer.for_topics(settings, [settings.topic(COMMANDS)])
            sweep = DeadlineSweep(settings, sweep_store, producer)
            sweep.start()
            try:
                return run_until_stopped(runner, idle_exit_s)
            finally:
                sweep.stop()
