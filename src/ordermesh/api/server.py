"""Serving the app with uvicorn: in the foreground (``ordermesh api``) or in a thread."""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any, Final

import uvicorn

from ordermesh.errors import OrderMeshError

START_TIMEOUT_S: Final = 30.0


def uvicorn_config(app: Any, *, host: str = "127.0.0.1", port: int = 8080, **extra: Any) -> Any:
    """The one uvicorn configuration of the API."""
    options: dict[str, Any] = {
        # "auto" picks uvloop and httptools (dependencies): ~2x asyncio + h11, measured
        "loop": "auto",
        "http": "auto",
        "lifespan": "on",
        "access_log": False,
        "log_config": None,  # keep the process's logging as the CLI or pytest set it up
        "timeout_graceful_shutdown": 15,
    }
    options.update(extra)
    return uvicorn.Config(app, host=host, port=port, **options)


def serve_in_foreground(config: Any) -> bool:
    """Serve under uvicorn ``config`` until SIGTERM or SIGINT; whether it ever started
    (if not, uvicorn logged why: port taken, startup failed)."""
    server = uvicorn.Server(config)

    def stop(_sig: int, _frame: object) -> None:
        server.should_exit = True

    # uvicorn re-raises a SIGTERM/SIGINT after its graceful shutdown, into the handlers it
    # found: with these, that ends in exit 0 like the other services (not 143), and a
    # signal that arrives before uvicorn listens still stops it
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.run()
    return bool(server.started)


class ThreadedServer:
    """``app`` under uvicorn in a daemon thread on a free loopback port (tests, tools)."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=port))
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="api", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OrderMeshError("the API did not start (see its log)")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(START_TIMEOUT_S)
        self._sock.close()
        if self._thread.is_alive():
            raise OrderMeshError("the API did not shut down")

    def __enter__(self) -> ThreadedServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
