"""The command line as a new user meets it: version, help, README, errors, live view."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import typer
from confluent_kafka import KafkaError, KafkaException
from rich.console import Console
from typer.testing import CliRunner

from ordermesh.broker import local
from ordermesh.cli import app
from ordermesh.cli.common import print_verify
from ordermesh.cli.mesh import LiveView
from ordermesh.config import Settings, read_client_properties
from ordermesh.errors import ConfigError, KafkaUnavailableError, OrderMeshError
from ordermesh.kafka.client import as_ordermesh_error, common_config, kafka_errors
from ordermesh.supervisor import Supervisor

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands() -> dict[str, Any]:
    """'broker up' -> its command object, for every leaf command of the app."""
    found: dict[str, Any] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            found[" ".join(path)] = cmd

    walk(typer.main.get_command(app), [])
    return found


def test_version() -> None:
    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0
    assert re.fullmatch(r"ordermesh \d+\.\d+\.\d+\S*\n", out.output)


def test_every_option_has_help_and_settings_options_show_their_env_var() -> None:
    settings_fields = {f"ORDERMESH_{name.upper()}" for name in Settings.model_fields}
    for path, cmd in _commands().items():
        assert cmd.help, f"`{path}` has no help"
        for param in cmd.params:
            if type(param).__name__ == "TyperOption" and param.name != "help":
                assert param.help, f"`{path} {param.opts[0]}` has no help text"
                envvar = getattr(param, "envvar", None)
                if envvar:
                    assert envvar in settings_fields | {"ORDERMESH_BOOTSTRAP_SERVERS"}, envvar
                    assert getattr(param, "show_envvar", False), f"{path} {param.opts[0]}"


def test_kafka_commands_take_bootstrap_server_and_command_config() -> None:
    kafka_commands = {
        "up",
        "simulate",
        "topics ensure",
        "inventory run",
        "tracker run",
        "analytics run",
        "api",
        "load",
        "verify",
        "dlq list",
        "dlq replay",
        "dlq run",
    }
    commands = _commands()
    for path in kafka_commands:
        opts = {opt for p in commands[path].params for opt in p.opts}
        assert {"--bootstrap-server", "--command-config"} <= opts, path


def test_readme_names_every_command() -> None:
    text = README.read_text()
    for path in _commands():
        assert f"ordermesh {path}" in text, f"README does not mention `ordermesh {path}`"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    text = README.read_text()
    first_block = text.split("```")[1]
    assert "make up" in first_block and "make test" in first_block
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_stock_defaults_agree() -> None:
    commands = _commands()
    up = {p.name: p.default for p in commands["up"].params}
    seed = {p.name: p.default for p in commands["inventory seed"].params}
    assert up["stock"] == seed["stock"] and up["skus"] == seed["skus"]


# --- cluster ids -------------------------------------------------------------------------


def test_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xf8 encodes to "-" as the first base64url character
    dashed = uuid.UUID(bytes=b"\xf8" + bytes(15))
    draws = iter([dashed, dashed, uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(local.uuid, "uuid4", lambda: next(draws))
    cluster_id = local.new_cluster_id()
    assert not cluster_id.startswith("-")
    assert len(cluster_id) == 22


# --- errors a person can read ------------------------------------------------------------


def test_unreachable_kafka_errors_become_one_line() -> None:
    settings = Settings(bootstrap_servers="127.0.0.1:1")
    err = as_ordermesh_error(settings, KafkaException(KafkaError(KafkaError._TRANSPORT)))
    assert isinstance(err, KafkaUnavailableError)
    assert str(err).startswith("cannot reach Kafka at 127.0.0.1:1 (")
    other = as_ordermesh_error(settings, KafkaException(KafkaError(KafkaError.NOT_COORDINATOR)))
    assert type(other) is OrderMeshError
    assert as_ordermesh_error(settings, ValueError("x")) is None
    with pytest.raises(KafkaUnavailableError), kafka_errors(settings):
        raise KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN))


def test_verify_report_prints_user_data_as_text() -> None:
    console = Console(record=True, width=200)
    report = {"ok": False, "orders_records": 1, "violations": ["lost: order a[/x]b [bold]"]}
    import ordermesh.cli.common as common

    original = common.console
    common.console = console
    try:
        print_verify(report)
    finally:
        common.console = original
    text = console.export_text()
    assert "lost: order a[/x]b [bold]" in text
    assert "verify: FAILED" in text


def test_command_config_reads_kafka_client_properties(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text(
        "# a comment\nsecurity.protocol=SASL_SSL\n! another\nsasl.mechanism = SCRAM-SHA-512\n"
        "client.id: mesh-1\n\n"
    )
    assert read_client_properties(path) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "client.id": "mesh-1",
    }
    conf = common_config(Settings(bootstrap_servers="h:9", command_config=path))
    assert conf["security.protocol"] == "SASL_SSL" and conf["client.id"] == "mesh-1"
    (tmp_path / "bad.properties").write_text("no separator here\n")
    with pytest.raises(ConfigError, match=r"bad\.properties:1"):
        read_client_properties(tmp_path / "bad.properties")
    with pytest.raises(ConfigError, match="missing"):
        read_client_properties(tmp_path / "missing")


# --- the live view survives transient Kafka errors ----------------------------------------


def _status(placed: int) -> dict[str, Any]:
    return {
        "at": time.time(),
        "topics": {"orders": placed, "order-events": placed, "orders-dlq": 0, "order-commands": 0},
        "lag": {"inventory": 0},
        "analytics": None,
        "services": {},
    }


def test_live_view_shows_warming_up_then_numbers_then_last_good_numbers() -> None:
    settings = Settings(bootstrap_servers="127.0.0.1:1")
    answers: list[Any] = [
        KafkaError(KafkaError.NOT_COORDINATOR),
        KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS),
        _status(10),
        KafkaError(KafkaError._TIMED_OUT),
        _status(25),
    ]

    def read() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, KafkaError):
            with kafka_errors(settings):  # the way mesh_status reports them
                raise KafkaException(answer)
        return answer  # type: ignore[no-any-return]

    view = LiveView(read, "test")
    shown = []
    for _ in range(5):
        console = Console(record=True, width=120)
        console.print(view.tick())
        shown.append(console.export_text())
    assert "warming up" in shown[0] and "coordinator" in shown[0].lower()
    assert "warming up" in shown[1]
    assert "10" in shown[2] and "warming up" not in shown[2]
    assert "numbers from" in shown[3] and "10" in shown[3]
    assert "25" in shown[4] and "numbers from" not in shown[4]
    assert view.errors == 3


# --- supervisor restart policy ------------------------------------------------------------


def test_on_failure_service_restarts_after_a_crash_but_not_after_success(
    tmp_path: Path,
) -> None:
    sup = Supervisor(Settings(data_dir=tmp_path))
    sup.add("done", ["--version"], restart="on-failure")  # exits 0
    sup.add("crash", ["no-such-command"], restart="on-failure")  # exits 2
    sup.start("done")
    sup.start("crash")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sup.services["crash"].restarts == 0:
        sup.check()
        time.sleep(0.1)
    try:
        assert sup.services["crash"].restarts >= 1
        assert sup.services["done"].restarts == 0
        assert not sup.services["done"].wanted
    finally:
        sup.stop_all()
