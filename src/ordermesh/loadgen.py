"""Load generator: deterministic realistic orders (and chosen malformed ones) into Kafka.

``OrderGenerator`` is pure and seeded, so a run can be reproduced and unit-tested;
``run_load`` is the thin edge that paces it and produces to the ``orders`` topic.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from random import Random
from typing import Any, Final, Literal

import msgspec

from ordermesh import schema
from ordermesh.config import Settings
from ordermesh.errors import ConfigError
from ordermesh.kafka.client import make_producer
from ordermesh.kafka.producer import Producer

logger = logging.getLogger(__name__)

MalformedKind = Literal[
    "not_json",
    "bad_utf8",
    "wrong_type",
    "missing_field",
    "negative_quantity",
    "wrong_total",
    "oversized",
]
MALFORMED_KINDS: Final[tuple[MalformedKind, ...]] = (
    "not_json",
    "bad_utf8",
    "wrong_type",
    "missing_field",
    "negative_quantity",
    "wrong_total",
    "oversized",
)

CURRENCY: Final = "USD"
CUSTOMERS: Final = 99_999
MIN_PRICE_CENTS: Final = 199
MAX_PRICE_CENTS: Final = 19_999

# Cumulative shares of orders with 1..5 items and of items with quantity 1..5: small
# baskets dominate. Cumulative so that a draw is one bisect (random.choices re-adds them).
_ITEM_COUNT_CUM: Final = tuple(itertools.accumulate((40, 25, 15, 12, 8)))
_QUANTITY_CUM: Final = tuple(itertools.accumulate((70, 18, 8, 3, 1)))

# Byte sequences no UTF-8 decoder accepts: bad continuation, lone continuation bytes,
# overlong encoding, encoded surrogate, code point above U+10FFFF, truncated sequence.
_INVALID_UTF8: Final = (
    b"\xc3\x28",
    b"\xa0\xa1",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
    b"\xff",
)
# A leading byte that cannot start a JSON text, so random garbage is never valid JSON.
_NOT_JSON_LEAD: Final = b"#<!\x00"

# Pacing works on short slices: sleeping per message costs more than the message.
SLICE_S: Final = 0.01
# A paced run that fell behind catches up by at most this much work at once.
MAX_BURST_S: Final = 0.1
MAX_CHUNK: Final = 1000
FLUSH_TIMEOUT_S: Final = 60.0
PROGRESS_EVERY_S: Final = 0.25


# Test cards the gateway knows (docs/payments.md): one that pays, two that decline.
CARD_OK: Final = "4242424242424242"
DECLINING_CARDS: Final = ("4000000000000002", "4000000000009995")
# What `ordermesh load` does unless told otherwise: every branch of an order's life shows
# up (lifecycle.py). Declines fail the payment; cancels come at a random moment in the
# first seconds of an order, so some land before its payment, some after it, and some
# after its shipment (refused).
DEFAULT_DECLINE_RATIO: Final = 0.03
DEFAULT_CANCEL_RATIO: Final = 0.02
CANCEL_WITHIN_S: Final = 3.0
CANCEL_REASON: Final = "customer changed their mind"
# how long a finished run waits for its last cancels to come due
CANCEL_DRAIN_S: Final = CANCEL_WITHIN_S + 1.0

# the catalogue `up`, `inventory seed` and `load` agree on unless told otherwise
DEFAULT_SKUS: Final = 1000
DEFAULT_STOCK: Final = 100_000


# Random seeds are drawn below this: order ids stay short (ord-<12 digits>-<9 digits>),
# and two runs pick the same seed with a chance of one in 10^12.
RANDOM_SEED_LIMIT: Final = 10**12


def random_seed() -> int:
    """A fresh seed for a load run that was given none (1 .. RANDOM_SEED_LIMIT - 1)."""
    return 1 + secrets.randbelow(RANDOM_SEED_LIMIT - 1)


def sku_name(i: int) -> str:
    """Name of SKU number ``i`` (1-based): ``SKU-00001``; shared with inventory seeding."""
    if i < 1:
        raise ValueError(f"SKU numbers start at 1, got {i}")
    return f"SKU-{i:05d}"


def sku_price_cents(i: int) -> int:
    """Unit price of SKU ``i`` in cents, fixed per SKU (not per seed) so runs agree."""
    # Knuth's multiplicative hash spreads consecutive SKUs over the whole price range.
    return MIN_PRICE_CENTS + (i * 2_654_435_761) % (MAX_PRICE_CENTS - MIN_PRICE_CENTS + 1)


@dataclass(frozen=True, slots=True)
class GeneratedMessage:
    """One message to produce; ``malformed`` names the defect, None for a valid order."""

    key: bytes
    value: bytes
    malformed: MalformedKind | None
    # seconds after placing it that its customer cancels it (None: never)
    cancel_after: float | None = None


class OrderGenerator:
    """Deterministic stream of orders for a seed; SKU popularity follows a Zipf law.

    SKU rank equals its number: ``SKU-00001`` is the most popular, so inventory seeding
    can give the hot SKUs more stock without knowing the seed.
    """

    def __init__(
        self,
        seed: int,
        skus: int = 1000,
        zipf_s: float = 1.1,
        malformed_ratio: float = 0.0,
        *,
        decline_ratio: float = 0.0,
        cancel_ratio: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if skus < 1:
            raise ConfigError(f"skus must be at least 1, got {skus}")
        if not (zipf_s >= 0 and math.isfinite(zipf_s)):
            raise ConfigError(f"zipf_s must be a finite number >= 0, got {zipf_s}")
        if not 0.0 <= malformed_ratio <= 1.0:
            raise ConfigError(f"malformed_ratio must be within [0, 1], got {malformed_ratio}")
        for name, ratio in (("decline_ratio", decline_ratio), ("cancel_ratio", cancel_ratio)):
            if not 0.0 <= ratio <= 1.0:
                raise ConfigError(f"{name} must be within [0, 1], got {ratio}")
        self.seed = seed
        self.decline_ratio = decline_ratio
        self.cancel_ratio = cancel_ratio
        # a stream of its own: cards and cancels leave the seed's orders as they were
        self._life_rng = Random(f"life-{seed}")
        self.skus = skus
        self.malformed_ratio = malformed_ratio
        self._clock = clock
        self._rng = Random(seed)
        self._n = 0
        self._malformed_count = 0
        self._cumulative = list(itertools.accumulate(1.0 / k**zipf_s for k in range(1, skus + 1)))
        self._names = [sku_name(i) for i in range(1, skus + 1)]
        self._prices = [sku_price_cents(i) for i in range(1, skus + 1)]
        if len(self._order_id(10**9 - 1)) > 64:
            raise ConfigError(f"seed {seed} makes order ids longer than 64 characters")

    def _order_id(self, n: int) -> str:
        return f"ord-{self.seed}-{n:09d}"

    def _draw(self, cumulative: Sequence[float]) -> int:
        """A 1-based index drawn with the given cumulative weights."""
        u = self._rng.random() * cumulative[-1]
        # min(): guards the float edge where u rounds up to the last cumulative weight
        return min(bisect.bisect_right(cumulative, u), len(cumulative) - 1) + 1

    def _draw_skus(self, count: int) -> list[int]:
        chosen: list[int] = []
        seen: set[int] = set()
        attempts = 0
        while len(chosen) < count:
            attempts += 1
            if attempts > 50 * count:
                # a very steep Zipf can make one more distinct draw very unlikely: take the
                # most popular SKUs not chosen yet instead of looping
                chosen.extend(i for i in range(1, self.skus + 1) if i not in seen)
                return chosen[:count]
            sku = self._draw(self._cumulative)
            if sku not in seen:
                seen.add(sku)
                chosen.append(sku)
        return chosen

    def next_order(self) -> schema.OrderPlaced:
        """The next valid order (consumes one sequence number)."""
        self._n += 1
        rng = self._rng
        count = min(self._draw(_ITEM_COUNT_CUM), self.skus)
        items = []
        total_cents = 0
        for sku in self._draw_skus(count):
            quantity = self._draw(_QUANTITY_CUM)
            cents = self._prices[sku - 1]
            total_cents += quantity * cents
            items.append(schema.OrderItem(self._names[sku - 1], quantity, cents / 100))
        card = ""
        if self.decline_ratio > 0:
            life = self._life_rng
            declines = life.random() < self.decline_ratio
            card = DECLINING_CARDS[life.randrange(len(DECLINING_CARDS))] if declines else CARD_OK
        return schema.OrderPlaced(
            order_id=self._order_id(self._n),
            customer_id=f"cust-{rng.randint(1, CUSTOMERS):05d}",
            items=tuple(items),
            currency=CURRENCY,
            # cents / 100 is the double nearest to the exact amount, as a JSON reader parses it
            total=total_cents / 100,
            created_at=self._clock(),
            card=card,
        )

    def next(self) -> GeneratedMessage:
        """The next message: a valid order, or a malformed one at ``malformed_ratio``."""
        if self.malformed_ratio > 0 and self._rng.random() < self.malformed_ratio:
            return self._next_malformed()
        order = self.next_order()
        cancel_after = None
        if self.cancel_ratio > 0 and self._life_rng.random() < self.cancel_ratio:
            cancel_after = self._life_rng.uniform(0.05, CANCEL_WITHIN_S)
        return GeneratedMessage(order.order_id.encode(), schema.encode(order), None, cancel_after)

    def _next_malformed(self) -> GeneratedMessage:
        # cycle through the kinds so every kind shows up even at low ratios
        kind = MALFORMED_KINDS[self._malformed_count % len(MALFORMED_KINDS)]
        self._malformed_count += 1
        order = self.next_order()
        key = f"bad-{self.seed}-{self._n}".encode()
        return GeneratedMessage(key, self._corrupt(order, kind), kind)

    def _corrupt(self, order: schema.OrderPlaced, kind: MalformedKind) -> bytes:
        rng = self._rng
        data: dict[str, Any] = msgspec.to_builtins(order)
        first = data["items"][0]
        if kind == "not_json":
            if rng.random() < 0.5:
                # a producer that died mid-write: any proper prefix of an object is invalid.
                # Never empty: some clients read an empty value as a missing one.
                raw = schema.encode(order)
                # one random() whatever len(raw) is: randrange(n) consumes a varying amount
                # of the stream, and len(raw) varies with created_at (the wall clock), which
                # would make every later draw of the seed's sequence differ between runs
                return raw[: 1 + int(rng.random() * (len(raw) - 1))]
            lead = _NOT_JSON_LEAD[rng.randrange(len(_NOT_JSON_LEAD))]
            return bytes([lead]) + rng.randbytes(rng.randint(8, 256))
        if kind == "bad_utf8":
            # inside a field the decoder keeps, so the bytes are really looked at
            bad = _INVALID_UTF8[rng.randrange(len(_INVALID_UTF8))]
            raw = schema.encode(order)
            return raw.replace(b'"cust-', b'"cust-' + bad, 1)
        if kind == "wrong_type":
            first["quantity"] = str(first["quantity"])
        elif kind == "missing_field":
            del data["customer_id"]
        elif kind == "negative_quantity":
            first["quantity"] = -first["quantity"]
        elif kind == "wrong_total":
            cents = round(data["total"] * 100) + rng.randint(1, 99)
            data["total"] = cents / 100
        elif kind == "oversized":
            # valid in every other way, so only the size limit can catch it
            data["note"] = "please deliver to the back door. " * 2000
            data["padding"] = "x" * rng.randint(0, 4096)
        return msgspec.json.encode(data)


@dataclass(frozen=True, slots=True)
class LoadSummary:
    """What a load run did; ``rate`` counts until every record was acknowledged or failed."""

    sent: int
    acknowledged: int
    failed: int
    malformed_sent: int
    elapsed_s: float
    rate: float
    seed: int
    # CancelOrder commands sent (on order-commands; not counted in ``sent``)
    cancels_sent: int = 0

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


class _TokenBucket:
    """Allows ``rate`` messages per second, handed out in whole messages."""

    def __init__(self, rate: float, now: float) -> None:
        self._rate = rate
        self._capacity = max(1.0, rate * MAX_BURST_S)
        self._tokens = 1.0
        self._last = now

    def take(self, now: float) -> int:
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        allowed = int(self._tokens)
        self._tokens -= allowed
        return allowed


def run_load(
    settings: Settings,
    *,
    count: int | None,
    duration: float | None,
    rate: float | None,
    malformed_ratio: float,
    seed: int,
    skus: int,
    progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    decline_ratio: float = 0.0,
    cancel_ratio: float = 0.0,
) -> LoadSummary:
    """Produce generated orders to the ``orders`` topic until ``count`` or ``duration``.

    With neither, it runs until ``stop`` is set (the CLI sets it on SIGINT and SIGTERM)
    or Ctrl-C. ``rate`` is messages per second, None for as fast as possible. What was
    sent is still flushed and summarised. ``decline_ratio`` of the orders pay with a
    declining card; ``cancel_ratio`` are cancelled (``CancelOrder`` on order-commands)
    within ``CANCEL_WITHIN_S`` of being placed; a run that ends waits for those.
    """
    if count is not None and count < 0:
        raise ConfigError(f"count must be >= 0, got {count}")
    if duration is not None and not duration > 0:
        raise ConfigError(f"duration must be > 0 seconds, got {duration}")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise ConfigError(f"rate must be a positive number, got {rate}")
    generator = OrderGenerator(
        seed,
        skus=skus,
        malformed_ratio=malformed_ratio,
        decline_ratio=decline_ratio,
        cancel_ratio=cancel_ratio,
    )
    topic = settings.topic("orders")
    commands_topic = settings.topic("order-commands")
    # (due on the monotonic clock, order id) of the cancels to send
    cancels: list[tuple[float, str]] = []
    cancels_sent = cancels_failed = 0

    def cancel_delivered(err: Any, _msg: Any) -> None:
        nonlocal cancels_failed
        if err is not None:
            cancels_failed += 1

    def send_due_cancels(now: float) -> None:
        nonlocal cancels_sent
        while cancels and cancels[0][0] <= now:
            _due, order_id = heapq.heappop(cancels)
            command = schema.CancelOrder(
                order_id=order_id, requested_at=time.time(), reason=CANCEL_REASON
            )
            # a callback of its own: the orders' counters count orders only
            value, key = schema.encode(command), order_id.encode()
            if producer.produce(commands_topic, value, key, on_delivery=cancel_delivered):
                cancels_sent += 1

    acked = failed = 0

    def on_delivery(err: Any, _msg: Any) -> None:
        # runs inside poll()/flush() on this thread, so plain counters are safe
        nonlocal acked, failed
        if err is None:
            acked += 1
        else:
            failed += 1

    producer = Producer(make_producer(settings, on_delivery=on_delivery))
    start = time.monotonic()
    deadline = start + duration if duration is not None else math.inf
    bucket = _TokenBucket(rate, start) if rate is not None else None
    sent = malformed = 0
    next_progress = start + PROGRESS_EVERY_S
    interrupted = False
    try:
        while (count is None or sent < count) and not (stop is not None and stop.is_set()):
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_progress and progress is not None:
                progress(sent)
                next_progress = now + PROGRESS_EVERY_S
            if cancels:
                send_due_cancels(now)
            budget = MAX_CHUNK if bucket is None else min(bucket.take(now), MAX_CHUNK)
            if budget == 0:
                # wait for the next slice while serving delivery reports; what was produced
                # is sent now (flush ignores linger.ms), as a paced client would send it
                wait = min(SLICE_S, deadline - now)
                if len(producer) > 0:
                    producer.flush(wait)
                else:
                    producer.poll(wait)
                continue
            if count is not None:
                budget = min(budget, count - sent)
            for _ in range(budget):
                message = generator.next()
                # a full local queue is waited out, but not past the deadline
                if not producer.produce(topic, message.value, message.key, until=deadline):
                    break
                sent += 1
                if message.malformed is not None:
                    malformed += 1
                elif message.cancel_after is not None:
                    heapq.heappush(cancels, (now + message.cancel_after, message.key.decode()))
            producer.poll(0)
        if cancels and not (stop is not None and stop.is_set()):
            # the run is over; its customers who meant to cancel still do
            drain_end = time.monotonic() + CANCEL_DRAIN_S
            while cancels and time.monotonic() < drain_end:
                producer.poll(min(SLICE_S, max(0.0, cancels[0][0] - time.monotonic())))
                send_due_cancels(time.monotonic())
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("load interrupted after %d messages; flushing", sent)
    interrupted = interrupted or (stop is not None and stop.is_set())
    if cancels:
        logger.info("load: %d cancels not sent (the run was stopped first)", len(cancels))
    if cancels_failed:
        logger.warning("load: %d cancels were not acknowledged", cancels_failed)
    if progress is not None:
        progress(sent)
    unflushed = _flush(producer)
    elapsed = time.monotonic() - start
    failed += unflushed
    summary = LoadSummary(
        sent=sent,
        acknowledged=acked,
        failed=failed,
        malformed_sent=malformed,
        elapsed_s=elapsed,
        rate=sent / elapsed if elapsed > 0 else 0.0,
        seed=seed,
        cancels_sent=cancels_sent,
    )
    logger.info(
        "load %s: topic=%s sent=%d acknowledged=%d failed=%d (unflushed %d) malformed=%d "
        "cancels=%d elapsed=%.2fs rate=%.0f/s seed=%d",
        "interrupted" if interrupted else "done",
        topic,
        summary.sent,
        summary.acknowledged,
        summary.failed,
        unflushed,
        summary.malformed_sent,
        summary.cancels_sent,
        summary.elapsed_s,
        summary.rate,
        seed,
    )
    return summary


def _flush(producer: Producer) -> int:
    """Wait for outstanding records; returns how many never got a delivery report."""
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    while len(producer) > 0 and time.monotonic() < deadline:
        producer.flush(1.0)
    return len(producer)
