"""Produce to Kafka from asyncio and await the broker's acknowledgement.

confluent-kafka reports deliveries through callbacks served by ``Producer.poll``. A
background thread polls; each callback hands its result to the event loop with
``call_soon_threadsafe``, where it settles the asyncio Future the request awaits. So a
request is answered only after ``acks=all`` from an idempotent producer, and the event
loop never blocks on librdkafka.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Final

from ordermesh.config import Settings
from ordermesh.errors import DeliveryError
from ordermesh.kafka.producer import Producer, ProducerClient

log = logging.getLogger(__name__)

# An HTTP client waits for our answer: give up on a record after this long (librdkafka's
# default is 5 minutes) and answer 503 instead.
DELIVERY_TIMEOUT_MS: Final = 10_000
# The API answers a request per record, so batching helps only under concurrency; a
# shorter linger than the services' keeps a single POST fast.
LINGER_MS: Final = 2
POLL_INTERVAL_S: Final = 0.05


def _settle(future: asyncio.Future[None], err: Any) -> None:
    if future.done():  # the request gave up (timeout, disconnect)
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(DeliveryError(f"not acknowledged: {err}"))


class AsyncProducer:
    """An idempotent producer whose ``produce`` coroutine returns once Kafka acked."""

    def __init__(self, settings: Settings, *, producer: ProducerClient | None = None) -> None:
        self._producer = (
            Producer(producer)
            if producer is not None
            else Producer.create(
                settings, **{"linger.ms": LINGER_MS, "message.timeout.ms": DELIVERY_TIMEOUT_MS}
            )
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="api-producer-poll", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(POLL_INTERVAL_S)
            except Exception:  # a callback bug must not stop the acks of everyone else
                log.exception("producer poll failed")

    async def produce(self, topic: str, key: bytes, value: bytes) -> None:
        """Produce one record and wait for its acknowledgement; DeliveryError if none."""
        loop = self._loop
        if loop is None:
            raise DeliveryError("producer not started")
        future: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: Any, _msg: Any) -> None:
            loop.call_soon_threadsafe(_settle, future, err)

        # a full local queue fails the request at once: waiting for room would block
        # the event loop
        self._producer.produce_now(topic, value, key, on_delivery)
        try:
            # librdkafka fails the record after DELIVERY_TIMEOUT_MS; this is a backstop
            await asyncio.wait_for(future, DELIVERY_TIMEOUT_MS / 1000 + 5)
        except TimeoutError:
            raise DeliveryError(f"no delivery report from {topic}") from None

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is in flight (their requests still get answers), then stop polling."""
        remaining = self._producer.flush(timeout_s)
        if remaining:
            log.warning("producer closed with %d record(s) not acknowledged", remaining)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
