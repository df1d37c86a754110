"""Read the tracker's store from asyncio, and long-poll for an order to reach a status.

A long poll waits for a target status of ``lifecycle.STATUSES`` (by default: decided,
i.e. out of PLACED) and is answered once the order reached it, went past it (a higher
rank: waiting for RESERVED, the order is PAID already) or ended (a terminal status: it
will never get there), whichever comes first.

Where the store is called, measured on the 2-core dev machine (tracker DB of ~27k orders,
read-only WAL connection): ``get_order`` takes 32 us inline and 177 us through a thread
pool (the hop costs more than the query); ``GET /orders/{id}`` under ``wrk -c32`` served
7,660 req/s calling it inline and 2,970 req/s through the pool. So single-order reads and
``ping`` run inline on the event loop; reads whose cost grows with their size
(``list_orders``: 0.3 ms per 50 rows, a poll of many waiters) go to a small pool.
(A WAL reader does not wait for the writer; what could stall it is SQLite's busy timeout
in a rare WAL recovery.)

Waiters for a decision share one poller, so a thousand long-polling clients cost one loop
of lookups per wake-up, not a thousand timers. Over a store that counts its commits (a
``ChangeCounter``: SQLite's ``data_version``) it checks that counter every
``CHANGE_CHECK_S`` (microseconds each) and reads the watched orders once it moved, or
every ``POLL_INTERVAL_S`` anyway. Over any other store, or while more than
``INLINE_POLL_MAX`` orders are watched, it reads them every ``POLL_INTERVAL_S``. Over a
store that announces decisions (a ``DecisionFeed``: PostgreSQL's ``LISTEN/NOTIFY``, see
``stores/postgres_tracker.py``) it
sleeps until the tracker commits decisions, then reads only the announced orders that
someone waits for; every ``FEED_RECHECK_S`` it reads all of them anyway, a bound on what
a lost notification could cost. At most ``MAX_WAITERS`` requests wait at once (each holds a
connection and a future); one more is answered 503 with Retry-After rather than letting
a flood of long polls grow memory and poll work without bound.

Every read takes the ``api_client`` the caller may see (None: every order; see
``api/access.py``), and the store answers another client's order as unknown; a waiter
is answered from a read under its own ``api_client``, so for it another client's order
never appears, and its wait lasts as long as one for an order that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Protocol, TypeVar, runtime_checkable

from ordermesh import lifecycle
from ordermesh.api.problems import HTTPProblem
from ordermesh.errors import StoreError
from ordermesh.stores.tracker import OrderPage, OrderQueries, OrderStatus, OrderView

log = logging.getLogger(__name__)

POLL_INTERVAL_S: Final = 0.025
CHANGE_CHECK_S: Final = 0.002
FEED_RECHECK_S: Final = 2.0
READ_THREADS: Final = 2
# a poll of up to this many orders runs inline (~32 us each), more go to the pool
INLINE_POLL_MAX: Final = 32
# Concurrent long polls at most; a poll of 1000 orders takes ~32 ms in the pool, within
# the poll interval's order of magnitude.
MAX_WAITERS: Final = 1000
WAITERS_RETRY_AFTER_S: Final = 1

_T = TypeVar("_T")


@runtime_checkable
class DecisionFeed(Protocol):
    """A store that announces decided orders (optional, beside ``OrderQueries``)."""

    def subscribe(self, wake: Callable[[list[str] | None], None]) -> Callable[[], None]:
        """Call ``wake(order_ids)`` from any thread once they were decided (``None``:
        maybe any order); returns the function that stops it."""
        ...


@runtime_checkable
class ChangeCounter(Protocol):
    """A store with a cheap counter that moves whenever its data changed (optional)."""

    def data_version(self) -> int: ...


def decided(view: OrderView | None) -> bool:
    """The inventory has answered: the order exists and has left PLACED."""
    return view is not None and view.status != "PLACED"


def reached(view: OrderView | None, target: OrderStatus | None) -> bool:
    """Whether a wait for ``target`` is over: the order is there, past it, or ended
    (``target`` None: decided)."""
    if view is None:
        return False
    if target is None:
        return decided(view)
    status = view.status
    return (
        status == target
        or lifecycle.is_terminal(status)
        or lifecycle.RANK[status] > lifecycle.RANK[target]
    )


class _Waiter:
    """One request waiting for an order to reach ``target``, reading it as ``api_client``."""

    __slots__ = ("api_client", "future", "target")

    def __init__(
        self,
        future: asyncio.Future[OrderView],
        target: OrderStatus | None,
        api_client: str | None,
    ) -> None:
        self.future = future
        self.target = target
        self.api_client = api_client


class OrderReader:
    """Async, read-only access to the tracker store."""

    def __init__(
        self,
        store: OrderQueries,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        max_waiters: int = MAX_WAITERS,
    ) -> None:
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.max_waiters = max_waiters
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tracker-read")
        self._waiters: dict[str, list[_Waiter]] = {}
        self._waiting = 0  # requests inside wait_for's wait, over all orders
        self._poller: asyncio.Task[None] | None = None
        self._feed = store if isinstance(store, DecisionFeed) else None
        self._counter = store if isinstance(store, ChangeCounter) else None
        self._version: int | None = None  # None: read the watched orders at the next check
        self._unsubscribe: Callable[[], None] | None = None
        self._wakeup = asyncio.Event()
        self._woken: set[str] = set()
        self._wake_all = False

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def get(self, order_id: str, api_client: str | None = None) -> OrderView | None:
        return self.store.get_order(order_id, api_client=api_client)

    async def list_orders(
        self,
        *,
        status: OrderStatus | None,
        customer_id: str | None,
        limit: int,
        cursor: str | None,
        api_client: str | None = None,
    ) -> OrderPage:
        return await self._run(
            lambda: self.store.list_orders(
                status=status,
                customer_id=customer_id,
                limit=limit,
                cursor=cursor,
                api_client=api_client,
            )
        )

    async def ping(self) -> None:
        self.store.ping()

    async def wait_decided(
        self, order_id: str, timeout_s: float, api_client: str | None = None
    ) -> OrderView | None:
        """The order once decided (out of PLACED); see ``wait_for``."""
        return await self.wait_for(order_id, timeout_s, None, api_client)

    async def wait_for(
        self,
        order_id: str,
        timeout_s: float,
        target: OrderStatus | None,
        api_client: str | None = None,
    ) -> OrderView | None:
        """The order once it ``reached`` ``target`` (None: decided), or as it is (maybe
        None) when ``timeout_s`` ran out; read as ``api_client`` (None: any order's).

        A store that fails meanwhile (the tracker has not created its DB yet, say) counts
        as "not there yet"; only the final read, at the deadline, raises StoreError.
        Raises a 503 ``HTTPProblem`` when ``max_waiters`` requests wait already.
        """
        if timeout_s <= 0:
            return await self.get(order_id, api_client)
        try:
            view = await self.get(order_id, api_client)
        except StoreError:
            view = None
        if reached(view, target):
            return view
        if self._waiting >= self.max_waiters:
            raise HTTPProblem(
                503,
                "too-many-waiters",
                f"{self._waiting} requests are waiting for orders already; retry shortly"
                " (or read without ?wait=)",
                headers={"Retry-After": str(WAITERS_RETRY_AFTER_S)},
            )
        future: asyncio.Future[OrderView] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(future, target, api_client)
        self._waiters.setdefault(order_id, []).append(waiter)
        # it may have moved since the read above: the next check reads it
        self._version = None
        self._waiting += 1
        if self._poller is None or self._poller.done():
            self._listen()
            self._poller = asyncio.create_task(self._poll(), name="tracker-poller")
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return await self.get(order_id, api_client)
        finally:
            self._waiting -= 1
            waiting = self._waiters.get(order_id)
            if waiting is not None:
                if waiter in waiting:
                    waiting.remove(waiter)
                if not waiting:
                    del self._waiters[order_id]

    def waiting_for(self, order_id: str) -> int:
        """How many requests are waiting for this order."""
        return len(self._waiters.get(order_id, ()))

    @property
    def waiting(self) -> int:
        """How many requests are waiting, over all orders."""
        return self._waiting

    def _listen(self) -> None:
        """Subscribe to the store's decisions (once), waking the poller on this loop."""
        if self._feed is None or self._unsubscribe is not None:
            return
        loop = asyncio.get_running_loop()

        def wake(order_ids: list[str] | None) -> None:  # the store's listener thread
            # a closed loop (RuntimeError) has nobody waiting any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._woke, order_ids)

        self._unsubscribe = self._feed.subscribe(wake)

    def _woke(self, order_ids: list[str] | None) -> None:
        if order_ids is None:
            self._wake_all = True
        else:
            self._woken.update(oid for oid in order_ids if oid in self._waiters)
        if self._wake_all or self._woken:
            self._wakeup.set()

    async def _next_watch(self) -> list[str]:
        """The orders to read next: after a tick (polling), or those announced (feed)."""
        if self._feed is None:
            if self._counter is None or len(self._waiters) > INLINE_POLL_MAX:
                # many watched orders: reading them all at every commit would cost more
                await asyncio.sleep(self.poll_interval_s)
            else:
                await self._changed()
            return list(self._waiters)
        try:
            await asyncio.wait_for(self._wakeup.wait(), FEED_RECHECK_S)
        except TimeoutError:
            self._wake_all = True
        self._wakeup.clear()
        if self._wake_all:
            order_ids = list(self._waiters)
        else:
            order_ids = [oid for oid in self._woken if oid in self._waiters]
        self._wake_all = False
        self._woken.clear()
        return order_ids

    async def _changed(self) -> None:
        """Return once the store's change counter moved, or after ``poll_interval_s``."""
        assert self._counter is not None
        deadline = time.monotonic() + self.poll_interval_s
        while True:
            await asyncio.sleep(min(CHANGE_CHECK_S, self.poll_interval_s))
            try:
                version: int | None = self._counter.data_version()
            except StoreError:
                version = None  # read the orders: their reads report the failure
            if version is None or version != self._version or time.monotonic() >= deadline:
                self._version = version
                return

    def _reads(self, order_ids: list[str]) -> list[tuple[str, str | None]]:
        """(order_id, api_client) of every read the waiters of ``order_ids`` need: one
        per order and distinct ``api_client`` among its waiters (almost always one)."""
        return [
            (order_id, api_client)
            for order_id in order_ids
            for api_client in dict.fromkeys(w.api_client for w in self._waiters.get(order_id, ()))
        ]

    def _lookup(self, reads: list[tuple[str, str | None]]) -> list[OrderView | None]:
        return [self.store.get_order(oid, api_client=client) for oid, client in reads]

    async def _poll(self) -> None:
        errors = 0
        while self._waiters:
            reads = self._reads(await self._next_watch())
            if not reads:
                continue
            started = time.monotonic()
            try:
                if len(reads) <= INLINE_POLL_MAX:
                    views = self._lookup(reads)
                else:
                    views = await self._run(functools.partial(self._lookup, reads))
            except StoreError as exc:
                # waiters keep waiting; each reads the store itself when its time is up
                errors += 1
                if errors == 1 or errors % 400 == 0:
                    log.warning("tracker poll failed (%d times): %s", errors, exc)
                continue
            errors = 0
            for (order_id, api_client), view in zip(reads, views, strict=True):
                if view is None:
                    continue
                waiting = self._waiters.get(order_id)
                if not waiting:
                    continue
                still = []
                for waiter in waiting:
                    if waiter.api_client != api_client or not reached(view, waiter.target):
                        still.append(waiter)
                    elif not waiter.future.done():
                        waiter.future.set_result(view)
                if still:
                    self._waiters[order_id] = still
                else:
                    del self._waiters[order_id]
            spent = time.monotonic() - started
            if spent > 0.5:
                log.warning("tracker poll of %d orders took %.2f s", len(reads), spent)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._poller is not None:
            self._poller.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()
