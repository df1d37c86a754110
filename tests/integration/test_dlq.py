"""DLQ tools on the real broker: replay of early cancels and bad records, the DLQ logger."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from typing import Any

from typer.testing import CliRunner

from ordermesh import schema
from ordermesh.cli import app
from ordermesh.config import Settings
from ordermesh.dlq import read_entries, replay
from ordermesh.kafka.client import make_producer
from ordermesh.kafka.lag import group_lag
from ordermesh.kafka.reader import end_offsets, read_topic
from ordermesh.records import REPLAY_COUNT_HEADER, InRecord, dead_letter, header
from ordermesh.services.dlq import REPLAY_FROM_HEADER, DlqEntry
from ordermesh.stores.factory import open_inventory_store
from ordermesh.stores.inventory import StockRow
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS
from ordermesh.verify import verify
from tests.conftest import ServiceProcess, settings_env, wait_for

SKU = "SKU-00001"


def produce(
    settings: Settings,
    topic: str,
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]],
) -> None:
    errors: list[Any] = []
    producer = make_producer(settings)
    for key, value, headers in records:
        producer.produce(
            topic, value, key, headers=headers, on_delivery=lambda err, _m: errors.append(err)
        )
    assert producer.flush(30) == 0
    assert errors == [None] * len(records)


def stock(settings: Settings) -> StockRow:
    with open_inventory_store(settings) as store:
        (row,) = store.stock(SKU)
    return row


def status(settings: Settings, order_id: str) -> str | None:
    with open_inventory_store(settings) as store:
        outcome = store.order_outcomes().get(order_id)
    return None if outcome is None else outcome.status


def events_of(settings: Settings, order_id: str) -> list[bytes]:
    return [
        r.value
        for r in read_topic(settings, settings.topic(EVENTS))
        if r.key == order_id.encode() and r.value is not None
    ]


def topic_size(settings: Settings, topic: str) -> int:
    return sum(high for _low, high in end_offsets(settings, settings.topic(topic)).values())


def dlq_with(settings: Settings, count: int) -> list[DlqEntry] | None:
    entries = read_entries(settings)
    return entries if len(entries) >= count else None


def inventory_drained(settings: Settings) -> bool:
    lag = group_lag(settings, "inventory", [settings.topic(ORDERS), settings.topic(COMMANDS)])
    return sum(lag.values()) == 0


def cli(settings: Settings, *args: str) -> Any:
    return CliRunner().invoke(app, list(args), env=settings_env(settings))


def test_early_cancel_is_replayed_once_the_order_exists(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    with open_inventory_store(settings) as store:
        store.seed({SKU: 50})
    inventory = service_factory(["inventory", "run"], settings, "inv")

    cancel = schema.CancelOrder(order_id="o-late", requested_at=schema.now(), reason="customer")
    produce(settings, settings.topic(COMMANDS), [(b"o-late", schema.encode(cancel), None)])
    (entry,) = wait_for(lambda: dlq_with(settings, 1), 60, "the early cancel in the DLQ")
    assert (entry.stage, entry.error_class, entry.order_id) == (
        "cancel",
        "CancelRejected",
        "o-late",
    )
    assert entry.source_topic == settings.topic(COMMANDS)
    assert entry.replay_count == 0

    order = schema.OrderPlaced(
        order_id="o-late",
        customer_id="c-1",
        items=(schema.OrderItem(SKU, 3, 2.5),),
        currency="EUR",
        total=7.5,
        created_at=schema.now(),
    )
    produce(settings, settings.topic(ORDERS), [(b"o-late", schema.encode(order), None)])
    wait_for(lambda: status(settings, "o-late") == "RESERVED", 60, "o-late to be RESERVED")
    assert stock(settings) == StockRow(SKU, 47, 3)

    # the CLI: a dry run lists the plan and sends nothing; list shows the entry
    commands_before = topic_size(settings, COMMANDS)
    dry = cli(settings, "dlq", "replay", "--reason", "CancelRejected", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"would replay {entry.where()} -> {settings.topic(COMMANDS)}" in dry.output
    listed = cli(settings, "dlq", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert '"order_id": "o-late"' in listed.output
    assert '"ordermesh.error.stage", "cancel"' in listed.output
    assert topic_size(settings, COMMANDS) == commands_before

    first = replay(settings, reasons=["CancelRejected"])
    assert first.ok and not first.plan.refused
    (sent,) = first.sent
    assert sent.topic == settings.topic(COMMANDS)
    wait_for(lambda: status(settings, "o-late") == "CANCELLED", 60, "o-late to be CANCELLED")
    assert stock(settings) == StockRow(SKU, 50, 0)
    after_first = wait_for(
        lambda: (ev := events_of(settings, "o-late")) and len(ev) == 3 and ev,
        30,
        "OrderReserved, StockReleased, OrderCancelled",
    )
    kinds = [type(schema.decode_event(v)).__name__ for v in after_first]
    assert kinds == ["OrderReserved", "StockReleased", "OrderCancelled"]

    # replaying again re-publishes the same record; the inventory re-emits the recorded
    # events byte for byte and changes nothing
    second = replay(settings, reasons=["CancelRejected"])
    assert second.ok and len(second.sent) == 1
    original, *replayed = sorted(
        read_topic(settings, settings.topic(COMMANDS)), key=lambda r: (r.partition, r.offset)
    )
    assert header(original.headers, REPLAY_COUNT_HEADER) is None
    assert len(replayed) == 2  # both runs sent the very same record
    for copy in replayed:
        assert (copy.key, copy.value) == (original.key, original.value)
        assert copy.headers == [
            (REPLAY_COUNT_HEADER, b"1"),
            (REPLAY_FROM_HEADER, entry.where().encode()),
        ]
    after_second = wait_for(
        lambda: (ev := events_of(settings, "o-late")) and len(ev) == 5 and ev,
        30,
        "the re-emitted cancel events",
    )
    assert after_second[3:] == after_first[1:]
    wait_for(lambda: inventory_drained(settings), 30, "the inventory to drain")
    assert stock(settings) == StockRow(SKU, 50, 0)
    assert status(settings, "o-late") == "CANCELLED"
    assert len(read_entries(settings)) == 1  # the replays did not fail

    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    assert report.cancelled == 1
    assert inventory.stop() == 0, inventory.log_text()[-3000:]


def test_bad_record_comes_back_with_its_count_until_refused(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    inventory = service_factory(["inventory", "run"], settings, "inv")
    bad = b'{"order_id":"o-bad","customer_id":"c-1","ite'
    produce(settings, settings.topic(ORDERS), [(b"o-bad", bad, [("trace", b"t-1")])])
    entries = wait_for(lambda: dlq_with(settings, 1), 60, "the bad record in the DLQ")
    assert entries[0].error_class == "DecodeError.json" and entries[0].replay_count == 0

    for round_ in (1, 2):
        result = replay(settings, reasons=["DecodeError"], max_replays=2)
        assert result.ok
        (sent,) = result.sent
        assert sent.replay.entry.where() == entries[-1].where()
        assert sent.topic == settings.topic(ORDERS)
        entries = wait_for(lambda n=round_: dlq_with(settings, n + 1), 60, "the failed replay")
        newest = max(entries, key=lambda e: e.timestamp_ms)
        assert newest.replay_count == round_
        assert newest.replayed_from == sent.replay.entry.where()
        assert newest.source() == sent.where()
        assert (newest.key, newest.value) == (b"o-bad", bad)
        assert header(newest.headers, "trace") == b"t-1"
        entries = [*[e for e in entries if e is not newest], newest]

    refused = replay(settings, reasons=["DecodeError"], max_replays=2)
    assert refused.sent == [] and refused.plan.replays == []
    whys = sorted(r.why for r in refused.plan.refused)
    assert whys[0] == "replay count 2 reached max replays 2"
    assert all(w.startswith("superseded by") for w in whys[1:]) and len(whys) == 3

    out = cli(settings, "dlq", "replay", "--reason", "DecodeError", "--max-replays", "2")
    assert out.exit_code == 1, out.output
    assert "replay count 2 reached max replays 2" in out.output

    wait_for(lambda: inventory_drained(settings), 30, "the inventory to drain")
    report = verify(settings, check_tracker=False)
    assert report.ok, report.violations
    assert report.invalid_records == 3 and report.duplicate_dlq == 0
    assert inventory.stop() == 0, inventory.log_text()[-3000:]


def _dlq_record(i: int, message: str, error_class: str) -> tuple[bytes, bytes, list[Any]]:
    src = InRecord("orders", i % 6, 100 + i, f"o-{i}".encode(), b"{x", [], 1_700_000_000_000)
    out = dead_letter(
        src,
        dlq_topic="unused",
        service="inventory",
        stage="decode",
        error_class=error_class,
        message=message,
    )
    assert out.key is not None and out.value is not None
    return out.key, out.value, list(out.headers or [])


def _alerts(proc: ServiceProcess) -> list[str]:
    return [line for line in proc.log_text().splitlines() if "DLQ ALERT" in line]


def test_dlq_logger_alerts_once_per_record_and_stops_on_sigterm(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    records = [
        _dlq_record(0, "bad order: not valid JSON", "DecodeError.json"),
        _dlq_record(1, "multi\nline\nmessage", "DecodeError.schema"),
        _dlq_record(2, "order 'o-2' is unknown", "CancelRejected"),
        _dlq_record(3, "x" * 500, "DecodeError.json"),
        _dlq_record(4, "ünïcode \u2028 separator", "DecodeError.utf8"),
    ]
    produce(settings, settings.topic(DLQ), records)
    logger = service_factory(["dlq", "run"], settings, "dlq-logger")

    def done() -> bool:
        lag = group_lag(settings, "dlq-logger", [settings.topic(DLQ)])
        return len(_alerts(logger)) >= len(records) and sum(lag.values()) == 0

    wait_for(done, 60, "an alert per DLQ record and a committed group")
    logger.signal(signal.SIGTERM)
    assert logger.wait(60) == 0, logger.log_text()[-3000:]
    alerts = _alerts(logger)
    assert len(alerts) == len(records), alerts
    assert all(" WARNING " in line for line in alerts)
    reasons = sorted(m.group(1) for line in alerts if (m := re.search(r"reason=(\S+)", line)))
    assert reasons == [
        "CancelRejected",
        "DecodeError.json",
        "DecodeError.json",
        "DecodeError.schema",
        "DecodeError.utf8",
    ]
    assert any('message="multi\\nline\\nmessage"' in line for line in alerts)
    assert "DLQ summary: 5 entries" in logger.log_text()

    # offsets were committed: a restart alerts on nothing old
    again = service_factory(["dlq", "run", "--idle-exit", "1"], settings, "dlq-logger-2")
    assert again.wait(60) == 0, again.log_text()[-3000:]
    assert _alerts(again) == []


def test_replay_refuses_a_forged_source_topic(settings: Settings) -> None:
    # anyone able to write to the DLQ could name any topic in ordermesh.error.topic
    def forged(topic: str, offset: int) -> tuple[bytes, bytes, list[Any]]:
        src = InRecord(topic, 0, offset, b"o-forged", b'{"x":1}', [], 1_700_000_000_000)
        out = dead_letter(
            src,
            dlq_topic=settings.topic(DLQ),
            service="inventory",
            stage="decode",
            error_class="DecodeError.json",
            message="forged",
        )
        assert out.key is not None and out.value is not None
        return out.key, out.value, list(out.headers or [])

    outside = [settings.topic("payments"), settings.topic(DLQ), ORDERS + "-elsewhere"]
    produce(settings, settings.topic(DLQ), [forged(t, i) for i, t in enumerate(outside)])
    wait_for(lambda: dlq_with(settings, 3), 30, "the forged entries")

    out = cli(settings, "dlq", "replay", "--reason", "DecodeError")
    assert out.exit_code == 1, out.output
    assert out.output.count("is not one OrderMesh consumes") == 3
    assert "replayed 0, refused 0, skipped 3, failed 0" in out.output
    assert topic_size(settings, DLQ) == 3  # nothing was sent back to the DLQ either
