"""A scenario's row: what ``verify`` found, read into the columns of the matrix, and the
matrix as a terminal table, a block of docs/reliability.md and JSON."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from ordermesh import lifecycle

RowStatus = Literal["ok", "FAIL", "skipped", "error"]

# verify's violation kinds that mean "stock not conserved"
STOCK_VIOLATIONS: Final = (
    "stock_not_conserved",
    "negative_stock",
    "reserved_mismatch_db",
    "reserved_mismatch_events",
)
# verify's violation kinds that mean "an accepted record has no result"
LOSS_VIOLATIONS: Final = ("lost", "invalid_not_in_dlq")
# the audit's kinds for one order charged or captured more than once (the gateway's ledger)
DOUBLE_CHARGE_VIOLATIONS: Final = ("double-charge", "double-capture")
# the audit's kinds for money not where the order's end says it must be
MONEY_VIOLATIONS: Final = (
    *DOUBLE_CHARGE_VIOLATIONS,
    "money-shipped",
    "money-kept",
    "ledger-without-order",
    "ledger_unreachable",
    "shipped-uncaptured",
    "captured-unshipped",
)


@dataclass
class Row:
    """What one scenario measured."""

    scenario: str
    status: RowStatus
    placed: int = 0
    lost: int = 0
    pending: int = 0
    duplicates: int = 0
    conflicting: int = 0
    stock_conserved: bool = False
    dlq_entries: int = 0
    drain_s: float | None = None
    verify_ok: bool = False
    seconds: float = 0.0
    # the whole life (a scenario run with the gateway, payments and fulfilment)
    lifecycle: bool = False
    shipped: int = 0
    ended: int = 0
    double_charges: int = 0
    money_ok: bool = False
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verify: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, list | dict | set | tuple):
        return len(value)
    return 0


def row_from_verify(
    name: str, report: dict[str, Any], acked: int, expected: dict[str, int] | None = None
) -> Row:
    """A row from ``verify``'s ``as_dict()`` (read defensively: its keys grow over time).

    ``expected``: violations the fault causes by design; verify counts as ok when these
    are all it found (at most as many of each).
    """
    violations: dict[str, int] = dict(report.get("violation_counts") or {})
    allowed = expected or {}
    unexpected = {k: v for k, v in violations.items() if v > allowed.get(k, 0)}
    lost = sum(violations.get(kind, 0) for kind in LOSS_VIOLATIONS)
    # checks verify could not decide because a group has not committed the records yet:
    # not lost, but after a drain there must be none
    pending = violations.get("pending", 0) + _count(report.get("pending"))
    # records a producer saw acknowledged but the topic does not hold
    lost += max(0, acked - _count(report.get("orders_records")))
    life: Mapping[str, Any] = report.get("lifecycle") or {}
    statuses: Mapping[str, int] = life.get("statuses") or {}
    kept = _count(life.get("captured_cents")) - _count(life.get("refunded_cents"))
    return Row(
        scenario=name,
        status="ok",
        placed=_count(report.get("orders_records")),
        lost=lost,
        pending=pending,
        duplicates=_count(report.get("duplicate_outcomes")),
        conflicting=violations.get("conflicting_outcomes", 0),
        stock_conserved=not any(k in violations for k in STOCK_VIOLATIONS),
        dlq_entries=_count(report.get("dlq_entries")),
        verify_ok=bool(report.get("ok")) or (bool(violations) and not unexpected),
        shipped=statuses.get("SHIPPED", 0),
        ended=sum(n for s, n in statuses.items() if s in lifecycle.TERMINAL),
        double_charges=sum(violations.get(k, 0) for k in DOUBLE_CHARGE_VIOLATIONS),
        # the ledger read, nothing misplaced, and what it kept is exactly what shipped
        money_ok=bool(life.get("money_checked"))
        and not any(k in violations for k in MONEY_VIOLATIONS)
        and kept == _count(life.get("shipped_value_cents")),
        verify=report,
    )


# --- the report ----------------------------------------------------------------------------

COLUMNS: Final = (
    "scenario",
    "status",
    "placed",
    "lost",
    "pending",
    "duplicates",
    "conflicting",
    "stock conserved",
    "DLQ entries",
    "drain (s)",
    "shipped / ended",
    "money",
)


def table_rows(rows: Sequence[Row]) -> Iterator[list[str]]:
    for r in rows:
        yield [
            r.scenario,
            r.status,
            f"{r.placed:,}",
            str(r.lost),
            f"{r.pending:,}",
            f"{r.duplicates:,}",
            str(r.conflicting),
            "yes" if r.stock_conserved else "NO",
            f"{r.dlq_entries:,}",
            "—" if r.drain_s is None else f"{r.drain_s:.1f}",
            # a row without the whole life ends its orders at their reservation
            f"{r.shipped:,} / {r.ended:,}" if r.lifecycle else "—",
            ("ok" if r.money_ok else "NO") if r.lifecycle else "—",
        ]


DOC_BEGIN: Final = "<!-- chaos matrix: generated by `ordermesh chaos`, begin -->"
DOC_END: Final = "<!-- chaos matrix: end -->"


def write_doc(path: Path, generated: str) -> None:
    """Replace the generated block of ``path`` (the prose around it is kept)."""
    if path.exists():
        text = path.read_text()
        start, end = text.find(DOC_BEGIN), text.find(DOC_END)
        if start >= 0 and end > start:
            text = text[:start] + generated.rstrip("\n") + text[end + len(DOC_END) :]
            path.write_text(text)
            return
        path.write_text(text.rstrip("\n") + "\n\n" + generated)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Reliability\n\n" + generated)


def summary_json(rows: Sequence[Row], command: str, root: Path) -> str:
    ok = all(r.status in ("ok", "skipped") for r in rows)
    return json.dumps(
        {"ok": ok, "command": command, "work_dir": str(root), "rows": [r.as_dict() for r in rows]}
    )


def markdown_block(
    rows: Sequence[Row], command: str, seconds: float, faults: Mapping[str, tuple[str, bool]]
) -> str:
    """The generated part of docs/reliability.md: command, table, scenarios, notes.

    ``faults``: scenario name -> (what its fault is, whether ``--quick`` runs it).
    """
    lines = [
        DOC_BEGIN,
        "",
        f"Measured with `{command}` on {time.strftime('%Y-%m-%d')} "
        f"({os.cpu_count()} cores, broker on the same machine; {seconds / 60:.0f} min).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", "| scenario | fault | quick |", "|---|---|---|"]
    for r in rows:
        if r.scenario in faults:
            summary, quick = faults[r.scenario]
            lines.append(f"| {r.scenario} | {summary} | {'yes' if quick else ''} |")
    lines += ["", "What each run observed:", ""]
    for r in rows:
        said = "; ".join([*r.notes, *(f"**{p}**" for p in r.problems)])
        lines.append(f"- **{r.scenario}**: {said or '—'}")
    lines += ["", DOC_END]
    return "\n".join(lines) + "\n"
