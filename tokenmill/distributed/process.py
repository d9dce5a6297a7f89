"""Child processes that die with their parent: tensor-parallel followers and data-parallel
engines are started as `python -m <module>` with a pickled spec on stdin."""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import pickle
import signal
import socket
import subprocess
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 3  # the parent ended or failed first: nothing of the child's to report
_PARENT = "TOKENMILL_PARENT_PID"


# Linux sends PR_SET_PDEATHSIG when the *thread* that forked the child ends, not the
# process: children are started from this one thread, which lives as long as the process
# (the engine loads on a thread that exits: its children would be killed with it).
_SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenmill-spawner")


def start_child(
    module: str, spec: Any, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m module` with `spec` pickled on its stdin (and `env` added to this
    process's); its stdout is a pipe for the one line a failed child prints (read with
    `failure_line`)."""
    return _SPAWNER.submit(_start_child, module, spec, env).result()


def _start_child(module: str, spec: Any, env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", _PARENT: str(os.getpid()), **(env or {})},
    )
    assert process.stdin is not None
    process.stdin.write(pickle.dumps(spec))
    process.stdin.close()
    return process


def read_spec() -> Any:
    """In the child: the spec its parent wrote; then it dies with the parent (SIGKILL,
    Linux's PR_SET_PDEATHSIG) and leaves Ctrl-C to the parent, which stops it."""
    spec = pickle.loads(sys.stdin.buffer.read())
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if str(os.getppid()) != os.environ.get(_PARENT):  # it died before that took effect
        os._exit(EXIT_PARENT_GONE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return spec


def failure_line(process: subprocess.Popen[bytes]) -> str:
    """The one line a failed child printed (its traceback is in the log), once it ended."""
    if process.stdout is None or process.poll() is None:
        return ""
    try:
        lines = process.stdout.read().decode(errors="replace").strip().splitlines()
    except (OSError, ValueError):
        return ""
    return lines[-1] if lines else ""


def stop_children(processes: list[subprocess.Popen[bytes]], wait_s: float) -> None:
    """Wait up to `wait_s` for the children to leave, then SIGKILL the rest; reaps all."""
    import time

    deadline = time.monotonic() + wait_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
