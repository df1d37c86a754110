"""The live dashboard in headless Chromium: loads cleanly, draws, shows /snapshot's numbers.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``), driven by the
Python ``playwright`` package; ``playwright install`` (a browser download) is never run.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ordermesh.config import Settings
from tests.conftest import ServiceProcess, wait_for
from tests.integration.test_analytics import (
    expected_totals,
    free_port,
    get_json,
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
NUMERIC_FORMATS = {"int", "rate", "money", "ms"}

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


def shown_matches(text: str, value: Any) -> bool:
    """True if the displayed ``text`` is ``value`` rounded to the digits it shows."""
    if value is None:
        return text == "–"
    match = re.fullmatch(r"-?[\d,]+(?:\.(\d+))?", text)
    if match is None:
        return False
    digits = len(match.group(1) or "")
    shown = float(text.replace(",", ""))
    return abs(shown - float(value)) <= 0.5 * 10**-digits + 1e-9


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def test_dashboard_draws_and_shows_the_snapshot(
    settings: Settings, service_factory: Callable[..., ServiceProcess], browser: Any
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

    page = browser.new_page(viewport={"width": 1600, "height": 1000})
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

    # freeze the page, render the snapshot of this moment, compare every number shown
    page.evaluate("window.ordermesh.pause()")
    snap, groups = page.evaluate(
        """async () => {
            const get = async (u) => (await fetch(u, {cache: "no-store"})).json();
            const [snap, groups] = await Promise.all([get("/snapshot"), get("/groups")]);
            window.ordermesh.render(snap, groups);
            return [snap, groups];
        }"""
    )
    assert snap["totals"]["decided"] == expected["decided"]
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
            numeric and not shown_matches(item["text"], value)
        ):
            wrong.append((item, value))
    assert not wrong, wrong[:10]
    paths = {(item["source"], item["path"]) for item in shown}
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
