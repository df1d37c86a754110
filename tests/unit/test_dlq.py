"""DLQ core: parsing entries, order_id peeking, replay planning, the logger service."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ordermesh import schema
from ordermesh.records import (
    ERROR_HEADER_PREFIX,
    REPLAY_COUNT_HEADER,
    InRecord,
    OutRecord,
    dead_letter,
    header,
    truncated_dead_letter,
)
from ordermesh.schema import CancelOrder, OrderItem, OrderPlaced
from ordermesh.services.dlq import (
    REPLAY_FROM_HEADER,
    DlqEntry,
    DlqLogger,
    DlqOffset,
    alert_line,
    order_id_of,
    parse_entry,
    parse_offset,
    peek_order_id,
    plan_replay,
    reason,
)
from ordermesh.services.inventory import InventoryService
from ordermesh.stores.sqlite_inventory import SqliteInventoryStore

ORDERS = "orders"
COMMANDS = "order-commands"
EVENTS = "order-events"
DLQ = "orders-dlq"

_offsets = itertools.count(100)


def consumed(out: OutRecord, partition: int = 0, offset: int | None = None) -> InRecord:
    """``out`` as a consumer would see it once produced."""
    where = next(_offsets) if offset is None else offset
    return InRecord(out.topic, partition, where, out.key, out.value, list(out.headers or []), 7)


def source(
    topic: str,
    value: bytes | None,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> InRecord:
    """A record consumed from ``topic`` (partition 2)."""
    return InRecord(topic, 2, next(_offsets), key, value, headers or [], 1_700_000_000_000)


def dlq_entry(
    value: bytes | None = b"{not json",
    *,
    key: bytes | None = b"o-1",
    error_class: str = "DecodeError.json",
    stage: str = "decode",
    topic: str = ORDERS,
    headers: list[tuple[str, bytes]] | None = None,
    partition: int = 0,
    offset: int | None = None,
    src: InRecord | None = None,
) -> DlqEntry:
    rec = src or source(topic, value, key, headers=headers or [])
    out = dead_letter(
        rec,
        dlq_topic=DLQ,
        service="inventory",
        stage=stage,
        error_class=error_class,
        message=f"failed: {error_class}",
    )
    return parse_entry(consumed(out, partition, offset))


# --- parsing ----------------------------------------------------------------------------


def test_parse_entry_splits_original_and_error_headers() -> None:
    rec = InRecord(ORDERS, 4, 17, b"o-9", b"{bad", [("trace", b"abc")], 1_700_000_000_123)
    out = dead_letter(
        rec,
        dlq_topic=DLQ,
        service="inventory",
        stage="decode",
        error_class="DecodeError.json",
        message="bad order: not valid JSON",
    )
    entry = parse_entry(InRecord(DLQ, 1, 5, out.key, out.value, list(out.headers or []), 99))

    assert (entry.dlq_topic, entry.partition, entry.offset, entry.timestamp_ms) == (DLQ, 1, 5, 99)
    assert (entry.key, entry.value) == (b"o-9", b"{bad")
    assert entry.headers == [("trace", b"abc")]
    assert (entry.source_topic, entry.source_partition, entry.source_offset) == (ORDERS, 4, 17)
    assert entry.source_timestamp_ms == 1_700_000_000_123
    assert (entry.service, entry.stage) == ("inventory", "decode")
    assert entry.error_class == "DecodeError.json"
    assert entry.message == "bad order: not valid JSON"
    assert entry.replay_count == 0
    assert entry.replayed_from is None
    assert entry.order_id == "o-9"
    assert reason(entry) == "DecodeError.json"
    assert entry.where() == "orders-dlq[1]@5"
    assert entry.position() == "1@5"
    assert entry.source() == "orders[4]@17"
    assert set(entry.error_headers) == {
        "topic",
        "partition",
        "offset",
        "timestamp",
        "service",
        "stage",
        "class",
        "message",
    }


def test_parse_entry_without_headers_or_with_garbage_ones() -> None:
    bare = parse_entry(InRecord(DLQ, 0, 1, None, None, [], 5))
    assert reason(bare) == "unknown"
    assert bare.source_topic is None and bare.source_partition is None
    assert bare.source() == "?[?]@?"
    assert bare.source_id() is None
    assert bare.order_id is None
    assert bare.replay_count == 0

    junk = parse_entry(
        InRecord(
            DLQ,
            0,
            2,
            b"\xff\xfe",
            b"\x00\x01",
            [
                (ERROR_HEADER_PREFIX + "partition", b"x"),
                (ERROR_HEADER_PREFIX + "offset", b"\xff"),
                (ERROR_HEADER_PREFIX + "class", b"Cancel\xffRejected"),
                (REPLAY_COUNT_HEADER, b"two"),
            ],
            5,
        )
    )
    assert junk.source_partition is None and junk.source_offset is None
    assert junk.error_class == "Cancel\ufffdRejected"
    assert junk.replay_count is None  # unreadable, not silently 0
    assert junk.order_id is None


@given(
    key=st.none() | st.binary(max_size=80),
    value=st.none() | st.binary(max_size=300),
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    ERROR_HEADER_PREFIX + "class",
                    ERROR_HEADER_PREFIX + "partition",
                    ERROR_HEADER_PREFIX + "message",
                    REPLAY_COUNT_HEADER,
                    REPLAY_FROM_HEADER,
                    "other",
                ]
            ),
            st.binary(max_size=40),
        ),
        max_size=8,
    ),
)
def test_parse_entry_never_raises_and_alert_stays_one_line(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
) -> None:
    entry = parse_entry(InRecord(DLQ, 0, 3, key, value, headers, 0))
    line = alert_line(entry)
    assert len(line.splitlines()) == 1
    assert line.startswith("DLQ ALERT reason=")


# --- order_id ---------------------------------------------------------------------------


def test_order_id_prefers_the_key() -> None:
    assert order_id_of(b"o-key", b'{"order_id": "o-value"}') == "o-key"


def test_order_id_from_value_when_key_is_missing_or_not_an_id() -> None:
    assert order_id_of(None, b'{"order_id": "o-1", "items": []}') == "o-1"
    assert order_id_of(b"\xff\xfe", b'{"order_id": "o-2"}') == "o-2"
    assert order_id_of(b"", b'{"order_id": "o-3"}') == "o-3"
    assert order_id_of(b"x" * 65, b'{"order_id": "o-4"}') == "o-4"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # truncated mid-write
        (b'{"order_id":"ord-7-000000012","customer_id":"cu', "ord-7-000000012"),
        # invalid UTF-8 elsewhere in the payload
        (b'{"customer_id":"cust-\xc3\x28","order_id" : "o-utf8"}', "o-utf8"),
        # a valid order with a schema problem
        (
            schema.encode(CancelOrder(order_id="o-cmd", requested_at=1.0)),
            "o-cmd",
        ),
        (b'{"order_id": 12}', None),
        (b'{"order_id": ""}', None),
        (b'{"order_id": "' + b"x" * 65 + b'"}', None),
        (b'{"order_id": "a\\nb"}', None),  # decodes to a control character
        (b"\x00\x01\x02garbage", None),
        (b"[" * 5000, None),  # deep nesting must not blow up
        (b"", None),
        (None, None),
    ],
)
def test_peek_order_id_from_bad_bytes(value: bytes | None, expected: str | None) -> None:
    assert peek_order_id(value) == expected


# --- offsets ----------------------------------------------------------------------------


def test_parse_offset_forms() -> None:
    assert parse_offset("2:15") == DlqOffset(2, 15)
    assert parse_offset("2@15") == DlqOffset(2, 15)
    assert parse_offset(" 15 ") == DlqOffset(None, 15)
    assert str(DlqOffset(None, 15)) == "15" and str(DlqOffset(1, 3)) == "1:3"
    for bad in ("", "a", "1:2:3", "-1", "1:-2", "1:x"):
        with pytest.raises(ValueError):
            parse_offset(bad)


# --- planning ---------------------------------------------------------------------------


def test_replay_record_keeps_original_and_counts() -> None:
    entry = dlq_entry(
        b"{bad",
        key=b"o-1",
        headers=[("trace", b"t1"), ("ordermesh.other", b"x")],
        partition=2,
        offset=40,
    )
    plan = plan_replay([entry], reasons=["DecodeError.json"], max_replays=3)

    assert plan.refused == [] and plan.unmatched == []
    (item,) = plan.replays
    out = item.record
    assert out.topic == ORDERS  # the source topic
    assert (out.key, out.value) == (b"o-1", b"{bad")
    assert out.headers == [
        ("trace", b"t1"),
        ("ordermesh.other", b"x"),
        (REPLAY_COUNT_HEADER, b"1"),
        (REPLAY_FROM_HEADER, b"orders-dlq[2]@40"),
    ]
    assert not any(name.startswith(ERROR_HEADER_PREFIX) for name, _ in out.headers or [])


def test_refuses_a_truncated_copy() -> None:
    rec = source(ORDERS, b"x" * 5000, b"o-9")
    out = truncated_dead_letter(
        dead_letter(
            rec,
            dlq_topic=DLQ,
            service="inventory",
            stage="produce",
            error_class="MSG_SIZE_TOO_LARGE",
            message="too large",
        )
    )
    entry = parse_entry(consumed(out))
    plan = plan_replay([entry], reasons=["MSG_SIZE_TOO_LARGE"], max_replays=3)
    assert plan.replays == []
    (refusal,) = plan.refused
    assert refusal.why.startswith("truncated copy")


def test_replay_goes_only_to_topics_ordermesh_consumes() -> None:
    mine = [dlq_entry(topic=t, offset=i) for i, t in enumerate((ORDERS, COMMANDS, EVENTS))]
    foreign = [
        dlq_entry(topic=t, offset=10 + i)
        for i, t in enumerate(("payments", DLQ, "t2-orders", "orders-archive"))
    ]
    plan = plan_replay([*mine, *foreign], reasons=["DecodeError"], max_replays=3)

    assert [item.record.topic for item in plan.replays] == [ORDERS, COMMANDS, EVENTS]
    assert plan.refused == []
    assert [skip.entry.source_topic for skip in plan.skipped] == [
        "payments",
        DLQ,
        "t2-orders",
        "orders-archive",
    ]
    assert "'payments' is not one OrderMesh consumes" in plan.skipped[0].why
    assert plan.matched == 7


def test_replay_topics_follow_the_dlq_topic_prefix() -> None:
    def entry_of(dlq_topic: str, topic: str) -> DlqEntry:
        out = dead_letter(
            source(topic, b"{bad", b"o-1"),
            dlq_topic=dlq_topic,
            service="inventory",
            stage="decode",
            error_class="DecodeError.json",
            message="bad",
        )
        return parse_entry(consumed(out))

    prefixed = [entry_of("t1-orders-dlq", "t1-orders"), entry_of("t1-orders-dlq", "orders")]
    plan = plan_replay(prefixed, reasons=["DecodeError"], max_replays=3)
    assert [item.record.topic for item in plan.replays] == ["t1-orders"]
    assert [skip.entry.source_topic for skip in plan.skipped] == ["orders"]

    # a DLQ topic not named <prefix>orders-dlq allows nothing unless told what
    odd = [entry_of("odd-dlq", ORDERS)]
    assert plan_replay(odd, reasons=["DecodeError"], max_replays=3).replays == []
    told = plan_replay(odd, reasons=["DecodeError"], max_replays=3, allowed_topics={ORDERS})
    assert [item.record.topic for item in told.replays] == [ORDERS]


def test_replay_of_a_replayed_record_replaces_count_and_origin() -> None:
    entry = dlq_entry(
        headers=[
            (REPLAY_COUNT_HEADER, b"1"),
            ("trace", b"t1"),
            (REPLAY_FROM_HEADER, b"orders-dlq[0]@1"),
        ],
        partition=1,
        offset=9,
    )
    (item,) = plan_replay([entry], reasons=["DecodeError"], max_replays=3).replays
    assert item.record.headers == [
        ("trace", b"t1"),
        (REPLAY_COUNT_HEADER, b"2"),
        (REPLAY_FROM_HEADER, b"orders-dlq[1]@9"),
    ]


def test_select_by_reason_exact_and_by_prefix() -> None:
    json_err = dlq_entry(error_class="DecodeError.json", offset=1)
    schema_err = dlq_entry(error_class="DecodeError.schema", offset=2)
    cancel = dlq_entry(error_class="CancelRejected", stage="cancel", topic=COMMANDS, offset=3)
    other = dlq_entry(error_class="DecodeErrorish", offset=4)
    entries = [json_err, schema_err, cancel, other]

    def chosen(**kw: object) -> list[int]:
        plan = plan_replay(entries, max_replays=3, **kw)  # type: ignore[arg-type]
        return [r.entry.offset for r in plan.replays]

    assert chosen(reasons=["DecodeError"]) == [1, 2]
    assert chosen(reasons=["DecodeError.schema"]) == [2]
    assert chosen(reasons=["CancelRejected"]) == [3]
    assert chosen(reasons=["CancelRejected", "DecodeError.json"]) == [1, 3]
    plan = plan_replay(entries, reasons=["Nope"], max_replays=3)
    assert plan.replays == [] and plan.unmatched == ["--reason Nope"]
    (cancel_out,) = plan_replay(entries, reasons=["CancelRejected"], max_replays=3).replays
    assert cancel_out.record.topic == COMMANDS


def test_select_by_offset_exact_plain_and_ambiguous() -> None:
    a = dlq_entry(partition=0, offset=5)
    b = dlq_entry(partition=1, offset=5, error_class="CancelRejected", topic=COMMANDS)
    c = dlq_entry(partition=1, offset=6)
    entries = [a, b, c]

    exact = plan_replay(entries, offsets=[DlqOffset(1, 5)], max_replays=3)
    assert [r.entry for r in exact.replays] == [b] and exact.refused == []

    unique = plan_replay(entries, offsets=[DlqOffset(None, 6)], max_replays=3)
    assert [r.entry for r in unique.replays] == [c]

    ambiguous = plan_replay(entries, offsets=[DlqOffset(None, 5)], max_replays=3)
    assert ambiguous.replays == []
    assert [r.entry for r in ambiguous.refused] == [a, b]
    assert all("ambiguous" in r.why and "0, 1" in r.why for r in ambiguous.refused)
    # also named exactly: that one goes, the other stays ambiguous
    mixed = plan_replay(entries, offsets=[DlqOffset(None, 5), DlqOffset(1, 5)], max_replays=3)
    assert [r.entry for r in mixed.replays] == [b]
    assert [r.entry for r in mixed.refused] == [a]

    # a reason narrows a plain offset down to one entry: no longer ambiguous
    narrowed = plan_replay(
        entries, reasons=["CancelRejected"], offsets=[DlqOffset(None, 5)], max_replays=3
    )
    assert [r.entry for r in narrowed.replays] == [b]

    # reasons and offsets must both match
    both = plan_replay(entries, reasons=["DecodeError"], offsets=[DlqOffset(1, 5)], max_replays=3)
    assert both.replays == [] and both.unmatched == ["--offset 1:5"]

    missing = plan_replay(entries, offsets=[DlqOffset(2, 5), DlqOffset(0, 5)], max_replays=3)
    assert [r.entry for r in missing.replays] == [a]
    assert missing.unmatched == ["--offset 2:5"]


def test_refuses_at_max_replays_and_unreadable_counts() -> None:
    entries = [
        dlq_entry(headers=[(REPLAY_COUNT_HEADER, str(n).encode())], offset=n) for n in range(4)
    ]
    bad = dlq_entry(headers=[(REPLAY_COUNT_HEADER, b"lots")], offset=10)
    plan = plan_replay([*entries, bad], reasons=["DecodeError"], max_replays=2)

    assert [r.entry.offset for r in plan.replays] == [0, 1]
    assert [r.record.headers for r in plan.replays][1][-2] == (REPLAY_COUNT_HEADER, b"2")
    refused = {r.entry.offset: r.why for r in plan.refused}
    assert refused[2] == "replay count 2 reached max replays 2"
    assert refused[3] == "replay count 3 reached max replays 2"
    assert "unreadable" in refused[10]
    assert plan.matched == 5
    assert plan_replay(entries, reasons=["DecodeError"], max_replays=0).replays == []


def test_refuses_superseded_duplicate_and_sourceless_entries() -> None:
    src = source(ORDERS, b"{dup", b"o-dup")
    first = dlq_entry(src=src, partition=0, offset=1)
    again = dlq_entry(src=src, partition=0, offset=2)  # the same record dead-lettered twice
    sourceless = parse_entry(
        InRecord(DLQ, 0, 3, b"o-x", b"{", [(ERROR_HEADER_PREFIX + "class", b"DecodeError.json")], 0)
    )
    plan = plan_replay([again, first, sourceless], reasons=["DecodeError"], max_replays=3)
    assert [r.entry for r in plan.replays] == [first]
    whys = {r.entry.offset: r.why for r in plan.refused}
    assert whys[2] == "duplicate of orders-dlq[0]@1 (same source record " + src.where() + ")"
    assert whys[3] == "no source topic header: nowhere to replay to"

    # the replay of `first` failed again: a later entry points back at it
    replayed = consumed(plan.replays[0].record, partition=2, offset=50)
    failed_again = dlq_entry(src=replayed, partition=0, offset=9)
    assert failed_again.replayed_from == "orders-dlq[0]@1"
    assert failed_again.replay_count == 1
    plan = plan_replay([first, again, failed_again], reasons=["DecodeError"], max_replays=3)
    assert [r.entry for r in plan.replays] == [failed_again]
    whys = {r.entry.offset: r.why for r in plan.refused}
    assert whys[1] == "superseded by orders-dlq[0]@9 (its replay failed again)"
    assert whys[2].startswith("duplicate of orders-dlq[0]@1")


def test_plan_needs_a_selection() -> None:
    with pytest.raises(ValueError, match="reason"):
        plan_replay([dlq_entry()], max_replays=3)
    with pytest.raises(ValueError, match="max_replays"):
        plan_replay([dlq_entry()], reasons=["x"], max_replays=-1)


def test_replays_come_in_dlq_order() -> None:
    entries = [dlq_entry(partition=p, offset=o) for p, o in ((1, 3), (0, 9), (1, 1), (0, 2))]
    plan = plan_replay(entries, reasons=["DecodeError"], max_replays=3)
    assert [r.entry.position() for r in plan.replays] == ["0@2", "0@9", "1@1", "1@3"]


# --- round trips through the real inventory service --------------------------------------


@pytest.fixture
def inventory(tmp_path: Path) -> Iterator[tuple[InventoryService, SqliteInventoryStore]]:
    with SqliteInventoryStore(tmp_path / "inventory.db") as store:
        store.seed({"A": 10})
        service = InventoryService(
            store,
            orders_topic=ORDERS,
            commands_topic=COMMANDS,
            events_topic=EVENTS,
            dlq_topic=DLQ,
            clock=lambda: 1000.0,
        )
        yield service, store


def _dlq_of(outs: list[OutRecord], partition: int, offset: int) -> DlqEntry:
    (out,) = outs
    assert out.topic == DLQ
    return parse_entry(consumed(out, partition, offset))


def test_replay_count_survives_a_failing_round_trip(
    inventory: tuple[InventoryService, SqliteInventoryStore],
) -> None:
    service, _ = inventory
    bad = source(ORDERS, b'{"order_id":"o-bad","customer', b"o-bad", headers=[("trace", b"t")])
    entries = [_dlq_of(service.handle([bad]), 0, 0)]
    assert entries[0].replay_count == 0 and entries[0].order_id == "o-bad"

    for round_ in (1, 2):
        plan = plan_replay(entries, reasons=["DecodeError"], max_replays=2)
        (item,) = plan.replays
        assert item.entry is entries[-1]
        # the replayed copy is consumed from the orders topic and fails again
        again = service.handle([consumed(item.record, partition=3)])
        entry = _dlq_of(again, 0, round_)
        assert entry.replay_count == round_
        assert entry.replayed_from == entries[-1].where()
        assert entry.source_topic == ORDERS and entry.source_partition == 3
        assert header(entry.headers, "trace") == b"t"
        assert (entry.key, entry.value) == (bad.key, bad.value)
        entries.append(entry)

    final = plan_replay(entries, reasons=["DecodeError"], max_replays=2)
    assert final.replays == []
    whys = [r.why for r in final.refused]
    assert whys == [
        "superseded by orders-dlq[0]@1 (its replay failed again)",
        "superseded by orders-dlq[0]@2 (its replay failed again)",
        "replay count 2 reached max replays 2",
    ]


def test_early_cancel_replays_once_the_order_exists(
    inventory: tuple[InventoryService, SqliteInventoryStore],
) -> None:
    service, store = inventory
    cmd = CancelOrder(order_id="o-late", requested_at=1.0, reason="customer")
    early = source(COMMANDS, schema.encode(cmd), b"o-late")
    entry = _dlq_of(service.handle([early]), 1, 0)
    assert (entry.stage, reason(entry), entry.order_id) == ("cancel", "CancelRejected", "o-late")

    o = OrderPlaced("o-late", "c", (OrderItem("A", 3, 1.0),), "EUR", 3.0, 1.0)
    service.handle([source(ORDERS, schema.encode(o), b"o-late")])
    assert [(r.sku, r.available, r.reserved) for r in store.stock()] == [("A", 7, 3)]

    (item,) = plan_replay([entry], reasons=["CancelRejected"], max_replays=3).replays
    first = service.handle([consumed(item.record)])
    assert [type(schema.decode_event(r.value)).__name__ for r in first] == [
        "StockReleased",
        "OrderCancelled",
    ]
    assert [(r.sku, r.available, r.reserved) for r in store.stock()] == [("A", 10, 0)]

    # the same plan again: same bytes out, nothing changes
    (item2,) = plan_replay([entry], reasons=["CancelRejected"], max_replays=3).replays
    assert item2.record == item.record
    second = service.handle([consumed(item2.record)])
    assert [r.value for r in second] == [r.value for r in first]
    assert [(r.sku, r.available, r.reserved) for r in store.stock()] == [("A", 10, 0)]
    assert store.order_outcomes()["o-late"].status == "CANCELLED"


# --- logger -----------------------------------------------------------------------------


def _dlq_records(n: int, error_class: str = "DecodeError.json") -> list[InRecord]:
    return [
        consumed(
            dead_letter(
                source(ORDERS, b"{x", f"o-{i}".encode()),
                dlq_topic=DLQ,
                service="inventory",
                stage="decode",
                error_class=error_class,
                message="line one\nline two",
            ),
            partition=0,
        )
        for i in range(n)
    ]


def test_logger_alerts_once_per_record_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    svc = DlqLogger(summary_every_s=60.0, summary_every_records=1000, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="ordermesh.services.dlq")

    assert svc.handle(_dlq_records(3)) == []
    assert svc.handle(_dlq_records(2, "CancelRejected")) == []

    alerts = [r for r in caplog.records if r.getMessage().startswith("DLQ ALERT")]
    assert len(alerts) == 5
    assert all(r.levelno == logging.WARNING for r in alerts)
    line = alerts[0].getMessage()
    assert "\n" not in line
    assert "reason=DecodeError.json source=orders[2]@" in line
    assert "order_id=o-0 service=inventory stage=decode" in line
    assert 'message="line one\\nline two"' in line
    assert svc.counts == {"DecodeError.json": 3, "CancelRejected": 2}
    assert svc.total == 5
    assert not [r for r in caplog.records if "DLQ summary" in r.getMessage()]

    now[0] = 61.0  # the next batch after the interval brings a summary
    svc.handle(_dlq_records(1, "CancelRejected"))
    (summary,) = [r for r in caplog.records if "DLQ summary" in r.getMessage()]
    assert summary.getMessage() == (
        "DLQ summary: 6 entries (6 new): DecodeError.json=3, CancelRejected=3"
    )


def test_logger_summarises_every_n_records(caplog: pytest.LogCaptureFixture) -> None:
    svc = DlqLogger(summary_every_s=1e9, summary_every_records=4, clock=lambda: 0.0)
    caplog.set_level(logging.INFO, logger="ordermesh.services.dlq")
    for _ in range(5):
        svc.handle(_dlq_records(2))
    summaries = [r.getMessage() for r in caplog.records if "DLQ summary" in r.getMessage()]
    assert summaries == [
        "DLQ summary: 4 entries (4 new): DecodeError.json=4",
        "DLQ summary: 8 entries (4 new): DecodeError.json=8",
    ]
