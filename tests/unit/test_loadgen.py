"""Unit tests of the load generator: the pure generator, and run_load without a broker."""

from __future__ import annotations

import itertools
import json
import re
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from ordermesh import loadgen, schema
from ordermesh.config import Settings
from ordermesh.errors import ConfigError, DecodeError
from ordermesh.kafka import client
from ordermesh.loadgen import MALFORMED_KINDS, GeneratedMessage, OrderGenerator

EXPECTED_DECODE_KIND = {
    "not_json": "json",
    "bad_utf8": "utf8",
    "wrong_type": "schema",
    "missing_field": "schema",
    "negative_quantity": "schema",
    "wrong_total": "validation",
    "oversized": "size",
}


def fixed_clock() -> float:
    return 1_700_000_000.5


def take(generator: OrderGenerator, n: int) -> list[GeneratedMessage]:
    return [generator.next() for _ in range(n)]


def test_sku_name() -> None:
    assert loadgen.sku_name(1) == "SKU-00001"
    assert loadgen.sku_name(1000) == "SKU-01000"
    assert loadgen.sku_name(99_999) == "SKU-99999"
    with pytest.raises(ValueError):
        loadgen.sku_name(0)


def test_sku_prices_are_fixed_whole_cents_in_range() -> None:
    prices = [loadgen.sku_price_cents(i) for i in range(1, 5001)]
    assert all(loadgen.MIN_PRICE_CENTS <= p <= loadgen.MAX_PRICE_CENTS for p in prices)
    assert len(set(prices)) > 3000
    assert prices == [loadgen.sku_price_cents(i) for i in range(1, 5001)]


def test_same_seed_same_bytes() -> None:
    a = take(OrderGenerator(7, malformed_ratio=0.2, clock=fixed_clock), 2000)
    b = take(OrderGenerator(7, malformed_ratio=0.2, clock=fixed_clock), 2000)
    assert a == b
    c = take(OrderGenerator(8, malformed_ratio=0.2, clock=fixed_clock), 2000)
    assert [m.value for m in a] != [m.value for m in c]


def test_same_seed_with_real_clock_differs_only_in_created_at() -> None:
    gen_a, gen_b = OrderGenerator(3), OrderGenerator(3)
    a = [gen_a.next_order() for _ in range(500)]
    b = [gen_b.next_order() for _ in range(500)]
    for x, y in zip(a, b, strict=True):
        assert msgspec.structs.replace(x, created_at=0.0) == msgspec.structs.replace(
            y, created_at=0.0
        )
        assert x.created_at > 1_600_000_000


def test_valid_orders_are_well_formed() -> None:
    generator = OrderGenerator(11, skus=200, clock=fixed_clock)
    messages = take(generator, 3000)
    order_ids = set()
    quantities: Counter[int] = Counter()
    item_counts: Counter[int] = Counter()
    for message in messages:
        assert message.malformed is None
        order = schema.decode_order(message.value)
        assert message.key == order.order_id.encode()
        assert len(order.order_id) <= 64
        order_ids.add(order.order_id)
        assert order.customer_id.startswith("cust-")
        assert len(order.customer_id) == len("cust-00000")
        assert order.currency == "USD"
        assert order.created_at == fixed_clock()
        skus = [item.sku for item in order.items]
        assert len(skus) == len(set(skus)), "SKUs within one order must be distinct"
        item_counts[len(order.items)] += 1
        total = 0
        for item in order.items:
            number = int(item.sku.removeprefix("SKU-"))
            assert 1 <= number <= 200
            assert item.sku == loadgen.sku_name(number)
            cents = loadgen.sku_price_cents(number)
            assert item.unit_price == cents / 100
            quantities[item.quantity] += 1
            total += cents * item.quantity
        assert schema.to_cents(order.total) == total
    assert len(order_ids) == len(messages)
    assert set(item_counts) == {1, 2, 3, 4, 5}
    assert set(quantities) <= {1, 2, 3, 4, 5}
    small = quantities[1] + quantities[2] + quantities[3]
    assert small / sum(quantities.values()) > 0.9


def test_order_ids_follow_the_seed() -> None:
    generator = OrderGenerator(42, clock=fixed_clock)
    assert generator.next().key == b"ord-42-000000001"
    assert generator.next().key == b"ord-42-000000002"


def test_zipf_skew() -> None:
    generator = OrderGenerator(5, skus=1000, clock=fixed_clock)
    counts: Counter[str] = Counter()
    for _ in range(20_000):
        counts.update(item.sku for item in generator.next_order().items)
    ranked = [counts[loadgen.sku_name(i)] for i in range(1, 1001)]
    assert counts.most_common(1)[0][0] == "SKU-00001"
    median = statistics.median(ranked)
    assert ranked[0] > 20 * max(median, 1)
    # the tail is still reached, not only the head
    assert sum(1 for c in ranked if c > 0) > 500


def test_uniform_when_zipf_s_is_zero() -> None:
    generator = OrderGenerator(5, skus=10, zipf_s=0.0, clock=fixed_clock)
    counts: Counter[str] = Counter()
    for _ in range(5000):
        counts.update(item.sku for item in generator.next_order().items)
    assert max(counts.values()) < 1.3 * min(counts.values())


@pytest.mark.parametrize(("skus", "zipf_s"), [(1, 1.1), (3, 1.1), (5, 40.0), (1000, 40.0)])
def test_distinct_skus_even_when_few_or_steep(skus: int, zipf_s: float) -> None:
    generator = OrderGenerator(9, skus=skus, zipf_s=zipf_s, clock=fixed_clock)
    for _ in range(300):
        order = generator.next_order()
        names = [item.sku for item in order.items]
        assert len(names) == len(set(names))
        assert 1 <= len(names) <= min(5, skus)
        schema.validate_order(order)


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
def test_malformed_ratio_is_roughly_honored(ratio: float) -> None:
    n = 10_000
    messages = take(OrderGenerator(2, malformed_ratio=ratio, clock=fixed_clock), n)
    bad = sum(1 for m in messages if m.malformed is not None)
    assert abs(bad / n - ratio) < max(0.2 * ratio, 0.005)


def test_no_malformed_by_default_and_all_at_ratio_one() -> None:
    assert all(m.malformed is None for m in take(OrderGenerator(1, clock=fixed_clock), 500))
    every = take(OrderGenerator(1, malformed_ratio=1.0, clock=fixed_clock), 500)
    assert all(m.malformed is not None for m in every)


def test_every_malformed_fails_decode_and_every_valid_passes() -> None:
    messages = take(OrderGenerator(13, malformed_ratio=0.3, clock=fixed_clock), 5000)
    seen: Counter[str] = Counter()
    for message in messages:
        if message.malformed is None:
            schema.decode_order(message.value)
            continue
        seen[message.malformed] += 1
        with pytest.raises(DecodeError) as info:
            schema.decode_order(message.value)
        assert info.value.kind == EXPECTED_DECODE_KIND[message.malformed], (
            message.malformed,
            str(info.value),
        )
        assert info.value.raw == message.value
    assert set(seen) == set(MALFORMED_KINDS)
    assert min(seen.values()) > 100


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_each_malformed_kind_fails_decode(kind: str) -> None:
    generator = OrderGenerator(21, malformed_ratio=1.0, clock=fixed_clock)
    messages = [m for m in take(generator, 20 * len(MALFORMED_KINDS)) if m.malformed == kind]
    assert len(messages) == 20
    for message in messages:
        with pytest.raises(DecodeError):
            schema.decode_order(message.value)


def test_malformed_details() -> None:
    generator = OrderGenerator(4, malformed_ratio=1.0, clock=fixed_clock)
    by_kind = {m.malformed: m for m in take(generator, len(MALFORMED_KINDS))}
    oversized = by_kind["oversized"].value
    assert len(oversized) > schema.MAX_MESSAGE_BYTES
    # valid-looking: well-formed JSON with a full order inside
    assert msgspec.json.decode(oversized)["items"]
    assert b"cust-" in by_kind["bad_utf8"].value
    with pytest.raises(UnicodeDecodeError):
        by_kind["bad_utf8"].value.decode()
    assert msgspec.json.decode(by_kind["wrong_type"].value)["items"][0]["quantity"].isdigit()
    assert "customer_id" not in msgspec.json.decode(by_kind["missing_field"].value)


def test_malformed_keys_are_unique_and_marked() -> None:
    messages = take(OrderGenerator(6, malformed_ratio=0.5, clock=fixed_clock), 2000)
    keys = [m.key for m in messages]
    assert len(set(keys)) == len(keys)
    for message in messages:
        prefix = b"ord-6-" if message.malformed is None else b"bad-6-"
        assert message.key.startswith(prefix)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"skus": 0},
        {"malformed_ratio": -0.1},
        {"malformed_ratio": 1.5},
        {"zipf_s": -1.0},
        {"zipf_s": float("nan")},
    ],
)
def test_bad_generator_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        OrderGenerator(1, **kwargs)


def test_seed_too_long_for_order_ids() -> None:
    with pytest.raises(ConfigError):
        OrderGenerator(10**60)


# --- run_load ----------------------------------------------------------------------------


class FakeProducer:
    """Queues records and reports them delivered on poll/flush, like librdkafka does."""

    def __init__(self, on_delivery: Callable[[Any, Any], None], fail_every: int = 0) -> None:
        self.on_delivery = on_delivery
        self.fail_every = fail_every
        self.queue: list[tuple[str, bytes, bytes]] = []
        self.produced: list[tuple[str, bytes, bytes]] = []
        # per-message callbacks, which librdkafka calls instead of the producer's own
        self.callbacks: dict[int, Callable[[Any, Any], None]] = {}
        self.calls = 0
        self.delivered = 0
        self.buffer_errors = 0
        self.polls = 0

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes,
        on_delivery: Callable[[Any, Any], None] | None = None,
    ) -> None:
        self.calls += 1
        # the local queue is "full" on every 700th call, to exercise the retry
        if self.calls % 700 == 0:
            self.buffer_errors += 1
            raise BufferError("Local: Queue full")
        record = (topic, value, key)
        if on_delivery is not None:
            self.callbacks[id(record)] = on_delivery
        self.queue.append(record)
        self.produced.append(record)

    def _deliver(self) -> int:
        served = len(self.queue)
        for record in self.queue:
            self.delivered += 1
            failed = self.fail_every and self.delivered % self.fail_every == 0
            callback = self.callbacks.pop(id(record), self.on_delivery)
            callback("boom" if failed else None, record)
        self.queue.clear()
        return served

    def poll(self, timeout: float) -> int:
        self.polls += 1
        if not self.queue and timeout > 0:
            # librdkafka blocks up to the timeout when it has nothing to report
            time.sleep(timeout)
        return self._deliver()

    def flush(self, timeout: float) -> int:
        self._deliver()
        return 0

    def __len__(self) -> int:
        return len(self.queue)


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> list[FakeProducer]:
    made: list[FakeProducer] = []

    def factory(settings: Settings, **overrides: Any) -> FakeProducer:
        made.append(FakeProducer(overrides["on_delivery"], fail_every=10))
        return made[-1]

    monkeypatch.setattr(loadgen, "make_producer", factory)
    return made


def test_run_load_without_limits_runs_until_stopped(fake_producer: list[FakeProducer]) -> None:
    stop = threading.Event()

    def progress(sent: int) -> None:
        if sent >= 3000:
            stop.set()  # what the CLI's SIGTERM/SIGINT handler does

    summary = loadgen.run_load(
        Settings(),
        count=None,
        duration=None,
        rate=None,
        malformed_ratio=0.0,
        seed=1,
        skus=10,
        progress=progress,
        stop=stop,
    )
    (producer,) = fake_producer
    assert summary.sent == len(producer.produced) >= 3000
    assert summary.acknowledged + summary.failed == summary.sent


@pytest.mark.parametrize(
    "kwargs",
    [{"count": -1}, {"duration": 0.0}, {"count": 1, "rate": 0.0}, {"count": 1, "rate": -5}],
)
def test_run_load_rejects_bad_limits(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"count": None, "duration": None, "rate": None} | kwargs
    with pytest.raises(ConfigError):
        loadgen.run_load(Settings(), malformed_ratio=0.0, seed=1, skus=10, **args)


def test_run_load_count_max_rate(
    fake_producer: list[FakeProducer], caplog: pytest.LogCaptureFixture
) -> None:
    progress: list[int] = []
    caplog.set_level("INFO", logger="ordermesh.loadgen")
    summary = loadgen.run_load(
        Settings(topic_prefix="t1-"),
        count=2500,
        duration=None,
        rate=None,
        malformed_ratio=0.1,
        seed=3,
        skus=50,
        progress=progress.append,
    )
    (producer,) = fake_producer
    assert summary.sent == len(producer.produced) == 2500
    assert summary.acknowledged == 2250
    assert summary.failed == 250
    assert summary.malformed_sent == sum(1 for _, _, key in producer.produced if b"bad-" in key)
    assert 150 < summary.malformed_sent < 350
    assert producer.buffer_errors >= 3
    assert {topic for topic, _, _ in producer.produced} == {"t1-orders"}
    expected = take(OrderGenerator(3, skus=50, malformed_ratio=0.1), 2500)
    assert [key for _, _, key in producer.produced] == [m.key for m in expected]
    assert progress[-1] == 2500
    assert summary.as_dict()["sent"] == 2500
    assert summary.rate > 0
    assert "sent=2500" in caplog.text


def test_run_load_paced_by_duration(fake_producer: list[FakeProducer]) -> None:
    summary = loadgen.run_load(
        Settings(),
        count=None,
        duration=0.5,
        rate=400.0,
        malformed_ratio=0.0,
        seed=1,
        skus=10,
    )
    # the bucket starts with one token and never exceeds the rate over the run
    assert summary.sent <= 1 + 400 * 0.5
    assert summary.sent >= 60
    assert summary.acknowledged + summary.failed == summary.sent
    # paced runs wait in slices, not one sleep per message
    assert fake_producer[0].polls < 200


def test_run_load_against_unreachable_broker_counts_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real librdkafka producer, no broker: every record times out and counts as failed."""
    real = client.make_producer

    def quick_timeout(settings: Settings, **overrides: Any) -> Any:
        return real(settings, **overrides, **{"message.timeout.ms": 300, "log_level": 0})

    monkeypatch.setattr(loadgen, "make_producer", quick_timeout)
    summary = loadgen.run_load(
        Settings(bootstrap_servers="127.0.0.1:1"),
        count=50,
        duration=None,
        rate=None,
        malformed_ratio=0.0,
        seed=1,
        skus=10,
    )
    assert summary.sent == 50
    assert summary.acknowledged == 0
    assert summary.failed == 50


def test_sequence_does_not_depend_on_the_clock() -> None:
    # created_at changes the encoded length of a truncated "not_json" message; that must
    # not change how much of the random stream is consumed, or later keys would differ
    def keys(start: float) -> list[bytes]:
        ticks = itertools.count()
        gen = OrderGenerator(
            3, skus=50, malformed_ratio=0.1, clock=lambda: start + next(ticks) * 0.0001234567
        )
        return [gen.next().key for _ in range(5000)]

    base = keys(1_795_503_988.0)
    for start in (1.5, 17.25, 99_999.987654321, 1_795_503_988.123456789):
        assert keys(start) == base


# --- the `load` command -----------------------------------------------------------------


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    from typer.testing import CliRunner

    from ordermesh.cli import app

    # the command maps SIGTERM to Ctrl-C; keep this test process's handler as it is
    monkeypatch.setattr(signal, "signal", lambda *_args: None)
    return CliRunner().invoke(app, ["load", "--count", "5", "--skus", "20", *args])


def test_load_draws_and_prints_a_seed_unless_given(
    fake_producer: list[FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run_cli(monkeypatch)
    second = run_cli(monkeypatch)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    seeds = []
    for result in (first, second):
        match = re.search(r"^seed (\d+) \(rerun with --seed \1\)$", result.output, re.M)
        assert match, result.output
        seeds.append(int(match.group(1)))
    assert seeds[0] != seeds[1]
    # a plain rerun sends other order ids, so it is not a replay of the first run
    ids = [{key for _, _, key in producer.produced} for producer in fake_producer]
    assert ids[0].isdisjoint(ids[1])
    assert all(
        key.startswith(f"ord-{seed}-".encode())
        for seed, run in zip(seeds, ids, strict=True)
        for key in run
    )

    # --seed reproduces a run exactly, and --json keeps stdout one JSON document
    again = run_cli(monkeypatch, "--seed", str(seeds[0]), "--json")
    assert again.exit_code == 0, again.output
    assert {key for _, _, key in fake_producer[-1].produced} == ids[0]
    assert json.loads(again.stdout)["seed"] == seeds[0]
    assert f"seed {seeds[0]} (rerun with --seed {seeds[0]})" in again.stderr


def test_random_seeds_fit_order_ids() -> None:
    for _ in range(100):
        seed = loadgen.random_seed()
        assert 1 <= seed < loadgen.RANDOM_SEED_LIMIT
        OrderGenerator(seed, skus=5)  # raises if its order ids could pass 64 characters


# --- every branch of an order's life ------------------------------------------------------


def test_declines_and_cancels_leave_the_seeds_orders_as_they_were() -> None:
    plain = OrderGenerator(5, clock=fixed_clock)
    lively = OrderGenerator(5, decline_ratio=0.3, cancel_ratio=0.3, clock=fixed_clock)
    for _ in range(500):
        a, b = plain.next_order(), lively.next_order()
        assert a.order_id == b.order_id and a.items == b.items and a.total == b.total
        assert a.card == "" and b.card in (loadgen.CARD_OK, *loadgen.DECLINING_CARDS)


def test_decline_and_cancel_shares_follow_their_ratios() -> None:
    generator = OrderGenerator(9, decline_ratio=0.1, cancel_ratio=0.05, clock=fixed_clock)
    messages = [generator.next() for _ in range(20_000)]
    cards = [schema.decode_order(m.value).card for m in messages]
    declining = sum(card in loadgen.DECLINING_CARDS for card in cards)
    cancels = [m.cancel_after for m in messages if m.cancel_after is not None]
    assert 0.08 < declining / len(messages) < 0.12
    assert 0.04 < len(cancels) / len(messages) < 0.06
    assert all(0.05 <= after <= loadgen.CANCEL_WITHIN_S for after in cancels)
    # both declining cards show up
    assert {card for card in cards if card in loadgen.DECLINING_CARDS} == set(
        loadgen.DECLINING_CARDS
    )


def test_run_load_sends_each_planned_cancel_for_its_order(
    fake_producer: list[FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loadgen, "CANCEL_WITHIN_S", 0.2)
    monkeypatch.setattr(loadgen, "CANCEL_DRAIN_S", 5.0)
    summary = loadgen.run_load(
        Settings(),
        count=400,
        duration=None,
        rate=None,
        malformed_ratio=0.0,
        seed=3,
        skus=50,
        cancel_ratio=0.25,
    )
    (producer,) = fake_producer
    orders = {key for topic, _, key in producer.produced if topic == "orders"}
    cancels = [
        schema.decode_command(value)
        for topic, value, _ in producer.produced
        if topic == "order-commands"
    ]
    assert summary.sent == 400 and len(orders) == 400
    assert summary.cancels_sent == len(cancels) > 50
    assert all(c.order_id.encode() in orders for c in cancels)
    # the orders' counters count orders only: the cancels' acks went elsewhere
    assert summary.acknowledged + summary.failed == 400
