"""`ordermesh chaos`: the fault matrix, one row per scenario."""

from __future__ import annotations

import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ordermesh.cli.common import AsJson, app, console, err_console, fail, make_settings
from ordermesh.errors import OrderMeshError

DEFAULT_DOC = Path("docs/reliability.md")


@app.command("chaos")
def chaos_cmd(
    quick: Annotated[
        bool, typer.Option("--quick", help="The CI subset: under 10 minutes on 2 cores.")
    ] = False,
    scenario: Annotated[
        list[str] | None,
        typer.Option("--scenario", help="Run only this scenario (repeatable); see --list."),
    ] = None,
    list_only: Annotated[bool, typer.Option("--list", help="List the scenarios and exit.")] = False,
    write_doc: Annotated[
        bool | None,
        typer.Option(
            "--write-doc/--no-write-doc",
            help="Write the table into --doc (default: only for the full matrix).",
        ),
    ] = None,
    doc: Annotated[Path, typer.Option(help="The reliability document to update.")] = DEFAULT_DOC,
    keep: Annotated[
        bool, typer.Option(help="Keep the work directory (kept anyway when a row fails).")
    ] = False,
    work_dir: Annotated[
        Path | None,
        typer.Option(help="Where brokers, databases and logs go (default: a new temp dir)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Run each fault scenario under load against real local brokers, then verify."""
    from ordermesh import chaos

    if list_only:
        for s in chaos.SCENARIOS:
            console.print(f"{s.name:<26}{'quick' if s.quick else '':<7}{escape(s.summary)}")
        return
    settings = make_settings()
    try:
        scenarios = chaos.select(scenario, quick=quick)
    except OrderMeshError as exc:
        raise fail(exc) from None
    command = "ordermesh " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # SIGTERM ends the run like Ctrl-C: the finally blocks stop what was started
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    def show(row: chaos.Row) -> None:
        if not as_json:
            cells = next(chaos.table_rows([row]))
            err_console.print(f"[b]{escape(cells[0])}[/b] " + escape("  ".join(cells[1:])))
            for problem in row.problems:
                err_console.print(f"  [red]{escape(problem)}[/red]", soft_wrap=True)

    started = time.monotonic()
    try:
        rows, root = chaos.run_matrix(
            settings,
            scenarios,
            quick=quick,
            work_dir=work_dir,
            keep=keep,
            on_row=show,
        )
    except OrderMeshError as exc:
        raise fail(exc) from None
    seconds = time.monotonic() - started
    if write_doc is None:
        write_doc = not quick and not scenario
    if write_doc:
        chaos.write_doc(doc, chaos.render_markdown(rows, command, seconds))
    if as_json:
        print(chaos.summary_json(rows, command, root))
    else:
        table = Table(title=f"chaos matrix ({seconds / 60:.1f} min)")
        for column in chaos.COLUMNS:
            table.add_column(column)
        for cells in chaos.table_rows(rows):
            table.add_row(*(escape(c) for c in cells))
        # the table is read in CI logs too, where rich would squeeze it into 80 columns
        (console if console.is_terminal else Console(width=120)).print(table)
        if write_doc:
            console.print(f"wrote {doc}")
        if any(r.status in ("FAIL", "error") for r in rows):
            console.print(f"[red]chaos: FAILED[/red] (logs under {escape(str(root))})")
    if any(r.status in ("FAIL", "error") for r in rows):
        raise typer.Exit(code=1)
