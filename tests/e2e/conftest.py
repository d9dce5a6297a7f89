"""Real `tokenmill serve` processes (bundled model) for the end-to-end tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

API_KEY = "sk-e2e-secret"
SERVED_NAMES = ["smol", "smol-alias"]
MAX_MODEL_LEN = 512
STATS_INTERVAL_S = 0.5  # the open server's stats line (VLLM_LOG_STATS_INTERVAL)
# The auth server gets --chat-template; tests recognise its output by this marker.
SERVER_TEMPLATE = (
    "{% for m in messages %}[SERVER-TEMPLATE {{ m['role'] }}]{{ m['content'] }}{% endfor %}"
)
_STARTUP_TIMEOUT_S = 180


@dataclass
class Server:
    """A running server: its base URL, key, process and log file."""

    url: str
    api_key: str | None
    process: subprocess.Popen[bytes]
    log: Path
    served_names: list[str] | None = None  # None = the model's own name
    max_model_len: int = MAX_MODEL_LEN

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of the samples of `name` on /metrics whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    if not found:
        raise AssertionError(f"{name} not in /metrics")
    return sum(found)


_random = random.SystemRandom()  # (not the random module's: a test plugin may reseed it)


def free_port() -> int:
    """A port nothing listens on, below Linux's ephemeral range (32768 up): the ports the
    kernel hands out to binds of port 0 and outgoing connections (torchrun's store, gloo's
    links) never take it between this check and the server's own bind."""
    for _ in range(200):
        port = _random.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenmill.server.cli", "serve", *args]


def _launch(
    tmp: Path,
    name: str,
    args: list[str],
    api_key: str | None,
    served_names: list[str] | None,
    env_extra: dict[str, str] | None = None,
) -> Server:
    port = free_port()
    log = tmp / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_API_KEY"} | (env_extra or {})
    command = serve_command("--host", "127.0.0.1", "--port", str(port), *args)
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server(f"http://127.0.0.1:{port}", api_key, process, log, served_names)


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"server not healthy after {_STARTUP_TIMEOUT_S} s:\n{server.log_text()}")


def _stop(server: Server) -> None:
    """SIGINT, as Ctrl-C: a graceful shutdown that must exit 0."""
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGINT)
    try:
        code = server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        pytest.fail(f"server did not stop on SIGINT:\n{server.log_text()[-3000:]}")
    if code != 0:
        pytest.fail(f"server exited with {code} on SIGINT:\n{server.log_text()[-3000:]}")


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Both servers, loaded in parallel: 'open' (no key, aliases) and 'auth' (key, template)."""
    tmp = tmp_path_factory.mktemp("servers")
    template = tmp / "template.jinja"
    template.write_text(SERVER_TEMPLATE)
    common = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "256MiB"]
    started = {
        "open": _launch(
            tmp,
            "open",
            [*common, "--served-model-name", *SERVED_NAMES],
            None,
            SERVED_NAMES,
            {"VLLM_LOG_STATS_INTERVAL": str(STATS_INTERVAL_S)},
        ),  # fmt: skip
        "auth": _launch(
            tmp,
            "auth",
            [*common, "--api-key", API_KEY, "--chat-template", str(template)],
            API_KEY,
            None,
        ),  # fmt: skip
    }
    try:
        for server in started.values():
            _wait_healthy(server)
        yield started
    finally:
        for server in started.values():
            _stop(server)


@pytest.fixture(scope="session")
def server(servers: dict[str, Server]) -> Server:
    return servers["open"]


@pytest.fixture(scope="session")
def auth_server(servers: dict[str, Server]) -> Server:
    return servers["auth"]


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start extra servers (bundled model) with given flags; all are stopped after the
    module. Call with a name and flags; several may be started before waiting on any."""
    tmp = tmp_path_factory.mktemp("extra-servers")
    started: list[Server] = []

    def start(name: str, *args: str, api_key: str | None = None, wait: bool = True) -> Server:
        common = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "256MiB"]
        key_args = ["--api-key", api_key] if api_key else []
        server = _launch(tmp, name, [*common, *key_args, *args], api_key, None)
        started.append(server)
        if wait:
            _wait_healthy(server)
        return server

    start.wait_healthy = _wait_healthy  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for server in started:
            _stop(server)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def launch_cli() -> Any:
    """Run `tokenmill serve ARGS` on a free port (unless ARGS has one) to completion."""

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        port = [] if "--port" in args else ["--port", str(free_port())]
        command = serve_command("--host", "127.0.0.1", *port, *args)
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    return run
