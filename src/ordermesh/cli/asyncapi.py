"""`ordermesh asyncapi`: the AsyncAPI 3.0 document of the topics, printed or written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ordermesh.asyncapi import build_asyncapi, render
from ordermesh.cli.common import app, console


@app.command("asyncapi")
def asyncapi(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Write the document to this file (docs/asyncapi.json in the repo) instead "
            "of printing it.",
        ),
    ] = None,
) -> None:
    """The AsyncAPI 3.0 document of every topic: channels, messages, who sends and receives."""
    text = render(build_asyncapi())
    if output is None:
        # plain print, not rich: the JSON must reach a pipe unchanged
        print(text, end="")
        return
    output.write_text(text, encoding="utf-8")
    console.print(f"wrote {escape(str(output))}", highlight=False)
