"""Run OrderMesh services as supervised child processes (`ordermesh up`, `simulate`).

Each service is ``python -m ordermesh <args>`` with the mesh's settings in its
environment and its output in ``<data_dir>/logs/<name>.log``. A service that exits on its
own is restarted with a growing back-off (``restart="always"``), or only when it failed
(``"on-failure"``: a load that finished its count exits 0 and stays done); a service
stopped on purpose (``stop``) stays down until ``start``. Only the PIDs started here are
ever signalled.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from ordermesh.config import Settings

log = logging.getLogger(__name__)

STOP_DEADLINE_S = 30.0
MAX_BACKOFF_S = 30.0

Restart = Literal["always", "on-failure", "never"]


@dataclass
class Service:
    """One supervised process: its command, and its state."""

    name: str
    args: list[str]
    restart: Restart = "always"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    wanted: bool = False
    restarts: int = 0
    next_start: float = 0.0
    backoff: float = 1.0
    started_at: float = 0.0
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Starts, watches, restarts and stops the services of one mesh."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log_dir = settings.data_dir / "logs"
        self.services: dict[str, Service] = {}

    def add(
        self,
        name: str,
        args: list[str],
        *,
        restart: Restart = "always",
        env: dict[str, str] | None = None,
    ) -> Service:
        service = Service(name, args, restart=restart, env=env or {})
        self.services[name] = service
        return service

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, name: str) -> Service:
        service = self.services[name]
        service.wanted = True
        if service.running():
            return service
        self._spawn(service)
        return service

    def _spawn(self, service: Service) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if service._log is None or service._log.closed:
            service._log = open(self.log_path(service.name), "ab")  # noqa: SIM115
        env = dict(os.environ)
        env.update(self.settings.as_env())
        env.update(service.env)
        service.proc = subprocess.Popen(
            [sys.executable, "-m", "ordermesh", *service.args],
            env=env,
            stdout=service._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # own process group: the terminal's Ctrl-C reaches the supervisor only, which
            # then stops the children in order
            start_new_session=True,
        )
        service.started_at = time.monotonic()
        log.info(
            "started %s (pid %d): ordermesh %s",
            service.name,
            service.proc.pid,
            " ".join(service.args),
        )

    def stop(
        self, name: str, sig: int = signal.SIGTERM, timeout: float = STOP_DEADLINE_S
    ) -> int | None:
        """Stop one service on purpose (it stays down); its exit code."""
        service = self.services[name]
        service.wanted = False
        return self._terminate(service, sig, timeout)

    def _terminate(self, service: Service, sig: int, timeout: float) -> int | None:
        proc = service.proc
        if proc is None:
            return None
        if proc.returncode is not None:
            return proc.returncode  # already stopped and reported
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) did not stop in %.0fs; SIGKILL", service.name, proc.pid, timeout
                )
                proc.kill()
                proc.wait(10)
        code = proc.returncode
        log.info("%s (pid %d) exited with %s", service.name, proc.pid, code)
        return code

    def check(self) -> list[str]:
        """Restart wanted services that died; returns the names restarted now."""
        restarted = []
        now = time.monotonic()
        for service in self.services.values():
            if not service.wanted or service.running() or service.proc is None:
                continue
            if service.restart == "never":
                continue
            if service.restart == "on-failure" and service.proc.returncode == 0:
                service.wanted = False  # finished its work
                log.info("%s (pid %d) finished", service.name, service.proc.pid)
                continue
            if service.next_start == 0.0:
                code = service.proc.returncode
                # a service that ran a while before dying starts over with a short back-off
                if now - service.started_at > 60:
                    service.backoff = 1.0
                service.next_start = now + service.backoff
                log.warning(
                    "%s (pid %d) exited with %s; restarting in %.0fs",
                    service.name,
                    service.proc.pid,
                    code,
                    service.backoff,
                )
                service.backoff = min(MAX_BACKOFF_S, service.backoff * 2)
            elif now >= service.next_start:
                service.next_start = 0.0
                service.restarts += 1
                self._spawn(service)
                restarted.append(service.name)
        return restarted

    def stop_all(self, order: list[str] | None = None) -> dict[str, int | None]:
        """SIGTERM every service (in ``order`` first), SIGKILL after the deadline."""
        names = list(order or []) + [n for n in self.services if n not in (order or [])]
        codes = {}
        for name in names:
            if name in self.services:
                codes[name] = self.stop(name)
        for service in self.services.values():
            if service._log is not None:
                service._log.close()
        return codes

    # --- state file for `ordermesh top` --------------------------------------------------

    def write_state(self, extra: dict[str, Any]) -> Path:
        path = self.settings.data_dir / "mesh.json"
        state = {
            "services": {
                s.name: {
                    "pid": s.pid,
                    "args": s.args,
                    "restarts": s.restarts,
                    "log": str(self.log_path(s.name)),
                }
                for s in self.services.values()
            },
            **extra,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, indent=2))
        return path
