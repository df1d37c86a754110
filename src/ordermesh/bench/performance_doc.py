"""``docs/performance.md`` and its chart, rendered from a ``bench mesh`` result.

The page is generated, never edited by hand: ``ordermesh bench mesh`` rewrites it (and
``docs/performance.svg``) from the numbers it just wrote to ``bench-results/``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from ordermesh.bench.mesh import REST_OF_MACHINE

DOC_NAME: Final = "performance.md"
CHART_NAME: Final = "performance.svg"
# the page's hand-written part starts at this heading and survives reruns
NOTES_HEADING: Final = "## Findings (hand-written; kept when the page is regenerated)"
PERCENTILES: Final = ("p50", "p95", "p99")


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _verdict(report: Mapping[str, Any] | None) -> str:
    if not report:
        return "—"
    if report.get("ok"):
        pending = report.get("pending") or 0
        return "OK" if not pending else f"OK ({pending} pending)"
    counts = report.get("violation_counts") or {}
    return "FAILED: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _table(header: Sequence[str], align: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _setup_line(result: Mapping[str, Any]) -> str:
    setup = result.get("setup", {})
    machine = result.get("machine", {})
    db = setup.get("db", "sqlite")
    stores = "SQLite stores" if db == "sqlite" else "a local PostgreSQL (durable settings)"
    return (
        f"Measured {result.get('at', '?')} on Kafka {machine.get('kafka', '?')} (KRaft;"
        f" {setup.get('broker', '?')}), topics of {setup.get('partitions', '?')}"
        f" partitions; {setup.get('orders', 0):,} orders per drain, records of"
        f" {setup.get('record_bytes', '?')} B on average (key + value of the load generator's"
        f" orders), {setup.get('skus', '?')} SKUs, {100 * setup.get('malformed_ratio', 0):g}%"
        f" malformed, {stores}, batches of up to {setup.get('batch_max', '?')} records."
    )


def _machine_table(machine: Mapping[str, Any]) -> str:
    ram = machine.get("ram_gib")
    rows = [
        ["CPUs", f"{machine.get('cpus', '?')} × {machine.get('cpu_model', '?')}"],
        ["RAM", f"{ram} GiB" if ram is not None else "?"],
        [
            "Python",
            f"{machine.get('python', '?')}, confluent-kafka {machine.get('confluent_kafka', '?')}",
        ],
        ["Kafka", f"{machine.get('kafka', '?')} on {machine.get('java', '?')}"],
        ["platform", str(machine.get("platform", "?"))],
    ]
    return _table(["", ""], ["---", "---"], rows)


def _throughput_table(result: Mapping[str, Any]) -> str:
    verdicts = [_verdict(run.get("verify")) for run in result.get("drain") or []]
    rows = []
    mesh_rows = 0
    for row in result.get("rows") or []:
        pct = row.get("pct_of_producer")
        verdict = "—"
        if row["what"].startswith("whole mesh") and mesh_rows < len(verdicts):
            verdict = verdicts[mesh_rows]
            mesh_rows += 1
        rows.append(
            [
                row["what"],
                f"{row['rate']:,.0f} {row['unit']}",
                f"{pct:.1f}%" if pct is not None else "—",
                verdict,
            ]
        )
    return _table(
        ["what", "rate", "% of ProducerPerformance", "verify"], ["---", "---:", "---:", "---"], rows
    )


def by_rate(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Latency runs from the lowest rate to the highest."""
    return sorted(runs, key=lambda run: float(run["rate"]))


def _latency_table(runs: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for run in by_rate(runs):
        lat = run["created_to_event_ms"]
        backlog = run.get("backlog_at_load_end", 0)
        rows.append(
            [
                f"{run['rate']:,.0f}",
                f"{run['decided_per_s']:,.0f}",
                f"{run['orders']:,}",
                *(_ms(lat.get(p)) for p in (*PERCENTILES, "max")),
                f"{backlog:,}",
                _verdict(run.get("verify")),
            ]
        )
    return _table(
        [
            "load (orders/s)",
            "decided/s in window",
            "orders measured",
            "p50",
            "p95",
            "p99",
            "max",
            "inventory backlog at load end",
            "verify",
        ],
        ["---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"],
        rows,
    )


def _api_table(api: Mapping[str, Any]) -> str:
    ack, reserved = api["post_ack_ms"], api["post_to_reserved_ms"]
    outcomes = api.get("outcomes", {})
    row = [
        f"{api['background_rate']:,.0f} orders/s",
        f"{api['orders']} at {api['rate']:g}/s ({outcomes.get('RESERVED', 0)} RESERVED)",
        *(_ms(ack.get(p)) for p in PERCENTILES),
        *(_ms(reserved.get(p)) for p in PERCENTILES),
    ]
    return _table(
        [
            "background load",
            "sample",
            "POST ack p50",
            "p95",
            "p99",
            "POST→RESERVED p50",
            "p95",
            "p99",
        ],
        ["---:", "---", "---:", "---:", "---:", "---:", "---:", "---:"],
        [row],
    )


def render_markdown(result: Mapping[str, Any], *, chart: str | None = CHART_NAME) -> str:
    """The whole page for ``result`` (``chart``: the chart's file name beside it, if any)."""
    out = [
        "# Performance",
        "",
        "What the whole mesh does on one machine, next to what Kafka's own tools do on the",
        "same machine and broker. This page is generated by `ordermesh bench mesh` (the",
        f"numbers are in `{result.get('file', 'bench-results/mesh-<time>.json')}`);"
        " rerun the command to update it.",
        "",
    ]
    if chart:
        out += [f"![throughput and latency]({chart})", ""]
    out += [
        "## Command",
        "",
        "```bash",
        str(result.get("command", "ordermesh bench mesh")),
        "```",
        "",
        _setup_line(result),
        "",
        "## Machine",
        "",
        _machine_table(result.get("machine", {})),
        "",
    ]
    if result.get("rows"):
        out += ["## Throughput", "", _throughput_table(result), ""]
        out += _throughput_notes(result)
    if result.get("latency") or result.get("api"):
        out += ["## Latency", ""]
        if result.get("latency"):
            out += [
                "Created → decided, per order created in the window (after the warm-up):",
                "",
                _latency_table(result["latency"]),
                "",
            ]
        if result.get("api"):
            out += [
                "The API path, a sample of orders POSTed while the load generator runs:",
                "",
                _api_table(result["api"]),
                "",
            ]
        out += _latency_notes(result)
    if result.get("lifecycle"):
        out += lifecycle_section(result["lifecycle"])
    notes = result.get("notes") or []
    if notes:
        out += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(out)


def _throughput_notes(result: Mapping[str, Any]) -> list[str]:
    kafka = result.get("kafka") or {}
    lines = ["How each rate is measured:", ""]
    warm = result.get("warm_up")
    if warm:
        rest = (warm.get("cpu") or {}).get(REST_OF_MACHINE, {}).get("us_per_order")
        lines.append(
            f"- Before anything is timed, the mesh drains {warm['orders']:,} orders once on"
            f" the same broker ({warm['orders_per_s']:,.0f} orders/s"
            + (f"; the broker and the OS took {rest:.1f} µs per order" if rest else "")
            + "): a new broker spends its first minutes of load compiling its hot paths"
            " (its JIT compiler threads took more CPU than its request threads in a first"
            " drain), which a broker in service has long done. Every part below runs after"
            " it."
        )
    if kafka:
        producer = kafka["producer_performance"]
        consumer = kafka["consumer_performance"]
        lines += [
            f"- ProducerPerformance: `{producer['command']}`; its records/s is 100%. The Java"
            " client's defaults otherwise (no compression; the mesh's producers use lz4),"
            " random uppercase payloads, no keys.",
            f"- ConsumerPerformance: `{consumer['command']}`; `fetch.nMsg.sec`, i.e. after"
            f" its group join ({consumer['rebalance_ms']} ms; counting it:"
            f" {consumer['records_per_s']:,.0f} records/s).",
        ]
    if result.get("python_consume"):
        lines.append(
            "- The Python loop: one confluent-kafka consumer with the services' consumer"
            " settings, `consume(5000)` in a loop, counting records and bytes, timed from"
            " its first partition assignment to the last record."
        )
    if result.get("drain"):
        lines += [
            "- The load generator: `ordermesh load --max`'s code producing the drain's"
            " backlog (idempotent, acks=all, lz4), from the first record to the last ack.",
            "- The whole mesh: the backlog is produced first, then every service is started"
            " as `ordermesh up` starts it (one process each, supervised), and the time runs"
            " from their start until every consumer group's committed lag is 0, so process"
            " start and group joins are in it. Then the services are stopped and"
            " `ordermesh verify` checks the stores against the topics.",
        ]
        for run in result["drain"]:
            after = run.get("after_first_commit_orders_per_s")
            if after:
                lines.append(
                    f"  - {run['db']}, {run['inventory_instances']} inventory: first commit"
                    f" after {run['first_commit_s']} s; from there {after:,.0f} orders/s."
                )
        lines += _cpu_table(result["drain"])
    return [*lines, ""]


def _cpu_table(drains: list[Mapping[str, Any]]) -> list[str]:
    """Where each drain's CPU went (read from /proc while it ran)."""
    lines: list[str] = []
    for run in drains:
        if run.get("cpu"):
            what = f"the drain ({run['db']}, {run['inventory_instances']} inventory"
            lines += cpu_rows(run, what)
    return lines


def cpu_rows(run: Mapping[str, Any], what: str) -> list[str]:
    """The "process | CPU s | µs per order" table of one run's ``cpu``, captioned."""
    lines = [
        "",
        f"Where the CPU of {what}, {run['seconds']} s on {os.cpu_count() or 1} cores) went:",
        "",
        "| process | CPU s | µs per order |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {row['cpu_s']:.2f} | {row['us_per_order']:.1f} |"
        for name, row in run["cpu"].items()
    ]
    return lines


def _latency_notes(result: Mapping[str, Any]) -> list[str]:
    setup = result.get("setup", {})
    lines = []
    if result.get("latency"):
        lines += [
            f"Each rate runs on a fresh mesh, once it is ready (every group's partitions"
            f" assigned, the API and the dashboard answering): the load generator"
            f" (`ordermesh load --rate R`, its own process) runs {setup.get('warmup_s', 3):g} s"
            f" of warm-up plus a {setup.get('window_s', 20):g} s window. An order's latency is"
            " the Kafka timestamp (CreateTime) of its outcome record in `order-events` minus"
            " the order's `created_at`: the load generator stamps `created_at` just before it"
            " produces the order (it produces in 10 ms slices and sends each slice at once, as"
            " that many paced clients would), and the inventory's producer stamps the event"
            " when it hands"
            " it to Kafka, after the batch's database transaction committed. Both come from"
            " the one machine clock. It covers the producer's batching, the broker, the"
            " inventory's poll, decision and commit; it leaves out the event's own"
            " acknowledgement (milliseconds). A backlog left at the end of the load means"
            " the mesh did not keep up with that rate.",
            "",
        ]
    if result.get("api"):
        lines += [
            "The API sample: each order is POSTed (answered once Kafka acknowledged it),"
            " then read with `GET /orders/{id}?wait=10`, which answers once the tracker"
            " shows a decision; POST→RESERVED runs from sending the POST to that answer."
            " The client is a bare keep-alive HTTP/1.1 connection in the benchmark's"
            " process, which does nothing else meanwhile; the load runs in another process.",
            "",
        ]
    return lines


def lifecycle_section(life: Mapping[str, Any]) -> list[str]:
    """ "The whole life of an order": the lifecycle drains, their CPU, and latency."""
    drain, realistic = life.get("drain"), life.get("realistic")
    lines = ["## The whole life of an order", ""]
    rows = []
    for run, gateway in ((drain, "no faults"), (realistic, None)):
        if not run:
            continue
        if gateway is None:
            ms = run.get("gateway_latency_ms", {})
            gateway = f"latency p50 {ms.get('p50', 0):g} ms, p99 {ms.get('p99', 0):g} ms"
        pct = run.get("pct_of_reservation_only")
        rows.append(
            [
                gateway,
                f"{run['orders']:,}",
                f"{run.get('shipped', 0):,}",
                f"{run['shipped_s']:.1f} s",
                f"{run['seconds']:.1f} s",
                f"{run['orders_per_s']:,.0f}",
                f"{pct:.1f}%" if pct is not None else "—",
                _verdict(run.get("verify")),
            ]
        )
    if rows:
        lines += [
            "Each lifecycle drain as the reservation-only drain above, with the gateway,"
            " payments and fulfilment (shipments ready at once, no reservation expiring, no"
            " declining cards, no cancels), timed from the services' start until every valid"
            " order was SHIPPED and its capture recorded: the tracker shows every order"
            " SHIPPED, payments has no call due and fulfilment nothing scheduled, neither an"
            " unpublished event, every group's lag is 0, and nothing was appended to"
            " `order-events` or `order-commands` meanwhile. Then `ordermesh verify` audits"
            " every order's life against the gateway's ledger.",
            "",
            _table(
                [
                    "gateway",
                    "orders",
                    "SHIPPED",
                    "last SHIPPED",
                    "settled",
                    "orders/s",
                    "% of the reservation-only drain",
                    "verify",
                ],
                ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---"],
                rows,
            ),
            "",
        ]
    if drain and drain.get("reservation_only_orders_per_s"):
        lines += [
            f"The reservation-only drain of the same run: "
            f"{drain['reservation_only_orders_per_s']:,.0f} orders/s.",
            "",
        ]
    bound = (realistic or {}).get("bound")
    if bound:
        lines += [
            f"With the realistic gateway a call takes {bound['mean_call_ms']:g} ms on average;"
            f" payments keeps up to {bound['in_flight']} calls in flight and an order needs"
            f" two (authorize, capture), so by Little's law it can finish at most"
            f" {bound['orders_per_s']:,.0f} orders/s per payments instance, whatever the"
            " rest of the mesh does.",
            "",
        ]
    for run, what in ((drain, "the lifecycle drain (no gateway faults"), (realistic, None)):
        if run and run.get("cpu"):
            lines += cpu_rows(run, what or "the lifecycle drain (realistic gateway")
    latency = life.get("latency")
    if latency:
        lines += ["", *_life_latency(latency, life.get("latency_vs_reservation_only"))]
    return [*lines, ""]


def _life_latency(run: Mapping[str, Any], versus: Mapping[str, Any] | None) -> list[str]:
    reserved, shipped = run["created_to_reserved_ms"], run["created_to_shipped_ms"]
    rows = [
        [
            f"lifecycle mesh at {run['rate']:,.0f} orders/s",
            f"{run['orders']:,}",
            *(_ms(reserved.get(p)) for p in PERCENTILES),
            f"{run.get('shipped', 0):,}",
            *(_ms(shipped.get(p)) for p in PERCENTILES),
            _verdict(run.get("verify")),
        ]
    ]
    if versus:
        theirs = versus["reservation_only_ms"]
        rows.append(
            [
                f"reservation-only mesh at {versus['rate']:,.0f} orders/s (above)",
                "",
                _ms(theirs.get("p50")),
                "",
                _ms(theirs.get("p99")),
                "",
                "",
                "",
                "",
                "",
            ]
        )
    settled = run.get("settled_s")
    lines = [
        "Created → RESERVED (the `OrderReserved` record's timestamp minus `created_at`, as"
        " above) and created → SHIPPED (the `OrderShipped` record's) of the orders created"
        f" in the window, on a fresh lifecycle mesh (no gateway faults) under"
        f" {run['rate']:,.0f} orders/s of `ordermesh load --rate`, as `up` runs it (its"
        " default shares of declining cards and cancels among them):",
        "",
        _table(
            [
                "mesh",
                "orders",
                "→ RESERVED p50",
                "p95",
                "p99",
                "shipped",
                "→ SHIPPED p50",
                "p95",
                "p99",
                "verify",
            ],
            ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"],
            rows,
        ),
        "",
    ]
    if versus:
        ratio = versus["ratio"]
        lines.append(
            "Created → RESERVED with the whole life running, over the reservation-only mesh's:"
            f" p50 × {ratio.get('p50')}, p99 × {ratio.get('p99')}."
        )
    lines.append(
        f"Every life had ended {settled} s after the load."
        if settled is not None
        else "The mesh had not finished every life when the latency run stopped waiting for"
        f" it (inventory backlog at the load's end: {run.get('backlog_at_load_end', 0):,};"
        f" statuses then: {run.get('statuses', {})}); verify counts what was left as pending."
    )
    return [*lines, ""]


def write_chart(result: Mapping[str, Any], path: Path) -> None:
    """Throughput bars (with % of ProducerPerformance) and latency percentiles, as SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = result.get("rows") or []
    latency = result.get("latency") or []
    api = result.get("api")
    panels = int(bool(rows)) + int(bool(latency or api))
    if panels == 0:
        return
    # stable ids and no date: a rerun with equal numbers writes an equal file
    matplotlib.rcParams["svg.hashsalt"] = "ordermesh"
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.6), squeeze=False)
    ax_iter = iter(axes[0])
    if rows:
        ax = next(ax_iter)
        labels = [row.get("label", row["what"]) for row in rows]
        rates = [row["rate"] for row in rows]
        bars = ax.barh(range(len(rows)), rates, color="#4C72B0")
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("records or orders per second")
        ax.set_title("throughput (% of ProducerPerformance)", fontsize=10)
        for bar, row in zip(bars, rows, strict=True):
            pct = row.get("pct_of_producer")
            text = f" {row['rate']:,.0f}" + (f" ({pct:.0f}%)" if pct is not None else "")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, text, va="center", size=7)
        ax.set_xlim(0, max(rates) * 1.35)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:,.0f}"))
    if latency or api:
        ax = next(ax_iter)
        groups = [(f"{run['rate']:,.0f}/s", run["created_to_event_ms"]) for run in by_rate(latency)]
        if api:
            groups.append((f"API at {api['background_rate']:,.0f}/s", api["post_to_reserved_ms"]))
        width = 0.8 / len(PERCENTILES)
        for i, p in enumerate(PERCENTILES):
            # a missing value is no bar (NaN), not a zero on a log scale
            heights = [math.nan if ms.get(p) is None else ms[p] for _, ms in groups]
            ax.bar([g + i * width for g in range(len(groups))], heights, width, label=p)
        ax.set_xticks(
            [g + width for g in range(len(groups))], [name for name, _ in groups], fontsize=8
        )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("ms (log scale)")
        ax.set_title("created → decided latency (API: POST → RESERVED)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)


def write_docs(result: Mapping[str, Any], docs_dir: Path) -> list[Path]:
    """Rewrite ``performance.md`` and its chart in ``docs_dir``; the files written."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    written = []
    chart: str | None = CHART_NAME
    try:
        write_chart(result, docs_dir / CHART_NAME)
        written.append(docs_dir / CHART_NAME)
    except ImportError:
        # matplotlib comes with the dev extra; the page stands without its chart
        chart = None
    page = docs_dir / DOC_NAME
    page.write_text(render_markdown(result, chart=chart) + kept_notes(page))
    written.append(page)
    return written


def kept_notes(page: Path) -> str:
    """The hand-written part of an existing page: from the ``NOTES_HEADING`` line on
    (findings, before/after comparisons), which a rerun keeps as it is."""
    try:
        text = page.read_text()
    except OSError:
        return ""
    at = text.find(f"\n{NOTES_HEADING}\n")
    return "" if at < 0 else text[at:]
