"""Shutdown drains, end to end: a drain that finishes keeps its speed and exits 0; one cut
short by --shutdown-timeout or a second signal ends each request with an OpenAI error (a 503
body, or an error event then [DONE]), frees its KV blocks and exits 3."""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import Server

EXIT_DRAIN_CUT = 3
SHUTDOWN_MESSAGE = "the server is shutting down"
# long enough to outlast any grace period below on a fast machine (seconds of CPU work)
LONG = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}


@pytest.fixture(scope="module")
def drain_servers(start_server: Any) -> dict[str, Server]:
    """Started together (they load in parallel), each stopped by its own test."""
    servers = {
        "timeout": start_server("drain-timeout", "--shutdown-timeout", "1", wait=False),
        "second-signal": start_server("drain-second", "--shutdown-timeout", "120", wait=False),
        "finishes": start_server("drain-finishes", wait=False),
    }
    for server in servers.values():
        start_server.wait_healthy(server)
    return servers


def _running(server: Server) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.split()[-1])
    raise AssertionError("vllm:num_requests_running not in /metrics")


def _wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


class StreamReader(threading.Thread):
    """Reads one streaming completion, noting when each `data:` line arrived."""

    def __init__(self, server: Server, body: dict[str, Any]):
        super().__init__(daemon=True)
        self.server, self.body = server, {**body, "stream": True}
        self.events: list[tuple[float, str]] = []
        self.status: int | None = None

    def run(self) -> None:
        url = f"{self.server.url}/v1/completions"
        with httpx.stream("POST", url, json=self.body, timeout=180) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append((time.monotonic(), line[6:]))

    def chunks(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, json.loads(d)) for t, d in self.events if d.startswith('{"id"')]

    def wait_chunks(self, count: int) -> None:
        _wait_for(lambda: len(self.events) >= count)


def _assert_cut_stream(reader: StreamReader) -> None:
    assert reader.status == 200
    data = [d for _, d in reader.events]
    assert data[-1] == "[DONE]", data[-3:]
    error = json.loads(data[-2])["error"]
    assert error["message"] == SHUTDOWN_MESSAGE and error["code"] == 503, error
    assert len(reader.chunks()) < LONG["max_tokens"]  # it was cut, not finished


def _assert_exit_after_cut(server: Server, cut: int) -> None:
    assert server.process.wait(timeout=60) == EXIT_DRAIN_CUT, server.log_text()[-3000:]
    log = server.log_text()
    assert f"{cut} request(s) still running cut off" in log, log[-3000:]
    # the aborts of the cut requests ran before the engine stopped: no blocks left behind
    assert "engine stopped: 0 requests unfinished, KV cache 0% in use" in log, log[-3000:]


def test_grace_period_over_ends_requests_with_503_and_exit_3(
    drain_servers: dict[str, Server],
) -> None:
    server = drain_servers["timeout"]
    stream = StreamReader(server, LONG)
    stream.start()
    result: dict[str, Any] = {}

    def non_streaming() -> None:
        response = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=180)
        result["status"], result["body"] = response.status_code, response.json()

    plain = threading.Thread(target=non_streaming, daemon=True)
    plain.start()
    stream.wait_chunks(3)
    _wait_for(lambda: _running(server) == 2)
    server.process.send_signal(signal.SIGTERM)
    plain.join(timeout=60)
    stream.join(timeout=60)
    assert result["status"] == 503, result
    assert result["body"]["error"]["message"] == SHUTDOWN_MESSAGE, result
    _assert_cut_stream(stream)
    _assert_exit_after_cut(server, cut=2)


def test_second_signal_cuts_the_grace_period_short(drain_servers: dict[str, Server]) -> None:
    server = drain_servers["second-signal"]
    stream = StreamReader(server, LONG)
    stream.start()
    stream.wait_chunks(3)
    server.process.send_signal(signal.SIGINT)
    seen = len(stream.events)
    stream.wait_chunks(seen + 5)  # the first signal lets it go on
    assert stream.is_alive() and server.process.poll() is None
    server.process.send_signal(signal.SIGINT)
    stream.join(timeout=30)  # far sooner than the 120 s grace period
    assert not stream.is_alive()
    _assert_cut_stream(stream)
    _assert_exit_after_cut(server, cut=1)


def test_a_drain_that_finishes_keeps_its_speed_and_exits_0(
    drain_servers: dict[str, Server],
) -> None:
    server = drain_servers["finishes"]
    tokens = 240
    stream = StreamReader(server, {**LONG, "max_tokens": tokens})
    stream.start()
    stream.wait_chunks(tokens // 3)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    stream.join(timeout=120)
    assert server.process.wait(timeout=60) == 0, server.log_text()[-3000:]
    chunks = stream.chunks()
    assert stream.events[-1][1] == "[DONE]"
    assert chunks[-1][1]["choices"][0]["finish_reason"] == "length"
    # its token rate after the signal, against its own before it (medians of the gaps
    # between chunks: one chunk per engine step), not against a wall-clock figure
    times = [t for t, _ in chunks]
    before = [b - a for a, b in zip(times[5:], times[6:], strict=False) if b < signalled]
    after = [b - a for a, b in zip(times, times[1:], strict=False) if a > signalled + 0.2]
    assert len(before) >= 20 and len(after) >= 20, (len(before), len(after))
    assert statistics.median(after) <= 2 * statistics.median(before), (
        statistics.median(before), statistics.median(after),
    )  # fmt: skip
