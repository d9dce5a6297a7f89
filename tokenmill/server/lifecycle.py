"""The server process's life: serve, drain on a signal, exit with a status that says how it ended.

SIGTERM or SIGINT: stop accepting connections and let in-flight requests finish for up to
--shutdown-timeout seconds. Requests still running then are cut off with an OpenAI error
(503 "the server is shutting down": a JSON body, or an error event and [DONE] on a stream),
their KV blocks freed; a second signal cuts them off at once, a third stops without waiting.
Then the engine stops and the process exits:

- 0: every request in flight finished (or there were none);
- 1: the engine loop died (in-flight requests were failed; a supervisor should restart us);
- 3: the drain was cut short: some requests got the shutdown error instead of their answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

from tokenmill.engine.client import EngineClient
from tokenmill.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)

EXIT_DRAINED = 0
EXIT_ENGINE_DIED = 1
EXIT_DRAIN_CUT = 3

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# uvicorn cancels handler tasks this long after the cut if they still have not ended (they
# should end at once: the cut hands each its error); a cancelled task is a bare 500 or a
# stream closed mid-body, which the cut exists to avoid
_BACKSTOP_S = 5


class GracefulServer(uvicorn.Server):
    """uvicorn's server with tokenmill's drain: a deadline after which in-flight requests end
    with a proper error instead of uvicorn's task cancellation."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient, shutdown_timeout: float):
        config.timeout_graceful_shutdown = math.ceil(shutdown_timeout + _BACKSTOP_S)
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self.num_cut = 0  # requests ended by the cut
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: asyncio.TimerHandle | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

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
        """Runs between bytecodes of the event loop's thread: only flags and thread-safe calls."""
        name = signal.Signals(sig).name
        self._signals += 1
        if self._signals == 1:
            logger.info(
                "%s: shutting down; in-flight requests get up to %s s to finish",
                name, self.shutdown_timeout,
            )  # fmt: skip
            self.should_exit = True
            self._call_soon(self._start_deadline)
        elif self._signals == 2:
            logger.warning("%s again: cutting in-flight requests off now", name)
            self._call_soon(lambda: self.cut(f"{name} again"))
        else:
            logger.warning("%s a third time: stopping without waiting", name)
            self.force_exit = True

    def stop(self) -> None:
        """Begin a graceful shutdown (called on the event loop)."""
        self.should_exit = True

    def cut(self, why: str) -> None:
        """End every request still in flight with the shutdown error (on the event loop)."""
        if self._deadline is not None:
            self._deadline.cancel()
        cut = self.engine.cut_off(ServiceUnavailableError("the server is shutting down"))
        self.num_cut += cut
        if cut:
            logger.warning(
                "%s: %d request(s) still running cut off with 503 'the server is shutting "
                "down'", why, cut,
            )  # fmt: skip

    def _start_deadline(self) -> None:
        assert self._loop is not None
        why = f"shutdown timeout ({self.shutdown_timeout:g} s) reached"
        self._deadline = self._loop.call_later(self.shutdown_timeout, lambda: self.cut(why))

    def _call_soon(self, callback: Callable[[], None]) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(callback)


def serve_app(
    config: uvicorn.Config, engine: EngineClient, sock: socket.socket, shutdown_timeout: float
) -> int:
    """Serve on `sock` until a signal or the engine's death; returns the exit status."""
    from tokenmill.kernels import warm_up

    warm_up(_device_type(engine))  # usually loaded with the model already: then a no-op
    server = GracefulServer(config, engine, shutdown_timeout)
    engine.on_death = server.stop
    server.run(sockets=[sock])
    if engine.died:
        logger.error("exiting with status %d: the engine loop died", EXIT_ENGINE_DIED)
        return EXIT_ENGINE_DIED
    if server.num_cut:
        logger.error(
            "exiting with status %d: the drain was cut short (%d request(s) cut off)",
            EXIT_DRAIN_CUT, server.num_cut,
        )  # fmt: skip
        return EXIT_DRAIN_CUT
    return EXIT_DRAINED


def _device_type(engine: EngineClient) -> str:
    """The device type the engine's model runs on ("cpu", "cuda")."""
    core = getattr(getattr(engine, "engine", None), "core", None)  # AsyncEngine's LLMEngine
    device_type = getattr(getattr(getattr(core, "info", None), "device", None), "type", None)
    if isinstance(device_type, str):
        return device_type
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
