"""Running the server with uvicorn: one process, one engine, on 127.0.0.1 unless told otherwise.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections, the service refuses new requests on
open ones (503) and the engine gives those in flight `grace` seconds to finish, then ends them
(RequestAborted "shutdown", which a streaming client sees as an error event); uvicorn waits for
their responses, the lifespan closes the engine and waits for audit appends in flight.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable

from gptdeploy.errors import GptDeployError
from gptdeploy.serve.app import build_app
from gptdeploy.serve.service import ServeConfig, Service

# uvicorn's own limit on waiting for responses after SIGTERM: past the engine's grace, by which
# time every request has ended; only a stuck client connection is cut there.
UVICORN_MARGIN_S = 5.0


def serve(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    announce: Callable[[str, int, Service], None] | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C. `port` 0 takes a free port; `announce(host, port, service)`
    is called once the socket listens."""
    import uvicorn  # the `serve` extra

    log_to_stderr(log_level)
    service = Service(config)
    try:
        sock = listen(host, port)
        if announce is not None:
            announce(host, sock.getsockname()[1], service)
        uv = uvicorn.Config(
            build_app(service),
            log_level=log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=int(config.grace + UVICORN_MARGIN_S),
        )
        _server(uv, service).run(sockets=[sock])
    finally:
        service.close()  # also when uvicorn never reached its lifespan shutdown


def log_to_stderr(level: str) -> None:
    """gptdeploy's own records (engine faults, the detail behind a 500) to stderr at `level`, as
    uvicorn logs its own; uvicorn configures only its loggers."""
    logger = logging.getLogger("gptdeploy")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise GptDeployError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host"
        ) from None
    sock.set_inheritable(True)
    return sock


def _server(config, service: Service):
    """A uvicorn.Server whose signal handler first drains the service, and that exits normally
    after a graceful stop (uvicorn re-raises the signal, so the process would die by it)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.drain()  # the engine's locks are re-entrant: safe inside a signal handler
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

    return Server(config)
