"""`ordermesh bench inventory --db postgres --instances ...`: its command line, not its speed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ordermesh.bench.inventory import MAX_INSTANCES, parse_instances
from ordermesh.cli import app
from ordermesh.errors import ConfigError


def test_instance_counts_parse() -> None:
    assert parse_instances("1,3") == [1, 3]
    assert parse_instances(f" 2 ,{MAX_INSTANCES},") == [2, MAX_INSTANCES]


@pytest.mark.parametrize("text", ["", "0", f"{MAX_INSTANCES + 1}", "1,x", "-1"])
def test_instance_counts_out_of_range_or_not_numbers_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_instances(text)


@pytest.mark.parametrize(
    "args",
    [
        ["--instances", "1,3"],  # several instances share only a PostgreSQL store
        ["--db", "sqlite", "--instances", "3"],
        ["--db", "postgres", "--instances", "0"],
        ["--db", "postgres", "--instances", "one"],
        ["--db", "mysql"],
    ],
)
def test_bad_command_lines_exit_2_before_starting_anything(args: list[str]) -> None:
    out = CliRunner().invoke(app, ["bench", "inventory", *args])
    assert out.exit_code == 2, out.output
