#!/usr/bin/env python3
"""Run compose.yaml with podman where Docker is not available (docs/deploy.md).

    python deploy/run_compose.py build              images (stand-in bases cached, then the app)
    python deploy/run_compose.py up [--profile P]   start, in dependency order, and wait
    python deploy/run_compose.py run cli verify     a one-off command of a service's image
    python deploy/run_compose.py ps | down [--volumes] | plan

It reads the same compose.yaml that ``docker compose`` runs and starts one ``podman run``
per container, doing itself what podman-compose 1.0 does not: profiles, ``depends_on``
conditions (``service_healthy`` runs the healthcheck, ``service_completed_successfully``
waits for the exit code) and ``required: false``.

Where it differs from compose (also in docs/deploy.md):

- ``--network host`` (the default): every container shares the host's network, so the
  runner gives each container's ``expose`` ports free loopback ports and rewrites its
  settings: ``SERVICE:PORT`` becomes ``127.0.0.1:<that service's port>``, the
  container's own ports (``:9092``, ``--port 8080``, ``PGPORT: 5432``) its own free
  ones, and ``0.0.0.0`` becomes ``127.0.0.1`` (nothing listens beyond loopback).
  ``ports:`` are not published: the state file and ``ps`` give the loopback URLs.
  ``--network bridge`` uses a project network with the service names as DNS names
  instead, as compose does, and publishes each ``expose`` port on a free loopback port.
- Images that cannot be pulled are built here: the ``python`` base the Dockerfile names,
  ``apache/kafka`` (the project's Kafka jars on a Debian JRE, configured by the same
  ``KAFKA_*`` variables) and ``postgres`` (Debian's PostgreSQL, configured by the same
  ``POSTGRES_*`` variables), each from Debian packages with mmdebstrap and tagged with the
  official name, so the Dockerfile and compose.yaml stay the ones Docker users run. An
  image under that name that the runner did not build (a real pull) is used as it is.
- podman runs healthchecks from systemd timers; without systemd the runner runs them
  itself while it waits (``ps`` runs them once).
- The podman flags this kind of host needs (``--runtime runc --cgroup-manager=cgroupfs``,
  ``--ulimit host``, a ``containers.conf`` without default ulimits); ``--plain`` drops them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
STANDINS = Path(__file__).resolve().parent / "standins"
DEFAULT_FILE = ROOT / "compose.yaml"
SUITE = "bookworm"
LABEL_PROJECT = "com.docker.compose.project"
LABEL_SERVICE = "com.docker.compose.service"
LABEL_NUMBER = "com.docker.compose.container-number"
LABEL_STANDIN = "ordermesh.stand-in"
DEFAULT_TIMEOUT_S = 300.0
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
# .deb files kept between stand-in builds (the three share most of theirs)
DEB_CACHE = Path.home() / ".cache" / "ordermesh" / "debs"
LOOPBACK = "127.0.0.1"
# podman flags this host needs: crun and systemd cgroups fail here, as do default ulimits
WORKAROUND_GLOBAL = ["--runtime", "runc", "--cgroup-manager=cgroupfs"]
WORKAROUND_RUN = ["--ulimit", "host"]


class ComposeError(Exception):
    """A compose file this runner cannot run, or a container that failed; one line why."""


# --- the compose file -----------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_]\w*))")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``$VAR``, ``$$``
    in every string of ``value``, as compose does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        expr = m.group("braced")
        found = re.fullmatch(r"([A-Za-z_]\w*)(?:(:?)([-?])(.*))?", expr, re.S)
        if found is None:
            raise ComposeError(f"bad variable ${{{expr}}}")
        name, colon, op, arg = found.groups()
        current = env.get(name)
        missing = current is None or (colon == ":" and current == "")
        if op == "-" and missing:
            return str(interpolate(arg, env))
        if op == "?" and missing:
            raise ComposeError(f"{name}: {arg or 'required'}")
        return current or ""

    return _VAR.sub(one, value)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, optional quotes), as compose's ``--env-file``."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ComposeError(f"{path}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def load_compose(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        raise ComposeError(f"{path}: no services")
    # extension fields (x-*) only feed YAML anchors; interpolate what is used
    data: dict[str, Any] = interpolate(
        {k: v for k, v in raw.items() if not k.startswith("x-")}, env
    )
    return data


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def env_of(spec: Mapping[str, Any], base: Path) -> dict[str, str]:
    """A service's environment: its ``env_file`` entries, then ``environment``."""
    env: dict[str, str] = {}
    for entry in as_list(spec.get("env_file")):
        path = entry["path"] if isinstance(entry, dict) else entry
        env.update(read_env_file(base / path))
    environment = spec.get("environment") or {}
    if isinstance(environment, list):
        for item in environment:
            key, sep, value = str(item).partition("=")
            if sep:
                env[key] = value
            elif key in os.environ:
                env[key] = os.environ[key]
    else:
        for key, value in environment.items():
            if value is None:
                if key in os.environ:
                    env[key] = os.environ[key]
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            else:
                env[key] = str(value)
    return env


def depends_on(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``depends_on`` in its long form: service -> {condition, required}."""
    deps = spec.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started", "required": True} for name in deps}
    return {
        name: {
            "condition": (opts or {}).get("condition", "service_started"),
            "required": (opts or {}).get("required", True),
        }
        for name, opts in deps.items()
    }


def enabled_services(compose: Mapping[str, Any], profiles: Iterable[str]) -> list[str]:
    """The services the active ``profiles`` turn on (no ``profiles``: always on)."""
    active = set(profiles)
    return [
        name
        for name, spec in compose["services"].items()
        if not spec.get("profiles") or active & set(spec["profiles"])
    ]


def start_order(compose: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """``names`` with every dependency before its dependents (optional ones may be off)."""
    services = compose["services"]
    chosen = set(names)
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ComposeError(f"dependency cycle: {' -> '.join((*path, name))}")
        state[name] = "visiting"
        for dep, opts in depends_on(services[name]).items():
            if dep not in services:
                raise ComposeError(f"{name} depends on {dep}, which is not a service")
            if dep not in chosen:
                if opts["required"]:
                    raise ComposeError(
                        f"{name} needs {dep}, which no active profile turns on"
                        f" (profiles of {dep}: {', '.join(services[dep].get('profiles', []))})"
                    )
                continue
            visit(dep, (*path, name))
        state[name] = "done"
        order.append(name)

    for name in names:
        visit(name, ())
    return order


def exposed(spec: Mapping[str, Any]) -> list[int]:
    return [int(str(p).split("/")[0]) for p in as_list(spec.get("expose"))]


def replicas(spec: Mapping[str, Any]) -> int:
    return int(((spec.get("deploy") or {}).get("replicas")) or 1)


# --- the plan: one container per replica, with its ports and rewritten settings --------------


@dataclass
class Container:
    """One ``podman run`` of a service replica."""

    service: str
    number: int
    name: str
    spec: dict[str, Any]
    # container port -> the host port it is reached on (host network: the same one)
    ports: dict[int, int] = field(default_factory=dict)

    def url(self, port: int, path: str = "") -> str:
        return f"http://{LOOPBACK}:{self.ports[port]}{path}"


def free_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` TCP ports free on loopback now, none of ``taken``."""
    found: list[int] = []
    socks: list[socket.socket] = []
    try:
        while len(found) < count:
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in taken:
                found.append(port)
        return found
    finally:
        for s in socks:
            s.close()


class HostNetwork:
    """Rewrites a container's settings for podman's host network (module docstring)."""

    _SERVICE_PORT = re.compile(r"(?<![\w.-])([A-Za-z][\w-]*):(\d{1,5})(?!\d)")
    _BARE_PORT = re.compile(r"(?<![\d\x01])(\d{1,5})(?![\d\x01])")

    def __init__(self, containers: Sequence[Container]) -> None:
        # a service name stands for its first replica
        self.first: dict[str, Container] = {}
        for c in containers:
            self.first.setdefault(c.service, c)

    def rewrite(self, text: str, own: Container) -> str:
        def service_port(m: re.Match[str]) -> str:
            target = self.first.get(m.group(1))
            port = int(m.group(2))
            if target is None or port not in target.ports:
                return m.group(0)
            return f"{LOOPBACK}:\x01{target.ports[port]}\x01"

        def own_port(m: re.Match[str]) -> str:
            port = int(m.group(1))
            return str(own.ports[port]) if port in own.ports else m.group(0)

        text = self._SERVICE_PORT.sub(service_port, text)
        text = text.replace("0.0.0.0", LOOPBACK).replace("://:", f"://{LOOPBACK}:")
        text = self._BARE_PORT.sub(own_port, text)
        return text.replace("\x01", "")


@dataclass
class Plan:
    project: str
    network: str  # "host" or "bridge"
    compose: dict[str, Any]
    base: Path
    services: list[str]  # enabled, in start order
    containers: list[Container]

    def of(self, service: str) -> list[Container]:
        return [c for c in self.containers if c.service == service]

    @property
    def bridge_name(self) -> str:
        return f"{self.project}_default"


def make_plan(
    compose: dict[str, Any],
    base: Path,
    project: str,
    profiles: Iterable[str],
    network: str = "host",
    ports: Mapping[str, Mapping[str, int]] | None = None,
    extra: Sequence[str] = (),
) -> Plan:
    """Containers of the enabled services (and of ``extra``, whatever their profiles);
    ``ports``: the host ports of an earlier ``up`` (container name -> port -> host port)."""
    enabled = enabled_services(compose, profiles)
    enabled += [s for s in extra if s not in enabled]
    order = start_order(compose, enabled)
    containers = []
    taken: set[int] = set()
    for stored in (ports or {}).values():
        taken |= set(stored.values())
    for service in order:
        spec = compose["services"][service]
        for number in range(1, replicas(spec) + 1):
            name = f"{project}-{service}-{number}"
            known = {int(k): int(v) for k, v in (ports or {}).get(name, {}).items()}
            wanted = [p for p in exposed(spec) if p not in known]
            fresh = free_ports(len(wanted), taken)
            taken |= set(fresh)
            ports_of = {**known, **dict(zip(wanted, fresh, strict=True))}
            containers.append(Container(service, number, name, spec, ports_of))
    return Plan(project, network, compose, base, order, containers)


# --- podman --------------------------------------------------------------------------------


@dataclass
class Podman:
    """The podman command line, with this host's workarounds unless ``plain``."""

    plain: bool = False
    verbose: bool = False

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if not self.plain and "CONTAINERS_CONF" not in env:
            conf = Path(tempfile.gettempdir()) / "ordermesh-containers.conf"
            if not conf.exists():
                conf.write_text("[containers]\ndefault_ulimits = []\n")
            env["CONTAINERS_CONF"] = str(conf)
        return env

    def argv(self, *args: str) -> list[str]:
        return ["podman", *([] if self.plain else WORKAROUND_GLOBAL), *args]

    def __call__(
        self, *args: str, check: bool = True, capture: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(*args)
        if self.verbose:
            print("+ " + shlex.join(argv), file=sys.stderr)
        proc = subprocess.run(
            argv,
            env=self.env(),
            text=True,
            capture_output=capture,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            raise ComposeError(f"podman {args[0]} failed ({proc.returncode}): {' | '.join(detail)}")
        return proc

    def run_flags(self) -> list[str]:
        return [] if self.plain else list(WORKAROUND_RUN)

    def build_flags(self) -> list[str]:
        if self.plain:
            return []
        # `--ulimit host` is refused by build; the host's own limits are what it needs
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return [f"--ulimit=nofile={soft}:{hard}"]

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def label(self, image: str, name: str) -> str | None:
        proc = self("image", "inspect", "--format", "{{json .Labels}}", image, check=False)
        if proc.returncode != 0:
            return None
        labels = json.loads(proc.stdout or "null") or {}
        value = labels.get(name)
        return str(value) if value is not None else None


def normalize_image(name: str) -> str:
    """The fully qualified name podman stores ``name`` under."""
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{name}" if ":" in name or name else name
    if "." in first or ":" in first or first == "localhost":
        return name
    return f"docker.io/{name}"


def local_image(name: str) -> str:
    """A built image's name: unqualified names live under ``localhost/`` in podman."""
    return name if "/" in name else f"localhost/{name}"


# --- stand-in base images ------------------------------------------------------------------


@dataclass(frozen=True)
class Standin:
    """An image built from Debian packages in place of an official one."""

    packages: tuple[str, ...]
    hooks: tuple[str, ...]
    changes: tuple[str, ...]
    inputs: tuple[Path, ...] = ()


def host_mirror() -> tuple[str, str]:
    """The Debian mirror and security mirror this host's apt uses (mmdebstrap takes the
    same), else deb.debian.org."""
    mirror, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    for path in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(
        Path("/etc/apt/sources.list.d").glob("*.sources")
    ):
        if not path.is_file():
            continue
        for uri in re.findall(r"^(?:URIs:|deb)\s+(?:\[[^]]*\]\s+)?(\S+)", path.read_text(), re.M):
            if uri.rstrip("/").endswith("debian-security"):
                security = uri
            elif uri.rstrip("/").endswith("/debian"):
                mirror = uri
    return mirror, security


def _jar_dir(version: str) -> Path:
    from ordermesh.broker.jars import ensure_jars
    from ordermesh.config import Settings

    settings = Settings(kafka_version=version)
    return ensure_jars(settings.kafka_jar_dir(), version)


def standin_for(image: str) -> Standin | None:
    """The recipe of a stand-in for ``image`` (fully qualified), None when there is none."""
    repo, _, tag = image.rpartition(":")
    if repo == "docker.io/library/python":
        if not tag.startswith("3.11"):
            raise ComposeError(f"{image}: Debian {SUITE} has Python 3.11 only")
        # the CAs this host trusts besides Debian's (a TLS-inspecting proxy's): pip in a
        # build on this base reaches PyPI the way the host's pip does
        local_cas = tuple(sorted(LOCAL_CAS.glob("*.crt")))
        trust = (
            f"cp {' '.join(shlex.quote(str(p)) for p in local_cas)}"
            ' "$1/usr/local/share/ca-certificates/"',
            'chroot "$1" update-ca-certificates --fresh >/dev/null',
        )
        return Standin(
            packages=("python3", "python3-venv", "ca-certificates", "passwd"),
            hooks=trust if local_cas else (),
            changes=("ENV LANG=C.UTF-8", 'CMD ["python3"]'),
            inputs=local_cas,
        )
    if repo == "docker.io/apache/kafka":
        jars = _jar_dir(tag)
        kafka = STANDINS / "kafka"
        tools = ("broker-api-versions", "topics", "consumer-groups", "metadata-quorum", "storage")
        q = shlex.quote
        return Standin(
            packages=("openjdk-17-jre-headless", "passwd"),
            hooks=(
                'mkdir -p "$1/opt/kafka/libs" "$1/opt/kafka/bin" "$1/opt/kafka/config"'
                ' "$1/etc/kafka/docker" "$1/var/lib/kafka/data"',
                f'cp {q(str(jars))}/*.jar "$1/opt/kafka/libs/"',
                f'install -m 0755 {q(str(kafka / "run"))} "$1/etc/kafka/docker/run"',
                f'install -m 0755 {q(str(kafka / "kafka-tool"))} "$1/opt/kafka/bin/kafka-tool"',
                *(f'ln -s kafka-tool "$1/opt/kafka/bin/kafka-{t}.sh"' for t in tools),
                f"install -m 0644 {q(str(kafka / 'log4j2.properties'))}"
                f' {q(str(kafka / "tools-log4j2.properties"))} "$1/opt/kafka/config/"',
                'chroot "$1" useradd --uid 1000 --create-home --shell /bin/bash appuser',
                'chroot "$1" chown -R appuser:appuser /opt/kafka/config /var/lib/kafka',
            ),
            changes=(
                "USER appuser",
                "EXPOSE 9092",
                'VOLUME ["/var/lib/kafka/data"]',
                'CMD ["/etc/kafka/docker/run"]',
            ),
            inputs=(
                kafka / "run",
                kafka / "kafka-tool",
                kafka / "log4j2.properties",
                kafka / "tools-log4j2.properties",
                *sorted(jars.glob("*.jar")),
            ),
        )
    if repo == "docker.io/library/postgres":
        major = tag.split(".")[0].split("-")[0]
        if major != "15":
            raise ComposeError(f"{image}: Debian {SUITE} has PostgreSQL 15 only")
        entry = STANDINS / "postgres" / "docker-entrypoint.sh"
        return Standin(
            packages=("postgresql-15",),
            hooks=(
                # the package's own cluster: the entry point makes one in PGDATA instead
                'rm -rf "$1/var/lib/postgresql/15" "$1/etc/postgresql/15"',
                'mkdir -p "$1/var/lib/postgresql/data" "$1/run/postgresql"',
                'chroot "$1" chown postgres:postgres /var/lib/postgresql/data /run/postgresql',
                'chmod 0700 "$1/var/lib/postgresql/data"',
                f"install -m 0755 {shlex.quote(str(entry))}"
                ' "$1/usr/local/bin/docker-entrypoint.sh"',
            ),
            changes=(
                "ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin"
                ":/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV PGDATA=/var/lib/postgresql/data",
                "ENV LANG=C.UTF-8",
                "EXPOSE 5432",
                "STOPSIGNAL SIGINT",
                'VOLUME ["/var/lib/postgresql/data"]',
                'ENTRYPOINT ["docker-entrypoint.sh"]',
                'CMD ["postgres"]',
            ),
            inputs=(entry,),
        )
    return None


def _digest(standin: Standin, mirrors: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([standin.packages, standin.hooks, standin.changes, list(mirrors)]).encode())
    for path in standin.inputs:
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def ensure_standin(podman: Podman, image: str, log: Any) -> str:
    """``image`` present: as pulled or built before, or built now from Debian packages.
    Returns what happened: "present", "cached" or "built"."""
    standin = standin_for(image)
    if standin is None:
        if podman.exists(image):
            return "present"
        raise ComposeError(f"image {image} is not here and no stand-in is known for it")
    mirror, security = host_mirror()
    mirrors = [
        f"deb {mirror} {SUITE} main",
        f"deb {mirror} {SUITE}-updates main",
        f"deb {security} {SUITE}-security main",
    ]
    digest = _digest(standin, mirrors)
    if podman.exists(image):
        label = podman.label(image, LABEL_STANDIN)
        if label is None or label == digest:
            return "present" if label is None else "cached"
    log(f"building {image} from Debian {SUITE} packages ({', '.join(standin.packages)})")
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    cache = shlex.quote(str(DEB_CACHE))
    with tempfile.TemporaryDirectory(prefix="ordermesh-standin-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        debs = Path(tmp) / "debs"
        debs.mkdir()
        argv = [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={','.join(standin.packages)}",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            # update-alternatives links man pages even when they are left out (the JRE)
            '--essential-hook=mkdir -p "$1/usr/share/man/man1"',
            # keep every downloaded .deb for the next build (mmdebstrap's own recipe)
            "--skip=essential/unlink",
            f'--setup-hook=mkdir -p {cache} "$1/var/cache/apt/archives/"',
            f"--setup-hook=sync-in {cache} /var/cache/apt/archives/",
            *(f"--customize-hook={hook}" for hook in standin.hooks),
            f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(debs))}",
            SUITE,
            str(tarball),
            *mirrors,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise ComposeError(f"mmdebstrap for {image} failed: {tail}")
        # into the shared cache one rename at a time: other builds may be reading it
        for deb in debs.glob("*.deb"):
            if not (DEB_CACHE / deb.name).exists():
                os.replace(deb, DEB_CACHE / deb.name)
        changes = [*standin.changes, f"LABEL {LABEL_STANDIN}={digest}"]
        podman("import", *(f"--change={c}" for c in changes), str(tarball), image)
    return "built"


def dockerfile_base(dockerfile: Path) -> str | None:
    """The default of the Dockerfile's ``ARG BASE=...``."""
    m = re.search(r"^ARG\s+BASE=(\S+)", dockerfile.read_text(), re.M)
    return m.group(1) if m else None


def build_images(plan: Plan, podman: Podman, log: Any, *, no_cache: bool = False) -> None:
    """Every image the plan's containers run: the images that cannot be pulled first (all
    at once: each is a download and a dpkg run), then each ``build:`` once per image."""
    needed: dict[str, None] = {}
    builds: dict[str, tuple[Path, Path, dict[str, str]]] = {}
    for service in plan.services:
        spec = plan.compose["services"][service]
        build = spec.get("build")
        if build is None:
            needed[normalize_image(spec["image"])] = None
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (plan.base / build.get("context", ".")).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        args = {k: str(v) for k, v in (build.get("args") or {}).items()}
        base = args.get("BASE") or dockerfile_base(dockerfile)
        if base is not None:
            args["BASE"] = normalize_image(base)
            needed[args["BASE"]] = None
        builds.setdefault(
            local_image(spec.get("image") or f"{plan.project}-{service}"),
            (context, dockerfile, args),
        )
    with ThreadPoolExecutor(max_workers=len(needed) or 1) as pool:
        outcomes = {image: pool.submit(ensure_standin, podman, image, log) for image in needed}
    for image, outcome in outcomes.items():
        log(f"{image}: {outcome.result()}")
    for tag, (context, dockerfile, args) in builds.items():
        log(f"building {tag} from {dockerfile.relative_to(context)}")
        started = time.monotonic()
        podman(
            "build",
            "--format=docker",  # OCI images drop HEALTHCHECK
            "--network=host",
            *podman.build_flags(),
            *(["--no-cache"] if no_cache else []),
            *(f"--build-arg={k}={v}" for k, v in args.items()),
            "-f",
            str(dockerfile),
            "-t",
            tag,
            str(context),
            timeout=1800,
        )
        log(f"{tag}: built in {time.monotonic() - started:.0f}s")


# --- running containers --------------------------------------------------------------------


def _duration(value: Any, default: float) -> float:
    """Seconds of a compose duration (``30s``, ``1m30s``, ``500ms``, a number)."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value)):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def healthcheck_flags(spec: Mapping[str, Any]) -> list[str]:
    check = spec.get("healthcheck")
    if not check:
        return []  # the image's own HEALTHCHECK applies
    if check.get("disable"):
        return ["--no-healthcheck"]
    test = check.get("test")
    flags: list[str] = []
    if isinstance(test, list):
        if test[0] == "NONE":
            return ["--no-healthcheck"]
        if test[0] == "CMD-SHELL":
            flags.append(f"--health-cmd={test[1]}")
        else:
            flags.append(f"--health-cmd={json.dumps(test[1:])}")
    elif isinstance(test, str):
        flags.append(f"--health-cmd={test}")
    for key, flag in (
        ("interval", "--health-interval"),
        ("timeout", "--health-timeout"),
        ("start_period", "--health-start-period"),
    ):
        if key in check:
            flags.append(f"{flag}={_duration(check[key], 0):g}s")
    if "retries" in check:
        flags.append(f"--health-retries={int(check['retries'])}")
    return flags


def run_argv(
    plan: Plan, c: Container, podman: Podman, *, one_off: Sequence[str] | None = None
) -> list[str]:
    """The ``podman run`` arguments of container ``c`` (``one_off``: its command instead,
    in the foreground, removed after)."""
    spec = c.spec
    host = plan.network == "host"
    net = HostNetwork(plan.containers)

    def fix(text: str) -> str:
        return net.rewrite(text, c) if host else text

    name = c.name if one_off is None else f"{c.name}-run-{uuid.uuid4().hex[:6]}"
    argv = ["run", "--name", name]
    argv += ["--rm", "-i"] if one_off is not None else ["-d"]
    argv += [
        f"--label={LABEL_PROJECT}={plan.project}",
        f"--label={LABEL_SERVICE}={c.service}",
        f"--label={LABEL_NUMBER}={c.number}",
        "--log-driver=k8s-file",
        *podman.run_flags(),
    ]
    if host:
        argv += ["--network=host"]
    else:
        argv += [f"--network={plan.bridge_name}", f"--network-alias={c.service}"]
        argv += [f"--hostname={c.service}"] if replicas(spec) == 1 else []
        argv += [f"--publish={LOOPBACK}:{hp}:{cp}" for cp, hp in c.ports.items()]
    if spec.get("init"):
        argv.append("--init")
    if spec.get("user"):
        argv.append(f"--user={spec['user']}")
    if spec.get("working_dir"):
        argv.append(f"--workdir={spec['working_dir']}")
    if one_off is None:
        restart = str(spec.get("restart", "no"))
        argv.append(f"--restart={restart}")
    if "stop_grace_period" in spec:
        argv.append(f"--stop-timeout={int(_duration(spec['stop_grace_period'], 10))}")
    if spec.get("stop_signal"):
        argv.append(f"--stop-signal={spec['stop_signal']}")
    for key, value in env_of(spec, plan.base).items():
        argv.append(f"--env={key}={fix(value)}")
    for volume in as_list(spec.get("volumes")):
        source, _, target = str(volume).partition(":")
        if source.startswith((".", "/")):
            source = str((plan.base / source).resolve())
        else:
            source = f"{plan.project}_{source}"
        argv.append(f"--volume={source}:{target}")
    for flag in healthcheck_flags(spec) if one_off is None else ["--no-healthcheck"]:
        key, eq, value = flag.partition("=")
        argv.append(f"{key}={fix(value)}" if key == "--health-cmd" and eq else flag)
    entrypoint = spec.get("entrypoint")
    if entrypoint is not None:
        words = entrypoint if isinstance(entrypoint, list) else shlex.split(entrypoint)
        argv.append(f"--entrypoint={json.dumps([fix(str(w)) for w in words])}")
    build = spec.get("build")
    image = spec.get("image") or f"{plan.project}-{c.service}"
    argv.append(local_image(image) if build is not None else normalize_image(image))
    command: Any = list(one_off) if one_off is not None else spec.get("command")
    if command is not None:
        words = command if isinstance(command, list) else shlex.split(str(command))
        argv += [fix(str(w)) for w in words]
    return argv


def container_state(podman: Podman, name: str) -> dict[str, Any]:
    proc = podman("inspect", "--type=container", "--format={{json .State}}", name, check=False)
    if proc.returncode != 0:
        return {}
    state: dict[str, Any] = json.loads(proc.stdout)
    return state


def logs_tail(podman: Podman, name: str, lines: int = 25) -> str:
    proc = podman("logs", "--tail", str(lines), name, check=False)
    return (proc.stdout + proc.stderr).strip()


def wait_healthy(podman: Podman, c: Container, deadline: float, log: Any) -> None:
    """Run ``c``'s healthcheck until it passes (podman has no timers here to run it)."""
    interval = 1.0
    while True:
        state = container_state(podman, c.name)
        if state.get("Status") not in ("running", "created", "configured", "initialized"):
            raise ComposeError(
                f"{c.name} is {state.get('Status') or 'gone'} (exit {state.get('ExitCode')})"
                f" before it was healthy:\n{logs_tail(podman, c.name)}"
            )
        proc = podman("healthcheck", "run", c.name, check=False, timeout=120)
        if proc.returncode == 0:
            log(f"{c.name}: healthy")
            return
        if "has no defined healthcheck" in proc.stderr:
            raise ComposeError(f"{c.name}: `service_healthy` needs a healthcheck")
        if time.monotonic() > deadline:
            raise ComposeError(f"{c.name} not healthy in time:\n{logs_tail(podman, c.name)}")
        time.sleep(interval)
        interval = min(5.0, interval * 1.5)


def wait_completed(podman: Podman, c: Container, deadline: float, log: Any) -> None:
    while True:
        state = container_state(podman, c.name)
        status = state.get("Status")
        if status in ("exited", "stopped"):
            code = int(state.get("ExitCode", -1))
            if code != 0:
                raise ComposeError(f"{c.name} failed (exit {code}):\n{logs_tail(podman, c.name)}")
            log(f"{c.name}: completed")
            return
        if not state:
            raise ComposeError(f"{c.name} is gone")
        if time.monotonic() > deadline:
            raise ComposeError(f"{c.name} did not complete in time:\n{logs_tail(podman, c.name)}")
        time.sleep(0.5)


def project_containers(podman: Podman, project: str) -> list[dict[str, Any]]:
    proc = podman(
        "ps", "--all", f"--filter=label={LABEL_PROJECT}={project}", "--format=json", check=False
    )
    found: list[dict[str, Any]] = json.loads(proc.stdout or "[]") or []
    return found


def up(
    plan: Plan,
    podman: Podman,
    log: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    wait: bool = False,
) -> None:
    """Start every container in dependency order, each once its dependencies are ready;
    ``wait``: then wait until every one with a healthcheck is healthy."""
    if project_containers(podman, plan.project):
        raise ComposeError(f"project {plan.project} has containers; `down` it first")
    deadline = time.monotonic() + timeout_s
    bridge = plan.network == "bridge"
    if bridge and podman("network", "exists", plan.bridge_name, check=False).returncode != 0:
        podman("network", "create", f"--label={LABEL_PROJECT}={plan.project}", plan.bridge_name)
    services = plan.compose["services"]
    ready: set[tuple[str, str]] = set()
    for service in plan.services:
        for dep, opts in depends_on(services[service]).items():
            condition = opts["condition"]
            if dep not in plan.services or (dep, condition) in ready:
                continue
            for c in plan.of(dep):
                if condition == "service_healthy":
                    wait_healthy(podman, c, deadline, log)
                elif condition == "service_completed_successfully":
                    wait_completed(podman, c, deadline, log)
            ready.add((dep, condition))
        for volume in as_list(services[service].get("volumes")):
            source = str(volume).partition(":")[0]
            if source.startswith((".", "/")):
                continue
            name = f"{plan.project}_{source}"
            if podman("volume", "exists", name, check=False).returncode != 0:
                podman("volume", "create", f"--label={LABEL_PROJECT}={plan.project}", name)
        for c in plan.of(service):
            podman(*run_argv(plan, c, podman))
            where = ", ".join(f"{cp}->{LOOPBACK}:{hp}" for cp, hp in c.ports.items())
            log(f"{c.name}: started" + (f" ({where})" if where else ""))
    if wait:
        for c in plan.containers:
            check = c.spec.get("healthcheck") or {}
            restart = str(c.spec.get("restart", "no"))
            if (c.service, "service_healthy") in ready or check.get("disable"):
                continue
            if restart == "no" and not check:
                continue  # a one-shot job
            wait_healthy(podman, c, deadline, log)


def down(podman: Podman, project: str, log: Any, *, volumes: bool = False) -> None:
    names = [c["Names"][0] for c in project_containers(podman, project)]
    if names:
        podman("stop", "--time=30", *names, check=False, timeout=120)
        podman("rm", "--force", *names, check=False)
        log(f"removed {len(names)} containers")
    if volumes:
        proc = podman(
            "volume", "ls", f"--filter=label={LABEL_PROJECT}={project}", "--format={{.Name}}"
        )
        vols = proc.stdout.split()
        if vols:
            podman("volume", "rm", "--force", *vols)
            log(f"removed volumes {', '.join(vols)}")
    if podman("network", "exists", f"{project}_default", check=False).returncode == 0:
        podman("network", "rm", "--force", f"{project}_default", check=False)


def endpoints(plan: Plan) -> dict[str, Any]:
    """Where the host reaches the deployment: API and dashboard URLs, Kafka, PostgreSQL."""
    found: dict[str, Any] = {"api": [], "dashboard": None, "bootstrap_servers": None}
    for c in plan.containers:
        cmd = [str(w) for w in as_list(c.spec.get("command"))]
        if cmd[:1] == ["api"] and 8080 in c.ports:
            found["api"].append(c.url(8080))
        elif cmd[:2] == ["analytics", "run"] and 8090 in c.ports:
            found["dashboard"] = c.url(8090, "/")
    kafka = [c for c in plan.containers if "KAFKA_NODE_ID" in env_of(c.spec, plan.base)]
    # on a bridge network Kafka advertises its service names, which the host cannot resolve
    if kafka and plan.network == "host":
        found["bootstrap_servers"] = ",".join(f"{LOOPBACK}:{c.ports[9092]}" for c in kafka)
    pg = plan.of("postgres")
    if pg and 5432 in pg[0].ports:
        env = env_of(pg[0].spec, plan.base)
        user, password = env.get("POSTGRES_USER", "postgres"), env.get("POSTGRES_PASSWORD", "")
        found["database_url"] = (
            f"postgresql://{user}:{password}@{LOOPBACK}:{pg[0].ports[5432]}"
            f"/{env.get('POSTGRES_DB', user)}"
        )
    return found


# --- state between commands ----------------------------------------------------------------


def default_state_file(project: str) -> Path:
    return Path.home() / ".local" / "share" / "ordermesh" / "compose" / f"{project}.json"


def save_state(path: Path, plan: Plan, profiles: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "project": plan.project,
        "network": plan.network,
        "profiles": list(profiles),
        "ports": {c.name: {str(k): v for k, v in c.ports.items()} for c in plan.containers},
        "containers": {c.name: c.service for c in plan.containers},
        "endpoints": endpoints(plan),
    }
    path.write_text(json.dumps(payload, indent=2))


def load_state(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return state


# --- command line --------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ComposeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run compose.yaml with podman (docs/deploy.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-f", "--file", type=Path, default=DEFAULT_FILE, help="compose file")
    parser.add_argument("-p", "--project", default="ordermesh", help="project name")
    parser.add_argument("--env-file", type=Path, action="append", default=[])
    parser.add_argument("--profile", action="append", default=[])
    parser.add_argument("--network", choices=("host", "bridge"), default="host")
    parser.add_argument("--state", type=Path, help="state file (default: per project)")
    parser.add_argument("--plain", action="store_true", help="no podman workaround flags")
    parser.add_argument("-v", "--verbose", action="store_true", help="print podman commands")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="the images: stand-in bases (cached), then the app")
    b.add_argument("--no-cache", action="store_true")
    u = sub.add_parser("up", help="build, start in dependency order, wait")
    u.add_argument("--no-build", action="store_true")
    u.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    u.add_argument("--wait", action="store_true", help="until every service is healthy")
    r = sub.add_parser("run", help="a one-off command in a service's image (after `up`)")
    r.add_argument("service")
    r.add_argument("args", nargs=argparse.REMAINDER)
    d = sub.add_parser("down", help="stop and remove the project's containers")
    d.add_argument("--volumes", action="store_true", help="and its volumes")
    sub.add_parser("ps", help="the project's containers, health and endpoints")
    sub.add_parser("plan", help="print the podman commands `up` would run")
    args = parser.parse_args(argv)

    # as compose: the env files (default: .env beside the compose file), the shell's over them
    from_files: dict[str, str] = {}
    default_env = args.file.parent / ".env"
    for path in args.env_file or ([default_env] if default_env.exists() else []):
        from_files.update(read_env_file(path))
    env = {**from_files, **os.environ}
    profiles = [*args.profile, *filter(None, env.get("COMPOSE_PROFILES", "").split(","))]
    state_file = args.state or default_state_file(args.project)
    podman = Podman(plain=args.plain, verbose=args.verbose)

    with _errors():
        compose = load_compose(args.file, env)
        base = args.file.parent.resolve()
        if args.command == "down":
            down(podman, args.project, _log, volumes=args.volumes)
            state_file.unlink(missing_ok=True)
            return 0
        if args.command == "run" and args.service not in compose["services"]:
            raise ComposeError(f"no service {args.service} in {args.file}")
        state = load_state(state_file) if args.command in ("run", "ps") else {}
        if state:
            profiles = state["profiles"]
        plan = make_plan(
            compose,
            base,
            args.project,
            profiles,
            network=state.get("network", args.network),
            ports=state.get("ports"),
            extra=[args.service] if args.command == "run" else (),
        )
        if args.command == "plan":
            for c in plan.containers:
                print(shlex.join(podman.argv(*run_argv(plan, c, podman))))
            return 0
        if args.command == "build":
            build_images(plan, podman, _log, no_cache=args.no_cache)
            return 0
        if args.command == "up":
            if not args.no_build:
                build_images(plan, podman, _log)
            started = time.monotonic()
            try:
                up(plan, podman, _log, args.timeout, wait=args.wait)
            finally:
                save_state(state_file, plan, profiles)
            _log(f"up in {time.monotonic() - started:.0f}s; state in {state_file}")
            print(json.dumps(endpoints(plan), indent=2))
            return 0
        if args.command == "run":
            if not state:
                raise ComposeError(f"no running project {args.project}: `up` first")
            (c,) = plan.of(args.service)[:1]
            argv_ = podman.argv(*run_argv(plan, c, podman, one_off=args.args))
            return subprocess.run(argv_, env=podman.env(), check=False).returncode
        if args.command == "ps":
            for info in project_containers(podman, args.project):
                name = info["Names"][0]
                health = ""
                if info.get("State") == "running":
                    proc = podman("healthcheck", "run", name, check=False, timeout=60)
                    no_check = "no defined healthcheck" in proc.stderr
                    if not no_check:
                        health = " healthy" if proc.returncode == 0 else " unhealthy"
                print(f"{name:40} {info.get('State')}{health}")
            print(json.dumps(endpoints(plan), indent=2))
            return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
