"""compose.yaml, the Dockerfile and the podman runner checked without containers.

The container test (``make container-test``) runs them for real; this keeps them right in
every ``make test``: the compose file's shape (the keys the compose specification allows),
its commands (real ``ordermesh`` commands and settings), the topology (every service of
``topology.SERVICES``, scaled as documented) and the runner's host-network rewrite.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer

from ordermesh.cli import app
from ordermesh.config import Settings
from ordermesh.topology import SERVICES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"

# the compose specification's top-level and service keys (the ones a file may use)
TOP_LEVEL = {"name", "version", "services", "volumes", "networks", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "annotations", "attach", "build", "blkio_config", "cap_add", "cap_drop", "cgroup",
    "cgroup_parent", "command", "configs", "container_name", "cpu_count", "cpu_percent",
    "cpu_shares", "cpu_period", "cpu_quota", "cpu_rt_runtime", "cpu_rt_period", "cpus",
    "cpuset", "credential_spec", "depends_on", "deploy", "develop", "device_cgroup_rules",
    "devices", "dns", "dns_opt", "dns_search", "domainname", "entrypoint", "env_file",
    "environment", "expose", "extends", "external_links", "extra_hosts", "group_add",
    "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels", "links",
    "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness",
    "memswap_limit", "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid",
    "pids_limit", "platform", "ports", "post_start", "pre_stop", "privileged", "profiles",
    "pull_policy", "read_only", "restart", "runtime", "scale", "secrets", "security_opt",
    "shm_size", "stdin_open", "stop_grace_period", "stop_signal", "storage_opt", "sysctls",
    "tmpfs", "tty", "ulimits", "user", "userns_mode", "uts", "volumes", "volumes_from",
    "working_dir",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART = {"no", "always", "on-failure", "unless-stopped"}


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_compose", ROOT / "deploy" / "run_compose.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run_compose = _runner()


def _load(env: dict[str, str] | None = None) -> dict[str, Any]:
    compose: dict[str, Any] = run_compose.load_compose(COMPOSE, env or {})
    return compose


def _cluster_env() -> dict[str, str]:
    env: dict[str, str] = run_compose.read_env_file(ROOT / "deploy" / "kafka-cluster.env")
    return env


def _cli_commands() -> set[str]:
    found: set[str] = set()

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            found.add(" ".join(path))

    walk(typer.main.get_command(app), [])
    return found


def _runs(spec: dict[str, Any]) -> list[list[str]]:
    """The ordermesh command lines a service runs (the image's entrypoint is ``ordermesh``;
    a shell job is ``ordermesh a b && ordermesh c``)."""
    if spec.get("entrypoint") is None:
        return [[str(w) for w in spec.get("command") or []]]
    (script,) = spec["command"]
    lines = []
    for step in script.split("&&"):
        words = step.split()
        assert words[0] == "ordermesh", script
        lines.append(words[1:])
    return lines


def _command(words: list[str], commands: set[str]) -> str:
    """The real command ``words`` start with ("" if none)."""
    for n in (2, 1):
        if " ".join(words[:n]) in commands:
            return " ".join(words[:n])
    return ""


def test_the_file_has_only_keys_the_compose_specification_knows() -> None:
    raw = run_compose.yaml.safe_load(COMPOSE.read_text())
    assert {k for k in raw if not k.startswith("x-")} <= TOP_LEVEL
    for name, spec in raw["services"].items():
        assert set(spec) <= SERVICE_KEYS, (name, set(spec) - SERVICE_KEYS)
        check = spec.get("healthcheck") or {}
        assert set(check) <= HEALTHCHECK_KEYS | {"disable"}, name
        assert str(spec.get("restart", "no")) in RESTART, name
        for dep, opts in run_compose.depends_on(spec).items():
            assert dep in raw["services"], (name, dep)
            assert opts["condition"] in CONDITIONS, (name, dep)
        for volume in spec.get("volumes") or []:
            source = str(volume).split(":")[0]
            assert source in raw["volumes"], (name, source)


@pytest.mark.parametrize(
    ("env", "profiles", "kafka"),
    [
        ({}, [], ["kafka-1"]),
        ({}, ["load", "tools"], ["kafka-1"]),
        ("cluster", [], ["kafka-1", "kafka-2", "kafka-3"]),
    ],
)
def test_every_profile_starts_in_an_order_that_satisfies_its_dependencies(
    env: Any, profiles: list[str], kafka: list[str]
) -> None:
    values = _cluster_env() if env == "cluster" else {}
    profiles = [*profiles, *filter(None, values.get("COMPOSE_PROFILES", "").split(","))]
    compose = _load(values)
    order = run_compose.start_order(compose, run_compose.enabled_services(compose, profiles))
    assert [s for s in order if s.startswith("kafka-")] == kafka
    assert order.index("init") > max(order.index(k) for k in kafka)
    for service in ("inventory", "tracker", "dlq-logger", "analytics", "api"):
        assert order.index(service) > order.index("init")
    assert ("load" in order) == ("load" in profiles)


def test_the_services_are_the_topology_scaled_as_documented() -> None:
    compose = _load()
    services = compose["services"]
    commands = _cli_commands()
    runs: dict[str, str] = {}
    for name, spec in services.items():
        if "ordermesh" not in str(spec.get("image")) or name == "cli":
            continue
        for words in _runs(spec):
            command = _command(words, commands)
            assert command, f"{name} runs no ordermesh command: {words}"
            runs[command] = name
    for spec in SERVICES:
        assert " ".join(spec.command) in runs, f"compose.yaml does not run {spec.name}"
    assert {"topics ensure", "db migrate", "inventory seed"} <= set(runs)
    assert run_compose.replicas(services["inventory"]) == 3
    assert run_compose.replicas(services["tracker"]) == 2
    assert run_compose.replicas(services["api"]) == 2
    assert services["load"]["profiles"] == ["load"]


def test_ordermesh_settings_are_real_settings_and_services_have_healthchecks() -> None:
    compose = _load()
    fields = {f"ORDERMESH_{name.upper()}" for name in Settings.model_fields}
    for name, spec in compose["services"].items():
        if "ordermesh" not in str(spec.get("image")):
            continue
        env = run_compose.env_of(spec, ROOT)
        # ORDERMESH_KAFKA_<PROPERTY> passes any librdkafka property through
        unknown = {
            k for k in env if k.startswith("ORDERMESH_") and not k.startswith("ORDERMESH_KAFKA_")
        } - fields
        assert not unknown, (name, unknown)
        one_shot = str(spec.get("restart")) == "no" or "load" in spec.get("profiles", [])
        check = spec.get("healthcheck") or {}
        if not one_shot:
            assert not check.get("disable"), name
            assert check["test"][:3] == ["CMD", "ordermesh", "health"], name
    for name in ("kafka-1", "postgres"):
        assert compose["services"][name]["healthcheck"]["test"][0] == "CMD"


def test_dockerfile_pins_the_base_and_runs_ordermesh_as_a_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert run_compose.dockerfile_base(ROOT / "Dockerfile") == "python:3.11-slim-bookworm"
    assert re.search(r"^FROM \$\{BASE\} AS build$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["ordermesh"\]$', text, re.M)
    assert re.search(r'^\s+CMD \["ordermesh", "health"\]$', text, re.M)
    last_stage = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER ordermesh$", last_stage, re.M)
    assert "pip install" not in last_stage  # the venv comes built from the first stage


def test_host_network_plan_leaves_no_service_name_and_no_shared_port() -> None:
    compose = _load(_cluster_env())
    plan = run_compose.make_plan(compose, ROOT, "t", ["cluster", "load", "tools"], network="host")
    names = "|".join(re.escape(s) for s in compose["services"])
    seen: dict[int, str] = {}
    podman = run_compose.Podman(plain=True)
    for c in plan.containers:
        argv = run_compose.run_argv(plan, c, podman)
        image = next(a for a in argv if a.startswith(("docker.io/", "localhost/")))
        text = " ".join(a for a in argv if a != image)
        assert not re.search(rf"(?<![\w.-])(?:{names}):\d", text), (c.name, text)
        assert "0.0.0.0" not in text
        assert "--network=host" in argv
        for port in c.ports.values():
            assert port not in seen, (c.name, seen.get(port))
            seen[port] = c.name
    inventory = plan.of("inventory")
    assert len(inventory) == 3
    ports = {c.ports[9100] for c in inventory}
    assert len(ports) == 3
    first = " ".join(run_compose.run_argv(plan, inventory[0], podman))
    assert f"ORDERMESH_METRICS_PORT={inventory[0].ports[9100]}" in first
    bootstrap = ",".join(
        f"127.0.0.1:{c.ports[9092]}"
        for c in plan.of("kafka-1") + plan.of("kafka-2") + plan.of("kafka-3")
    )
    assert f"ORDERMESH_BOOTSTRAP_SERVERS={bootstrap}" in first


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    cases = {
        "${SET}": "x",
        "${UNSET:-d}": "d",
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "$SET/$$SET": "x/$SET",
        "a${UNSET}b": "ab",
    }
    for text, expected in cases.items():
        assert run_compose.interpolate(text, env) == expected, text
    with pytest.raises(run_compose.ComposeError):
        run_compose.interpolate("${UNSET:?needed}", env)
