"""The server process's life: serve, shut down gracefully on a signal, exit 1 if the engine dies.

SIGTERM or SIGINT: stop accepting connections, let in-flight requests finish
(up to uvicorn's `timeout_graceful_shutdown`, our --shutdown-timeout), stop the
engine, exit 0. A second SIGINT cuts the grace period short. If the engine loop
dies, in-flight requests have already been failed; the server shuts down the same
way and the process exits 1 so a supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from tokenmill.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, with signals that end the process with 0 after a graceful
    shutdown (uvicorn re-raises the caught signal, which would exit with -15 on SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self.should_exit:
            logger.warning("%s again: cutting in-flight requests off now", name)
            self.force_exit = True
            return
        logger.info(
            "%s: shutting down; in-flight requests get up to %s s to finish",
            name, self.config.timeout_graceful_shutdown,
        )  # fmt: skip
        self.should_exit = True

    def stop(self) -> None:
        """Begin a graceful shutdown (called on the event loop)."""
        self.should_exit = True


def serve_app(config: uvicorn.Config, engine: AsyncEngine, sock: socket.socket) -> int:
    """Serve on `sock` until a signal (return 0) or the engine's death (return 1)."""
    server = GracefulServer(config)
    engine.on_death = server.stop
    server.run(sockets=[sock])
    if engine.died:
        logger.error("exiting with status 1: the engine loop died")
        return 1
    return 0
