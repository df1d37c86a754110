"""What `ordermesh up` refuses before it starts anything: scaled SQLite, odd node counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ordermesh.cli import app
from ordermesh.config import Settings
from ordermesh.errors import ConfigError
from ordermesh.mesh import MeshPlan, check_plan, parse_instances

POSTGRES = "postgresql://u:p@127.0.0.1:1/x"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("ORDERMESH_DATABASE_URL", "ORDERMESH_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ORDERMESH_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.mark.parametrize(
    ("args", "extra_env", "message"),
    [
        (["--instances", "inventory=2"], {}, "--instances inventory=2: more than one instance"),
        (["--instances", "api=2,tracker=3"], {}, "--instances tracker=3,api=2: more than one"),
        (["--db", "sqlite"], {"ORDERMESH_DATABASE_URL": POSTGRES}, "--db sqlite, but"),
        (["--nodes", "2"], {}, "--nodes must be 1 or 3"),
        (["--nodes", "3", "--bootstrap-server", "127.0.0.1:1"], {}, "--nodes 3 starts a local"),
        (["--instances", "inventory=7", "--db", "postgres"], {}, "inventory must be 1..6"),
    ],
)
def test_up_refuses_in_one_line_and_starts_nothing(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    extra_env: dict[str, str],
    message: str,
) -> None:
    for name, value in extra_env.items():
        monkeypatch.setenv(name, value)
    out = CliRunner().invoke(app, ["up", *args])
    assert out.exit_code == 4, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message in lines[0]
    assert not env.exists(), "a refused `up` must not create anything"


def test_up_rejects_an_unknown_database(env: Path) -> None:
    out = CliRunner().invoke(app, ["up", "--db", "mysql"])
    assert out.exit_code == 2


def test_scaled_plans_pass_with_postgres() -> None:
    plan = MeshPlan(instances=parse_instances("inventory=3,tracker=2,api=2"), db="postgres")
    check_plan(plan, Settings(database_url=None))
    check_plan(MeshPlan(nodes=3, db="postgres"), Settings())
    assert plan.instances == {
        "inventory": 3,
        "payments": 1,
        "fulfilment": 1,
        "tracker": 2,
        "api": 2,
    }


def test_one_instance_each_runs_on_sqlite() -> None:
    check_plan(MeshPlan(), Settings(database_url="sqlite:"))
    with pytest.raises(ConfigError, match="--db postgres"):
        check_plan(MeshPlan(instances=parse_instances("api=2")), Settings())
