"""The terminal view of `up`/`top` renders a real analytics snapshot."""

from __future__ import annotations

import msgspec
from rich.console import Console

from ordermesh.cli.mesh import _Rates, render
from ordermesh.records import dead_letter
from tests.unit.test_analytics import (
    DLQ,
    ORDERS,
    T0,
    every_branch,
    make,
    records_of,
    rejected,
    reserved,
)


def test_render_shows_outcomes_dlq_latency_lag_and_services() -> None:
    an, clock, feed = make()
    batch = [feed.order("o1", T0 - 3), feed.order("o2", T0 - 3)]
    batch += [
        feed.event(reserved("o1", T0 - 2.9, latency=0.04)),
        feed.event(rejected("o2", T0 - 2.9, latency=0.06)),
    ]
    bad = feed.record(ORDERS, b"nope", T0 - 3, key=b"bad")
    dl = dead_letter(
        bad,
        dlq_topic=DLQ,
        service="inventory",
        stage="decode",
        error_class="DecodeError.json",
        message="not json",
    )
    batch.append(feed.record(DLQ, dl.value, T0 - 2.8, key=dl.key, headers=dl.headers))
    an.handle(batch)
    clock.now += 1
    status = {
        "at": T0,
        "topics": {"orders": 3, "order-events": 2, "orders-dlq": 1, "order-commands": 0},
        "lag": {"inventory": 7, "tracker": 0},
        # as ``ordermesh top`` gets it: the JSON of /snapshot
        "analytics": msgspec.json.decode(msgspec.json.encode(an.snapshot())),
        "services": {"inventory-1": {"pid": 42, "running": True, "restarts": 1}},
    }
    rates = _Rates()
    rates.update(status)
    later = {**status, "at": T0 + 2, "topics": {**status["topics"], "orders": 1003}}
    console = Console(width=140, record=True)
    console.print(render(later, rates.update(later), "header"))
    text = console.export_text()
    assert "500/s" in text  # (1003 - 3) orders over 2 s
    assert "reserved" in text and "rejected OUT_OF_STOCK" in text
    assert "dlq DecodeError.json" in text
    assert "latency p50 / p99 (10s)" in text and " ms" in text
    assert "inventory" in text and "7" in text
    assert "inventory-1" in text and "42" in text


def test_render_shows_the_funnel_and_its_failure_ends_in_one_line() -> None:
    an, clock, feed = make()
    lives = every_branch(feed, T0 - 5)
    an.handle(records_of(lives))
    clock.now += 1
    status = {
        "at": T0,
        "topics": {"orders": 13, "order-events": 50, "orders-dlq": 0, "order-commands": 0},
        "lag": {},
        "analytics": msgspec.json.decode(msgspec.json.encode(an.snapshot())),
        "services": {},
    }
    console = Console(width=160, record=True)
    console.print(render(status, {}, "header"))
    lines = [line for line in console.export_text().splitlines() if "funnel" in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "placed 13 / reserved 10 / paid 4 / shipped 2" in line
    assert "rejected 2 · payment failed 2 · expired 2 · cancelled 3" in line
    # an analytics without the lifecycle (older, or not up yet): no funnel line, no error
    old = {**status, "analytics": {"totals": {"reserved": 1}}}
    console = Console(width=160, record=True)
    console.print(render(old, {}, "header"))
    assert "funnel" not in console.export_text()
