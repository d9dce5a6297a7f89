"""The chat-template sandbox: templates render in Jinja's immutable sandbox, in a child process.

Templates are untrusted code: a request may carry one and a downloaded model ships one. They
run in Jinja's ImmutableSandboxedEnvironment (no Python internals, no mutation) inside a child
process with a memory cap, which is killed when a render overruns its time budget. A thread
cannot be stopped, and a template can spend unbounded time or memory inside a single C call
(`'x' * 10**9`, str() of a list holding one long list 100000 times) where no in-process hook would
run; a process is stopped from outside whatever it is doing.

The parent sends a job (template, variables, budget) and reads back JSON only: a compromised
renderer can return wrong text, never objects for the server to unpickle.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from tokenmill.errors import InvalidRequestError

logger = logging.getLogger(__name__)

MAX_RENDER_SECONDS = 2.0  # real templates render in milliseconds
MAX_RENDER_CHARS = 8 * 1024 * 1024  # twice the server's default cap on a request's message text
MAX_RENDER_MEMORY_MIB = 1024  # the renderer process's address space (it starts at ~30 MiB)
_STARTUP_SECONDS = 60.0  # the renderer imports Jinja; generous for a loaded machine
_FRAME_HEADER = struct.Struct("!Q")  # each message between the processes: length, then bytes


@dataclass(frozen=True, slots=True)
class RenderBudget:
    """What one render may use; a template over any of these is stopped with a 400."""

    max_seconds: float = MAX_RENDER_SECONDS  # wall time of the render (renderer start excluded)
    max_chars: int = MAX_RENDER_CHARS  # characters of rendered text
    max_memory_mib: int = MAX_RENDER_MEMORY_MIB  # address space of the renderer process


def render_sandboxed(template: str, variables: dict[str, Any], budget: RenderBudget) -> str:
    """Render in the renderer process within `budget`; any template failure is a 400."""
    return _renderer.render(template, variables, budget)


def start_renderer() -> None:
    """Start the renderer now (server start-up), not on the first chat request."""
    _renderer.start()


# ---------------------------------------------------------------------------------------
# The parent side: one renderer process, started on first use, replaced when it is killed
# ---------------------------------------------------------------------------------------


class _Renderer:
    """Sends render jobs to a child process and waits for each up to its time budget."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one job at a time; callers may be on any thread
        self._process: subprocess.Popen[bytes] | None = None

    def render(self, template: str, variables: dict[str, Any], budget: RenderBudget) -> str:
        try:
            job = pickle.dumps((template, variables, budget))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise InvalidRequestError(
                f"chat template variables must be plain data: {exc}", param="messages"
            ) from exc
        with self._lock:
            reply = self._exchange(job, budget)
        if "error" in reply:
            raise InvalidRequestError(str(reply["error"]), param=reply.get("param"))
        return str(reply["text"])

    def _exchange(self, job: bytes, budget: RenderBudget) -> dict[str, Any]:
        """One job's reply; a render over time is killed (with its process) and is a 400."""
        process = self._started()
        assert process.stdin is not None and process.stdout is not None
        try:
            _write_frame(process.stdin, job)
            return dict(json.loads(_read_frame(process.stdout, budget.max_seconds)))
        except TimeoutError:
            self.stop()
            raise InvalidRequestError(
                f"chat template error: rendering took over {budget.max_seconds:g} s (the limit); "
                "the template may loop forever",
                param="chat_template",
            ) from None
        except (OSError, EOFError, ValueError) as exc:  # it died: a crash, or killed from outside
            self.stop()
            raise InvalidRequestError(
                f"chat template error: the renderer failed ({type(exc).__name__}); the template "
                "may have exhausted its resources",
                param="chat_template",
            ) from exc

    def start(self) -> None:
        with self._lock:
            self._started()

    def forget(self) -> None:
        """In a forked child: the renderer is the parent's; this process starts its own."""
        self._lock = threading.Lock()
        self._process = None

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self.stop()
        self._process = _spawn_renderer()
        return self._process

    def stop(self) -> None:
        """End the renderer process (the next render starts a new one)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):  # a pipe to a dead process may not flush
                process.stdin.close()
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _spawn_renderer() -> subprocess.Popen[bytes]:
    """Start a renderer and wait for it to be ready (its start does not count against a job)."""
    root = str(Path(__file__).resolve().parents[2])  # tokenmill importable as in this process
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    code = "from tokenmill.tokenizer.template_sandbox import serve_renders; serve_renders()"
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_renderer_environment(path),
    )
    assert process.stdout is not None
    try:
        _read_frame(process.stdout, _STARTUP_SECONDS)
    except (TimeoutError, OSError, EOFError) as exc:
        process.kill()
        process.wait()
        raise RuntimeError(f"the chat template renderer did not start: {exc!r}") from exc
    logger.debug("chat template renderer started (pid %d)", process.pid)
    return process


def _renderer_environment(python_path: str) -> dict[str, str]:
    """Only what Python and strftime_now need: no API keys or tokens from the server's."""
    keep = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SYSTEMROOT", "TMPDIR")
    return {name: os.environ[name] for name in keep if name in os.environ} | {
        "PYTHONPATH": python_path
    }


_renderer = _Renderer()
atexit.register(_renderer.stop)
os.register_at_fork(after_in_child=_renderer.forget)


# ---------------------------------------------------------------------------------------
# The child side: render jobs in the sandbox until the parent closes the pipe
# ---------------------------------------------------------------------------------------


def serve_renders() -> None:
    """The renderer process's loop: read a job, render it, reply; exit when stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which stops us
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, not into the replies
    _write_frame(replies, b"ready")
    while True:
        try:
            job = _read_frame(sys.stdin.buffer, None)
        except EOFError:
            return
        _write_frame(replies, json.dumps(_reply(*pickle.loads(job))).encode())


def _reply(template: str, variables: dict[str, Any], budget: RenderBudget) -> dict[str, Any]:
    """One job's reply: {"text": ...}, or {"error": ..., "param": ...} for a 400."""
    _limit_resources(budget)
    try:
        return {"text": render_in_sandbox(template, variables, budget.max_chars)}
    except InvalidRequestError as exc:
        return {"error": exc.message, "param": exc.param}
    except MemoryError:
        message = f"rendering needed over {budget.max_memory_mib} MiB of memory (the limit)"
        return {"error": f"chat template error: {message}", "param": "chat_template"}


def _limit_resources(budget: RenderBudget) -> None:
    """Cap this process's memory for the job, and its CPU time so that it ends itself should the
    server die mid-render (the server kills it on time first). Soft limits: they may go back up."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = int(used.ru_utime + used.ru_stime + budget.max_seconds) + 2
    for kind, soft in (
        (resource.RLIMIT_AS, budget.max_memory_mib * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu_seconds),
    ):
        hard = resource.getrlimit(kind)[1]
        try:
            resource.setrlimit(
                kind, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard)
            )
        except (ValueError, OSError):  # not on this platform: the server's deadline still holds
            logger.debug("cannot set resource limit %d", kind, exc_info=True)


def render_in_sandbox(template: str, variables: dict[str, Any], max_chars: int) -> str:
    """Compile (cached) and render in this process; any failure is a 400 naming the reason."""
    try:
        return _collect(compile_template(template).generate(**variables), max_chars)
    except (InvalidRequestError, MemoryError):
        raise
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"chat template error: {exc}", param="chat_template") from exc
    except Exception as exc:  # the template is untrusted code: whatever it raises is its fault
        raise InvalidRequestError(
            f"chat template error: {type(exc).__name__}: {exc}", param="chat_template"
        ) from exc


def _collect(pieces: Iterator[str], max_chars: int) -> str:
    """The output, stopping a template as soon as it writes more than max_chars."""
    size, parts = 0, list[str]()
    for piece in pieces:
        parts.append(piece)
        size += len(piece)
        if size > max_chars:
            raise InvalidRequestError(
                f"chat template error: output over {max_chars} characters (the limit)",
                param="chat_template",
            )
    return "".join(parts)


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per distinct template text (the model's, the server's, recent per-request)."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(
            f"chat template syntax error: {exc}", param="chat_template"
        ) from exc


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing at once on an unsafe attribute instead of rendering
    it as an empty undefined: a template probing Python internals is an error, not a no-op."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; HF's does not, and templates expect HF's.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# ---------------------------------------------------------------------------------------
# Framing between the processes
# ---------------------------------------------------------------------------------------


def _write_frame(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_FRAME_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read_frame(stream: IO[bytes], timeout: float | None) -> bytes:
    """One message; TimeoutError if its header has not come within timeout seconds (the body
    follows at once: the sender writes header and body together)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    (size,) = _FRAME_HEADER.unpack(_read_exact(stream.fileno(), _FRAME_HEADER.size, deadline))
    return _read_exact(stream.fileno(), size, None)


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, remaining = list[bytes](), size
    while remaining:
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0 or not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError("the other process closed the pipe")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
