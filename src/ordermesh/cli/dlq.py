"""`ordermesh dlq list | replay`: the dead-letter queue for operators.

`ordermesh dlq run` (the DLQ logger) is the generic service command of ``cli/services``.

Exit codes of ``dlq replay``: 0 when at least one record was replayed (or would be, with
``--dry-run``) and every send was acknowledged; 1 when nothing was replayed (nothing
matched, or everything that matched was refused or skipped) or a send failed; 2 for usage
errors. Entries whose source topic is not one OrderMesh consumes are skipped, with why.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Annotated, Any

import typer

from ordermesh.cli.common import (
    BootstrapServer,
    CommandConfig,
    DataDir,
    app,
    console,
    err_console,
    fail,
    make_settings,
)
from ordermesh.errors import ConfigError, OrderMeshError
from ordermesh.topics import DLQ

dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter queue: alert, list, replay.")
app.add_typer(dlq_app, name="dlq")

Reasons = Annotated[
    list[str] | None,
    typer.Option(
        "--reason",
        help="Error class, e.g. CancelRejected or DecodeError.json; a prefix such as "
        "DecodeError selects every DecodeError.<kind>. Repeatable.",
    ),
]


def _line(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "backslashreplace")


def _entry_json(entry: Any) -> dict[str, Any]:
    return {
        "dlq": entry.where(),
        "partition": entry.partition,
        "offset": entry.offset,
        "timestamp_ms": entry.timestamp_ms,
        "reason": entry.error_class or "unknown",
        "source": entry.source(),
        "source_topic": entry.source_topic,
        "source_partition": entry.source_partition,
        "source_offset": entry.source_offset,
        "source_timestamp_ms": entry.source_timestamp_ms,
        "service": entry.service,
        "stage": entry.stage,
        "message": entry.message,
        "order_id": entry.order_id,
        "replay_count": entry.replay_count,
        "replayed_from": entry.replayed_from,
        "key": _text(entry.key),
        "value": _text(entry.value),
        # every header of the DLQ record: the original ones, then the error headers
        "headers": [[name, _text(value)] for name, value in entry.headers]
        + [[f"ordermesh.error.{name}", text] for name, text in entry.error_headers.items()],
    }


@dlq_app.command("list")
def dlq_list(
    reason: Reasons = None,
    limit: Annotated[int, typer.Option(min=0, help="Show the newest N entries.")] = 50,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per entry, with every header.")
    ] = False,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
) -> None:
    """List DLQ entries, newest last: position, reason, source, order, replays, message."""
    from ordermesh.dlq import list_entries

    settings = make_settings(
        data_dir=data_dir, bootstrap_servers=bootstrap_server, command_config=command_config
    )
    try:
        entries, total = list_entries(settings, reasons=reason or (), limit=limit)
    except OrderMeshError as exc:
        raise fail(exc) from None
    if as_json:
        for entry in entries:
            print(json.dumps(_entry_json(entry)))
        return
    rows = [
        (
            e.position(),
            e.error_class or "unknown",
            e.source(),
            e.order_id or "-",
            "?" if e.replay_count is None else str(e.replay_count),
            " ".join(e.message.split()),  # newlines would break the one-row layout
        )
        for e in entries
    ]
    # a plain aligned table, one line per entry, ids never cut (grep- and pipe-friendly);
    # the message gets the width left, at least 30 characters; --json has all of it
    header = ("DLQ", "REASON", "SOURCE", "ORDER_ID", "REPLAYS", "MESSAGE")
    widths = [max([len(header[i]), *(len(row[i]) for row in rows)]) for i in range(5)]
    room = max(30, console.width - sum(widths) - 2 * len(widths))
    _line(f"{settings.topic(DLQ)}: {total} entries")
    for row in [header, *rows]:
        message = row[5] if len(row[5]) <= room else row[5][: room - 1] + "…"
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        _line("  ".join([*cells, message]).rstrip())
    if total > len(entries):
        _line(f"... {total - len(entries)} older entries not shown (use --limit)")
    counts = Counter(e.error_class or "unknown" for e in entries)
    if counts:
        _line("shown by reason: " + ", ".join(f"{r}={n}" for r, n in counts.most_common()))


@dlq_app.command("replay")
def dlq_replay(
    reason: Reasons = None,
    offset: Annotated[
        list[str] | None,
        typer.Option(
            "--offset",
            help="DLQ entry as P:O (partition:offset, or P@O as `dlq list` shows it), or a "
            "plain O for that offset in any partition (refused if ambiguous). Repeatable.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan; send nothing.")
    ] = False,
    max_replays: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Refuse entries already replayed this often"
            " (default: settings.dlq_max_replays, env ORDERMESH_DLQ_MAX_REPLAYS).",
        ),
    ] = None,
    data_dir: DataDir = None,
    bootstrap_server: BootstrapServer = None,
    command_config: CommandConfig = None,
) -> None:
    """Send DLQ entries back to their source topic (reasons and offsets must both match)."""
    from ordermesh.dlq import replay
    from ordermesh.services.dlq import parse_offset

    if not reason and not offset:
        raise typer.BadParameter("give --reason and/or --offset (nothing is replayed by default)")
    try:
        offsets = [parse_offset(text) for text in offset or ()]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = make_settings(
        data_dir=data_dir, bootstrap_servers=bootstrap_server, command_config=command_config
    )
    try:
        result = replay(
            settings,
            reasons=reason or (),
            offsets=offsets,
            max_replays=max_replays,
            dry_run=dry_run,
        )
    except ValueError as exc:  # e.g. a negative ORDERMESH_DLQ_MAX_REPLAYS
        raise fail(ConfigError(str(exc))) from None
    except OrderMeshError as exc:
        raise fail(exc) from None
    plan = result.plan
    if dry_run:
        for item in plan.replays:
            e = item.entry
            _line(
                f"would replay {e.where()} -> {item.record.topic}  {e.error_class}"
                f"  order_id={e.order_id or '-'}  replay {(e.replay_count or 0) + 1}"
            )
    for sent in result.sent:
        e = sent.replay.entry
        _line(
            f"replayed {e.where()} -> {sent.where()}  {e.error_class}"
            f"  order_id={e.order_id or '-'}  replay {(e.replay_count or 0) + 1}"
        )
    for item, error in result.failed:
        err_console.print(
            f"FAILED {item.entry.where()}: {error}", markup=False, highlight=False, soft_wrap=True
        )
    for refusal in plan.refused:
        _line(f"refused {refusal.entry.where()}  {refusal.entry.error_class}: {refusal.why}")
    for skip in plan.skipped:
        _line(f"skipped {skip.entry.where()}  {skip.entry.error_class}: {skip.why}")
    for selector in plan.unmatched:
        _line(f"no entry matched {selector}")
    done = len(plan.replays) if dry_run else len(result.sent)
    _line(
        f"{'dry run: would replay' if dry_run else 'replayed'} {done},"
        f" refused {len(plan.refused)}, skipped {len(plan.skipped)},"
        f" failed {len(result.failed)}"
    )
    if result.failed or done == 0:
        raise typer.Exit(code=1)
