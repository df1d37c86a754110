"""The matrix: every scenario, which of them ``--quick`` runs, and its docs block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ordermesh.chaos.harness import Scenario
from ordermesh.chaos.lifecycle import LIFECYCLE_SCENARIOS
from ordermesh.chaos.report import Row, markdown_block
from ordermesh.chaos.scenarios import INVENTORY_SCENARIOS
from ordermesh.errors import OrderMeshError

SCENARIOS: Final[tuple[Scenario, ...]] = (*INVENTORY_SCENARIOS, *LIFECYCLE_SCENARIOS)


def select(names: Sequence[str] | None, *, quick: bool) -> list[Scenario]:
    """The scenarios to run: those named, else the quick subset or all."""
    if names:
        known = {s.name: s for s in SCENARIOS}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise OrderMeshError(f"unknown scenario(s) {unknown}; known: {sorted(known)}")
        return [known[n] for n in names]
    return [s for s in SCENARIOS if s.quick or not quick]


def render_markdown(rows: Sequence[Row], command: str, seconds: float) -> str:
    """The generated part of docs/reliability.md: command, table, scenarios, notes."""
    return markdown_block(rows, command, seconds, {s.name: (s.summary, s.quick) for s in SCENARIOS})
