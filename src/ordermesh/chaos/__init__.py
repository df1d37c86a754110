"""The fault matrix: every scenario breaks a running mesh under load, then verifies it.

A scenario is one entry of ``SCENARIOS``: a name, whether ``--quick`` runs it, whether
its mesh runs the whole life of an order (the gateway, payments, fulfilment), and a
function that applies its fault to a running :class:`Trial` (the mesh of one scenario,
its broker and its load). The matrix runs each scenario on a fresh mesh (own data dir,
own topic prefix) against local brokers it starts on free ports, waits until every
consumer group has drained (and, for the whole life, until nothing is pending), stops
the services, and turns ``ordermesh.verify`` into one row: orders placed, lost,
duplicate and conflicting outcomes, stock conserved, DLQ entries, the time to drain,
and for the whole life the orders shipped and ended and whether the money is right.

- ``harness``: ``Trial``, ``LoadRun``, ``Scenario``, ``Brokers``, ``run_scenario``,
  ``run_matrix``;
- ``report``: ``Row``, ``row_from_verify``, the table, the docs block, JSON;
- ``scenarios``: the inventory's side (orders end at their reservation);
- ``lifecycle``: the whole life's rows;
- ``matrix``: ``SCENARIOS``, ``select``, ``render_markdown``.

Adding a scenario is one function and one ``Scenario(...)`` line.
"""

from __future__ import annotations

from ordermesh.chaos.harness import (
    DRAIN_TIMEOUT_S,
    MID_STREAM_EVENTS,
    RATE,
    SKUS,
    STOCK,
    Brokers,
    LoadRun,
    Scenario,
    Trial,
    run_matrix,
    run_scenario,
)
from ordermesh.chaos.matrix import SCENARIOS, render_markdown, select
from ordermesh.chaos.report import (
    COLUMNS,
    DOC_BEGIN,
    DOC_END,
    LOSS_VIOLATIONS,
    STOCK_VIOLATIONS,
    Row,
    RowStatus,
    row_from_verify,
    summary_json,
    table_rows,
    write_doc,
)

__all__ = [
    "COLUMNS",
    "DOC_BEGIN",
    "DOC_END",
    "DRAIN_TIMEOUT_S",
    "LOSS_VIOLATIONS",
    "MID_STREAM_EVENTS",
    "RATE",
    "SCENARIOS",
    "SKUS",
    "STOCK",
    "STOCK_VIOLATIONS",
    "Brokers",
    "LoadRun",
    "Row",
    "RowStatus",
    "Scenario",
    "Trial",
    "render_markdown",
    "row_from_verify",
    "run_matrix",
    "run_scenario",
    "select",
    "summary_json",
    "table_rows",
    "write_doc",
]
