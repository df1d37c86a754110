"""The live dashboard in headless Chromium: loads cleanly, draws, shows /snapshot's numbers.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``), driven by the
Python ``playwright`` package; ``playwright install`` (a browser download) is never run.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from ordermesh import lifecycle
from ordermesh.config import Settings
from tests.conftest import ServiceProcess, wait_for
from tests.integration.test_analytics import (
    SAGA_COPIES,
    expected_life,
    expected_totals,
    free_port,
    get_json,
    life_matches,
    produce_dead_letters,
    produce_saga,
    run_pipeline,
    start_analytics,
    totals_match,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NUMERIC_FORMATS = {"int", "rate", "money", "ms", "pct"}

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason=f"{CHROMIUM} missing (.ci/run installs it)"
)


def resolve(doc: Any, path: str) -> Any:
    """The page's path rule: dot-separated; the longest key prefixing the rest wins."""
    cur, rest = doc, path
    while rest:
        if isinstance(cur, list):
            head, _, rest = rest.partition(".")
            if not head.isdigit() or int(head) >= len(cur):
                return None
            cur = cur[int(head)]
            continue
        if not isinstance(cur, dict):
            return None
        if rest in cur:
            return cur[rest]
        keys = [k for k in cur if rest.startswith(k + ".")]
        if not keys:
            return None
        key = max(keys, key=len)
        cur, rest = cur[key], rest[len(key) + 1 :]
    return cur


def shown_matches(text: str, value: Any, kind: str = "") -> bool:
    """True if the displayed ``text`` is ``value`` rounded to the digits it shows (a
    ``pct`` share in percent)."""
    if value is None:
        return text == "–"
    match = re.fullmatch(r"-?[\d,]+(?:\.(\d+))?", text)
    if match is None:
        return False
    digits = len(match.group(1) or "")
    shown = float(text.replace(",", ""))
    expected = float(value) * (100 if kind == "pct" else 1)
    return abs(shown - expected) <= 0.5 * 10**-digits + 1e-9


def freeze_and_compare(page: Any) -> tuple[Any, Any, set[tuple[str, str]]]:
    """Freeze the page, render the snapshot of this moment, compare every number shown
    to the JSON; the snapshot, the groups and the (source, path) of every number."""
    page.evaluate("window.ordermesh.pause()")
    snap, groups = page.evaluate(
        """async () => {
            const get = async (u) => (await fetch(u, {cache: "no-store"})).json();
            const [snap, groups] = await Promise.all([get("/snapshot"), get("/groups")]);
            window.ordermesh.render(snap, groups);
            return [snap, groups];
        }"""
    )
    shown = page.evaluate(
        """() => Array.from(document.querySelectorAll("[data-metric]")).map((el) => ({
            path: el.dataset.metric, source: el.dataset.source || "snapshot",
            format: el.dataset.format, value: el.dataset.value, text: el.textContent }))"""
    )
    docs = {"snapshot": snap, "groups": groups}
    wrong = []
    for item in shown:
        value = resolve(docs[item["source"]], item["path"])
        numeric = item["format"] in NUMERIC_FORMATS
        if json.loads(item["value"]) != value or (
            numeric and not shown_matches(item["text"], value, item["format"])
        ):
            wrong.append((item, value))
    assert not wrong, wrong[:10]
    return snap, groups, {(item["source"], item["path"]) for item in shown}


def watch_problems(page: Any) -> list[str]:
    """Console errors and warnings and page errors of ``page``, as they come."""
    problems: list[str] = []
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning")
            else None
        ),
    )
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    return problems


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium. Launched only once the test's records are in: playwright's
    sync API runs an event loop in this thread, where asyncio.run (verify's) cannot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_dashboard_draws_and_shows_the_snapshot(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    port = free_port()
    start_analytics(service_factory, settings, port, "analytics")
    # paced, so the last seconds of the series (what the charts end on) hold data
    report = run_pipeline(settings, service_factory, count=2_000, rate=1_000)
    expected = expected_totals(report)
    wait_for(lambda: totals_match(port, expected), 60, "analytics totals == verify")
    wait_for(
        lambda: (get_json(port, "/groups") or {}).get("groups"), 30, "the consumer groups view"
    )

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        problems = watch_problems(page)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function(
            """(decided) => {
                const s = window.ordermesh && window.ordermesh.state;
                return s && s.snapshot && s.snapshot.totals.decided === decided && s.groups
                    && window.ordermeshCharts.throughput && window.ordermeshCharts.latency;
            }""",
            arg=expected["decided"],
            timeout=20_000,
        )

        # both charts drew lines: non-background pixels, and their last values are exposed
        for name in ("throughput", "latency"):
            inked = page.evaluate(
                """(id) => {
                    const c = document.getElementById(id);
                    const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                    let n = 0;
                    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
                    return n;
                }""",
                f"chart-{name}",
            )
            assert inked > 2_000, (name, inked)
            last = json.loads(page.get_attribute(f"#chart-{name}", "data-last") or "null")
            assert last, name
        charts = page.evaluate("window.ordermeshCharts")
        assert charts["throughput"]["points"] == 300
        assert sum(page.evaluate("window.ordermesh.state.snapshot.series.decided")) > 0

        snap, _groups, paths = freeze_and_compare(page)
        assert snap["totals"]["decided"] == expected["decided"]
        dlq_reason = next(iter(snap["totals"]["dlq_by_reason"]))
        for must in (
            ("snapshot", "totals.placed"),
            ("snapshot", "totals.reserved"),
            ("snapshot", "totals.rejected.OUT_OF_STOCK"),
            ("snapshot", "totals.cancelled"),
            ("snapshot", "totals.revenue.USD"),
            ("snapshot", "totals.dlq"),
            ("snapshot", f"totals.dlq_by_reason.{dlq_reason}"),
            ("snapshot", "windows.10s.placed_per_s"),
            ("snapshot", "windows.60s.latency_ms.p99"),
            ("snapshot", "top_skus.all_time.0.quantity"),
            ("snapshot", "dlq_recent.0.at"),
            ("groups", "groups.inventory.partitions.0.lag"),
            ("groups", "groups.analytics.member_count"),
        ):
            assert must in paths, must
        # the DLQ panel lists the latest entries with their reasons
        reasons = page.locator("#dlq-recent td.reason").all_text_contents()
        assert reasons == [e["reason"] for e in snap["dlq_recent"]]
        assert not problems, problems


def test_dashboard_shows_the_order_life_and_alerts_on_a_dlq_rate(
    settings: Settings, service_factory: Callable[..., ServiceProcess]
) -> None:
    port = free_port()
    start_analytics(service_factory, settings, port, "analytics")
    # every branch of an order's life, and 3 dead letters among 263 orders records (1.1 %,
    # under the default 5 %: a load's malformed share, not an incident)
    produce_saga(settings)
    k = SAGA_COPIES
    expected = expected_life()
    wait_for(lambda: life_matches(port, "/snapshot", expected), 60, "the order's life")

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        problems = watch_problems(page)
        page.goto(f"http://127.0.0.1:{port}/")
        # the dead letters of the last 60 s are counted once their second is complete
        page.wait_for_function(
            """(shipped) => {
                const s = window.ordermesh && window.ordermesh.state.snapshot;
                return s && s.lifecycle.all.funnel.SHIPPED === shipped && s.dlq_alert.dlq === 3
                    && s.dlq_alert.orders_records === 263;
            }""",
            arg=2 * k,
            timeout=20_000,
        )
        assert page.locator("#alert").is_hidden()
        rule = page.locator("#alert-rule").inner_text()
        assert "5.0% of that minute's orders records" in rule and "not on any dead letter" in rule

        snap, _groups, paths = freeze_and_compare(page)
        assert not snap["dlq_alert"]["firing"]
        for must in (
            *(f"lifecycle.all.funnel.{s}" for s in lifecycle.FUNNEL),
            *(f"lifecycle.all.conversion.{s}" for s in lifecycle.FUNNEL[1:]),
            *(f"lifecycle.windows.60s.funnel.{s}" for s in lifecycle.FUNNEL),
            "lifecycle.all.ends.REJECTED.causes.OUT_OF_STOCK",
            "lifecycle.all.ends.PAYMENT_FAILED.causes.card_declined",
            "lifecycle.all.ends.PAYMENT_FAILED.causes.insufficient_funds",
            "lifecycle.all.ends.EXPIRED.total",
            "lifecycle.all.ends.CANCELLED.causes.PAID",
            "lifecycle.all.decline_rate",
            "lifecycle.all.expiry_rate",
            "lifecycle.windows.60s.time_to_ship_ms.p50",
            "lifecycle.windows.60s.time_to_ship_ms.p99",
            "lifecycle.all.time_to_pay_ms.p99",
            *(f"lifecycle.all.money.{kind}.USD" for kind in expected["money"]),
            "lifecycle.by_status.RESERVED",
            "dlq_alert.threshold",
            "dlq_alert.ratio",
        ):
            assert ("snapshot", must) in paths, must

        # the panels, as a reader sees them
        steps = page.locator("#funnel-body tr").evaluate_all(
            "rows => rows.map(r => r.dataset.step)"
        )
        assert steps == list(lifecycle.FUNNEL)
        shipped_row = page.locator('#funnel-body tr[data-step="SHIPPED"]').inner_text()
        assert f"{2 * k}" in shipped_row and "50.0" in shipped_row  # 2k of 4k paid
        ends = page.locator("#dropoff-body tr.end").evaluate_all(
            "rows => rows.map(r => r.dataset.end)"
        )
        assert ends == ["REJECTED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED"]
        dropoff = page.locator("#dropoff-body").inner_text()
        assert "card_declined" in dropoff and "insufficient_funds" in dropoff and "PAID" in dropoff
        money = page.locator("#money-body").inner_text()
        assert f"{30.5 * k:,.2f}" in money and f"{62.0 * k:,.2f}" in money
        assert page.locator("#money-currency").inner_text() == "in USD"
        ship_p50 = page.locator(
            '#kpi-ship-time [data-metric="lifecycle.windows.60s.time_to_ship_ms.p50"]'
        ).inner_text()
        assert abs(float(ship_p50.replace(",", "")) - 1300) <= 13
        assert (
            page.locator('#kpi-paid [data-metric="lifecycle.all.decline_rate"]').inner_text()
            == "28.6"
        )  # 2 declines in 7 authorization outcomes

        # 30 more dead letters in the same minute: 33 of 263 is above 5 %, the alert fires
        page.evaluate("window.ordermesh.resume()")
        produce_dead_letters(settings, 30)
        page.wait_for_function(
            """() => {
                const s = window.ordermesh.state.snapshot;
                return s.dlq_alert.firing && !document.getElementById("alert").hidden;
            }""",
            timeout=20_000,
        )
        alert = page.locator("#alert").inner_text()
        assert "above the" in alert and "5.0% threshold" in alert
        assert "CancelRejected" in alert  # the reasons of the minute
        page.screenshot(path=str(settings.data_dir / "dashboard-lifecycle.png"), full_page=True)
        assert not problems, problems
