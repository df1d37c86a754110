"""Start, stop and inspect a local PostgreSQL server: the services' shared state.

One server per directory ``root`` (``Settings.postgres_dir()``)::

    <root>/postgres.json     port, pid, password, where the cluster is (mode 0600)
    <server>/data/           the cluster (PGDATA): postgresql.conf + ordermesh.conf,
                             postmaster.pid, the unix socket
    <server>/server.log

``<server>`` is ``root`` itself, except as root: PostgreSQL refuses to run as root, so the
server then runs as the ``postgres`` system user (``runuser``), and since root's own
directories (``/root``, pytest's temp dirs) are closed to that user, the cluster lives in
its home instead (``~postgres/ordermesh/<key of root>/``).

The server listens on 127.0.0.1 only and asks for a password (generated at creation, kept
in ``postgres.json``) on TCP and the socket alike. Only the PID in ``postmaster.pid`` is
ever stopped, and only after checking it is the postmaster of this cluster (PIDs get
reused).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import psycopg
from psycopg import sql

from ordermesh.broker.local import free_ports, pid_alive
from ordermesh.config import Settings
from ordermesh.errors import StoreError

log = logging.getLogger(__name__)

START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 30.0
SERVER_USER: Final = "postgres"
SUPERUSER: Final = "ordermesh"
DATABASE: Final = "ordermesh"
# a unix socket path longer than this does not fit sockaddr_un: the server then has none
_MAX_SOCKET_DIR = 90


@dataclass
class ServerState:
    """What ``postgres.json`` records of one local server."""

    port: int
    password: str
    server_dir: str
    pid: int | None = None
    user: str = SUPERUSER
    database: str = DATABASE

    def url(self, database: str | None = None) -> str:
        """The ``ORDERMESH_DATABASE_URL`` of ``database`` (default: ``ordermesh``)."""
        name = database or self.database
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{name}"

    def redacted_url(self) -> str:
        return f"postgresql://{self.user}:***@127.0.0.1:{self.port}/{self.database}"


def find_bin_dir(configured: Path | None = None) -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: ``configured``, else on PATH, else the newest
    Debian-style ``/usr/lib/postgresql/<major>/bin``."""
    if configured is not None:
        if not (configured / "initdb").exists():
            raise StoreError(f"ORDERMESH_POSTGRES_BIN_DIR={configured}: no initdb there")
        return configured
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]

    def major(path: Path) -> int:
        name = path.parent.name
        return int(name) if name.isdigit() else 0

    if candidates:
        return max(candidates, key=major)
    raise StoreError(
        "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin):"
        " `apt-get install postgresql`, or set ORDERMESH_POSTGRES_BIN_DIR"
    )


class LocalPostgres:
    """A local PostgreSQL server whose state is kept in ``root``.

    ``fast``: a throwaway server for tests (``fsync``, ``synchronous_commit`` and
    ``full_page_writes`` off: a crash of the machine may lose or corrupt its data).
    Applies when the server is created.
    """

    def __init__(
        self,
        root: Path,
        *,
        bin_dir: Path | None = None,
        fast: bool = False,
        server_user: str = SERVER_USER,
    ) -> None:
        self.root = root
        self._bin_dir = bin_dir
        self.fast = fast
        self.server_user = server_user

    @classmethod
    def from_settings(
        cls, settings: Settings, root: Path | None = None, *, fast: bool = False
    ) -> LocalPostgres:
        """The local server of ``settings`` (rooted at ``root``, default its postgres dir)."""
        return cls(root or settings.postgres_dir(), bin_dir=settings.postgres_bin_dir, fast=fast)

    # --- where things are ---------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.root / "postgres.json"

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = find_bin_dir()
        return self._bin_dir

    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _server_dir(self) -> Path:
        """Where a new cluster goes (see the module docstring)."""
        if not self._as_root():
            return self.root
        try:
            home = Path(pwd.getpwnam(self.server_user).pw_dir)
        except KeyError:
            raise StoreError(
                f"running as root, and there is no {self.server_user!r} user to run"
                " PostgreSQL as (it refuses to run as root): install the postgresql package"
            ) from None
        key = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        return home / "ordermesh" / key

    @staticmethod
    def data_dir(state: ServerState) -> Path:
        return Path(state.server_dir) / "data"

    @staticmethod
    def log_file(state: ServerState) -> Path:
        return Path(state.server_dir) / "server.log"

    # --- state ----------------------------------------------------------------------------

    def load_state(self) -> ServerState | None:
        if not self.state_file.exists():
            return None
        try:
            return ServerState(**json.loads(self.state_file.read_text()))
        except (ValueError, TypeError) as exc:
            raise StoreError(f"unreadable PostgreSQL state {self.state_file}: {exc}") from exc

    def _save_state(self, state: ServerState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        # it holds the password
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(asdict(state), indent=2))
        tmp.replace(self.state_file)

    def running_pid(self, state: ServerState | None = None) -> int | None:
        """The postmaster's PID from ``postmaster.pid``, if it is this cluster's and alive."""
        state = state or self.load_state()
        if state is None:
            return None
        data = self.data_dir(state)
        pid = self._lock_pid(state)
        if pid is None or not pid_alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        ours = bool(cmdline) and cmdline[0].endswith(b"postgres") and str(data).encode() in cmdline
        return pid if ours else None

    def _lock_pid(self, state: ServerState) -> int | None:
        try:
            text = (self.data_dir(state) / "postmaster.pid").read_text()
            return int(text.splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    # --- start ----------------------------------------------------------------------------

    def up(self, port: int | None = None) -> tuple[ServerState, bool]:
        """Create (once) and start the server; returns (state, started). Idempotent.

        ``port`` None or 0: any free port. An existing server keeps the port it was
        created with; a stale PID (the server died) is simply replaced.
        """
        state = self.load_state()
        if state is not None:
            if self.running_pid(state) is not None:
                return state, False
            if state.pid is not None:
                log.info("PostgreSQL pid %d is gone (stale); starting it again", state.pid)
            self._wait_lock_released(state)
            self._start(state)
            return state, True
        server_dir = self._server_dir()
        if (server_dir / "data").exists():
            raise StoreError(
                f"{server_dir / 'data'} holds a PostgreSQL cluster that {self.state_file} does"
                " not know: remove it, or run `ordermesh db down --purge`"
            )
        state = ServerState(
            port=port or free_ports(1)[0],
            password=secrets.token_hex(16),
            server_dir=str(server_dir),
        )
        try:
            self._create(state)
            self._save_state(state)
            self._start(state)
        except BaseException:
            # a half-made server is of no use: the next `up` starts from scratch
            with contextlib.suppress(StoreError):
                self.down()
            self._remove(state)
            raise
        return state, True

    def _wait_lock_released(self, state: ServerState, deadline_s: float = 15.0) -> None:
        """Wait until a dead postmaster's PID is gone for good: until it is reaped, a
        killed one still answers kill(0), and a new postmaster would refuse its lock."""
        pid = self._lock_pid(state)
        if pid is None:
            return
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(0.1)
        log.warning("PID %d of %s's postmaster.pid is still there", pid, self.data_dir(state))

    def _create(self, state: ServerState) -> None:
        server_dir = Path(state.server_dir)
        server_dir.mkdir(parents=True, exist_ok=True)
        server_dir.chmod(0o700)
        pwfile = server_dir / "pwfile"
        pwfile.write_text(state.password + "\n")
        pwfile.chmod(0o600)
        if server_dir != self.root:
            self._give_to_server_user(server_dir.parent)
        self._give_to_server_user(server_dir, pwfile)
        data = self.data_dir(state)
        cmd = [
            str(self.bin_dir / "initdb"),
            "--pgdata",
            str(data),
            "--username",
            state.user,
            "--pwfile",
            str(pwfile),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
        ]
        if self.fast:
            cmd.append("--no-sync")
        try:
            self._run(cmd, "initdb", server_dir)
        finally:
            pwfile.unlink(missing_ok=True)
        socket_dir = str(data) if len(str(data)) <= _MAX_SOCKET_DIR else ""
        conf = {
            "port": str(state.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{socket_dir}'",
            # N instances of each service, each with a small pool, plus tools and tests
            "max_connections": "200",
            "shared_buffers": "64MB",
            "log_line_prefix": "'%m [%p] %d '",
        }
        if self.fast:
            conf |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        own = data / "ordermesh.conf"
        own.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        with open(data / "postgresql.conf", "a") as main_conf:
            main_conf.write("\ninclude 'ordermesh.conf'\n")
        self._give_to_server_user(own)

    def _start(self, state: ServerState) -> None:
        data = self.data_dir(state)
        logfile = self.log_file(state)
        cmd = [
            str(self.bin_dir / "pg_ctl"),
            "start",
            "--pgdata",
            str(data),
            "--log",
            str(logfile),
            "--wait",
            "--timeout",
            str(int(START_DEADLINE_S)),
            "--silent",
        ]
        try:
            self._run(cmd, "pg_ctl start", Path(state.server_dir))
        except StoreError as exc:
            raise StoreError(f"{exc}\n{self.log_tail(state)}") from None
        pid = self.running_pid(state)
        if pid is None:
            raise StoreError(f"PostgreSQL started but is not running:\n{self.log_tail(state)}")
        state.pid = pid
        self._save_state(state)
        self._wait_ready(state)
        self._ensure_database(state)
        log.info("PostgreSQL pid %d on 127.0.0.1:%d (%s)", pid, state.port, data)

    def _wait_ready(self, state: ServerState, deadline_s: float = START_DEADLINE_S) -> None:
        """Block until the server takes a login to its ``postgres`` database, or raise."""
        end = time.monotonic() + deadline_s
        last = ""
        while time.monotonic() < end:
            if state.pid is not None and not pid_alive(state.pid):
                raise StoreError(
                    f"PostgreSQL (pid {state.pid}) exited during startup:\n{self.log_tail(state)}"
                )
            try:
                with psycopg.connect(state.url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = str(exc).strip()
            time.sleep(0.2)
        raise StoreError(f"PostgreSQL not ready after {deadline_s:.0f}s ({last})")

    def _ensure_database(self, state: ServerState) -> None:
        with psycopg.connect(state.url("postgres"), autocommit=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (state.database,)
            ).fetchone()
            if found is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(state.database)))

    def _run(self, cmd: list[str], what: str, cwd: Path) -> None:
        if self._as_root():
            cmd = ["runuser", "-u", self.server_user, "--", *cmd]
        # PG* variables of the caller (PGDATA, PGPORT, ...) must not redirect the tools
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # own session: a Ctrl-C in the terminal must not reach the server under the services
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).strip()[-2000:]
            raise StoreError(f"{what} failed (exit {proc.returncode}): {out}")

    def _give_to_server_user(self, *paths: Path) -> None:
        if not self._as_root():
            return
        user = pwd.getpwnam(self.server_user)
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)

    def log_tail(self, state: ServerState, lines: int = 20) -> str:
        path = self.log_file(state)
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {path})"
        return f"--- {path}\n" + "\n".join(text)

    # --- stop -----------------------------------------------------------------------------

    def down(self, *, immediate: bool = False) -> int | None:
        """Stop the server (``pg_ctl stop -m fast``, then harder after a deadline); the PID
        stopped, or None when none ran. ``immediate``: ``-m immediate`` at once, as a
        crash would (no shutdown checkpoint: the next start recovers from the WAL)."""
        state = self.load_state()
        if state is None:
            return None
        pid = self.running_pid(state)
        if pid is not None:
            base = [str(self.bin_dir / "pg_ctl"), "stop", "--pgdata", str(self.data_dir(state))]
            wait = ["--wait", "--timeout", str(int(STOP_DEADLINE_S)), "--silent"]
            mode = "immediate" if immediate else "fast"
            try:
                self._run([*base, "--mode", mode, *wait], "pg_ctl stop", Path(state.server_dir))
            except StoreError as exc:
                log.warning("PostgreSQL pid %d: %s; stopping it immediately", pid, exc)
                with contextlib.suppress(StoreError):
                    self._run([*base, "--mode", "immediate", *wait], "pg_ctl stop", Path("/"))
            if not self._wait_exit(pid, STOP_DEADLINE_S):
                log.warning("PostgreSQL pid %d did not stop; sending SIGKILL", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, 10)
        state.pid = None
        self._save_state(state)
        return pid

    @staticmethod
    def _wait_exit(pid: int, deadline_s: float) -> bool:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if not pid_alive(pid):
                return True
            time.sleep(0.1)
        return False

    def purge(self) -> None:
        """Delete the server's data; only when it is not running."""
        state = self.load_state()
        if state is None:
            return
        if self.running_pid(state) is not None:
            raise StoreError("PostgreSQL is running; stop it before purging its data")
        self._remove(state)

    def _remove(self, state: ServerState) -> None:
        server_dir = Path(state.server_dir)
        if server_dir == self.root:
            shutil.rmtree(self.data_dir(state), ignore_errors=True)
            self.log_file(state).unlink(missing_ok=True)
        else:
            shutil.rmtree(server_dir, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)

    # --- inspect --------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """Running, healthy (takes a login), port, pid, where, for `db status`."""
        state = self.load_state()
        if state is None:
            return {"running": False, "healthy": False}
        pid = self.running_pid(state)
        healthy = False
        if pid is not None:
            try:
                with psycopg.connect(state.url(), connect_timeout=3) as conn:
                    conn.execute("SELECT 1")
                healthy = True
            except psycopg.Error:
                healthy = False
        return {
            "running": pid is not None,
            "healthy": healthy,
            "pid": pid,
            "port": state.port,
            "database": state.database,
            "url": state.redacted_url(),
            "data_dir": str(self.data_dir(state)),
            "log": str(self.log_file(state)),
        }
