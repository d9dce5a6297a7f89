"""`tokenmill bench serve` against a fake OpenAI-compatible streaming server (no model)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenmill.bench import offline, serve
from tokenmill.bench.serve import Target, Workload, bench_target, percentile
from tokenmill.server.cli import build_parser

CHUNK_DELAY = 0.002  # seconds between streamed chunks
SLOW_FIRST_CHUNK = 0.1  # the "slow" server's extra wait before its first chunk


class FakeServer:
    """Streams max_tokens one-word chunks. The first path segment picks a behaviour:
    ok, slow (late first token), nousage (no usage chunk), fail (500), flaky (every other
    request 500), midstream (an error chunk after two tokens)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.busy_seen: list[int] = []  # busy loops of this process alive at each request
        self.counter = itertools.count()
        self.app = Starlette(
            routes=[
                Route("/{mode}/v1/models", self.models),
                Route("/{mode}/v1/chat/completions", self.generate, methods=["POST"]),
                Route("/{mode}/v1/completions", self.generate, methods=["POST"]),
            ]
        )

    async def models(self, request: Request) -> Response:
        mode = request.path_params["mode"]
        return JSONResponse({"data": [{"id": f"fake-{mode}", "owned_by": f"fake-{mode}"}]})

    async def generate(self, request: Request) -> Response:
        mode, body = request.path_params["mode"], await request.json()
        self.bodies.append(body)
        self.busy_seen.append(len(_busy_children()))
        if mode == "fail" or (mode == "flaky" and next(self.counter) % 2):
            error = {"message": "the fake server is down", "type": "InternalServerError"}
            return JSONResponse({"error": error}, status_code=500)
        events = self.stream(mode, body, is_chat=request.url.path.endswith("chat/completions"))
        return StreamingResponse(events, media_type="text/event-stream")

    async def stream(self, mode: str, body: dict[str, Any], is_chat: bool) -> AsyncIterator[str]:
        if mode == "slow":
            await asyncio.sleep(SLOW_FIRST_CHUNK)
        for i in range(body["max_tokens"]):
            if mode == "midstream" and i == 2:
                yield _event({"error": {"message": "engine died", "code": 500}})
                break
            choice = {"index": 0, "delta": {"content": f" w{i}"}} if is_chat else {"text": f" w{i}"}
            yield _event({"choices": [choice]})
            await asyncio.sleep(CHUNK_DELAY)
        if mode != "nousage":
            usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}
            yield _event({"choices": [], "usage": usage})
        yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _busy_children() -> list[psutil.Process]:
    """This process's running busy-loop children (a killed one may linger as a zombie)."""
    found = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "while True" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeServer, str]]:
    """The fake server on a free port in a background thread, and its root URL."""
    fake = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(fake.app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=functools.partial(server.run, sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the fake server did not start"
    yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def _bench(url: str, levels: list[tuple[int, int]], **workload: Any) -> list[serve.LevelReport]:
    work = Workload(**{"output_tokens": 6, **workload})
    return asyncio.run(bench_target(Target(url), work, levels, warmup=0))


def test_counts_latencies_and_percentiles(fake: tuple[FakeServer, str]) -> None:
    server, root = fake
    target = Target(f"{root}/ok/v1")
    reports = asyncio.run(bench_target(target, Workload(output_tokens=6), [(1, 3), (4, 8)]))
    assert (target.model, target.name) == ("fake-ok", "fake-ok")  # from GET /models
    assert [(r.concurrency, r.num_requests, r.num_errors) for r in reports] == [
        (1, 3, 0),
        (4, 8, 0),
    ]
    for r in reports:
        assert r.mean_output_tokens == 6 and r.mean_prompt_tokens == 7  # from usage
        assert r.output_throughput == pytest.approx(r.num_requests * 6 / r.duration_s, rel=0.01)
        assert r.request_throughput == pytest.approx(r.num_requests / r.duration_s, rel=0.01)
        _assert_ordered(r.ttft_ms_p50, r.ttft_ms_p90, r.ttft_ms_p99)
        _assert_ordered(r.itl_ms_p50, r.itl_ms_p90, r.itl_ms_p99)
        _assert_ordered(r.e2e_ms_p50, r.e2e_ms_p90)
        _assert_ordered(CHUNK_DELAY * 1000 * 0.9, r.itl_ms_p50)
        _assert_ordered(r.ttft_ms_p99, r.e2e_ms_p90)


def _assert_ordered(*values: float | None) -> None:
    assert all(v is not None for v in values), values
    assert list(values) == sorted(values), values  # type: ignore[type-var]


def test_each_request_ttft_within_e2e_and_itl_per_chunk(fake: tuple[FakeServer, str]) -> None:
    _, root = fake

    async def one(mode: str) -> serve.RequestResult:
        import httpx

        body = serve.request_body(Workload(output_tokens=5), "m", "hello")
        async with httpx.AsyncClient() as client:
            return await serve.send_request(client, f"{root}/{mode}/v1/chat/completions", body)

    for mode in ("ok", "nousage"):
        result = asyncio.run(one(mode))
        assert result.error is None
        assert 0 < result.ttft <= result.e2e
        assert len(result.itls) == 4 and all(gap > 0 for gap in result.itls)
        assert result.num_output_tokens == 5  # usage, or the number of chunks without it
        assert result.usage_completion_tokens == (5 if mode == "ok" else None)


def test_request_body_asks_for_exact_lengths_and_distinct_prompts(
    fake: tuple[FakeServer, str],
) -> None:
    server, root = fake
    server.bodies.clear()
    _bench(f"{root}/ok/v1", [(2, 8)], prompt_tokens=20, output_tokens=4)
    assert len(server.bodies) == 8
    for body in server.bodies:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == body["min_tokens"] == 4 and body["ignore_eos"] is True
        assert body["temperature"] == 0.0 and body["model"] == "fake-ok"
    prompts = [body["messages"][0]["content"].split() for body in server.bodies]
    assert all(len(p) == 20 for p in prompts)
    assert len({tuple(p[:4]) for p in prompts}) == 8  # no two share a 4-word prefix

    server.bodies.clear()
    _bench(f"{root}/ok/v1", [(2, 4)], prompt_tokens=20, shared_prefix_tokens=12)
    prompts = [body["messages"][0]["content"].split() for body in server.bodies]
    assert len({tuple(p[:12]) for p in prompts}) == 1
    assert len({tuple(p[12:]) for p in prompts}) == 4


def test_prompt_seed_changes_every_prompt(fake: tuple[FakeServer, str]) -> None:
    server, root = fake
    runs = []
    for seed in ("", "", "second-run"):
        server.bodies.clear()
        _bench(f"{root}/ok/v1", [(2, 4)], prompt_seed=seed)
        runs.append([tuple(b["messages"][0]["content"].split()[:4]) for b in server.bodies])
    assert sorted(runs[0]) == sorted(runs[1])  # the same prompts run after run by default
    assert not set(runs[0]) & set(runs[2])


def test_busy_processes_spin_in_sessions_of_their_own_and_are_gone_after() -> None:
    with serve.busy_processes(2) as processes:
        pids = [p.pid for p in processes]
        for pid in pids:
            os.kill(pid, 0)  # alive
            assert os.getsid(pid) == pid != os.getsid(0)  # each leads a new session
            deadline = time.monotonic() + 10
            while psutil.Process(pid).cpu_times().user < 0.1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert psutil.Process(pid).cpu_times().user >= 0.1  # spinning
        assert sorted(p.pid for p in _busy_children()) == sorted(pids)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
    assert not _busy_children()

    with pytest.raises(KeyboardInterrupt), serve.busy_processes(1) as processes:
        raise KeyboardInterrupt
    assert processes[0].poll() is not None and not _busy_children()


def test_busy_processes_die_with_a_killed_benchmark() -> None:
    code = (
        "import sys, time\n"
        "from tokenmill.bench import serve\n"
        "with serve.busy_processes(1) as ps:\n"
        "    print(ps[0].pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    bench = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert bench.stdout is not None
        busy = int(bench.stdout.readline())
        assert not _gone(busy)
        bench.send_signal(signal.SIGKILL)  # no `finally` runs: PR_SET_PDEATHSIG must end it
        bench.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(busy) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(busy)
    finally:
        bench.kill()
        bench.wait()


def test_background_load_runs_during_the_measured_requests_only(
    fake: tuple[FakeServer, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, root = fake
    server.busy_seen.clear()
    path = tmp_path / "bench.json"
    code = serve.main(
        ["--base-url", f"{root}/ok/v1", "--num-requests", "3", "--output-tokens", "3",
         "--warmup", "1", "--background-load", "2", "--json", str(path)]
    )  # fmt: skip
    assert code == 0
    assert server.busy_seen == [0, 2, 2, 2]  # none during the warm-up
    assert not _busy_children()
    assert "background load: 2 busy processes" in capsys.readouterr().out
    assert json.loads(path.read_text())["background_load"] == 2


def test_completions_endpoint(fake: tuple[FakeServer, str]) -> None:
    server, root = fake
    server.bodies.clear()
    (report,) = _bench(f"{root}/ok/v1", [(2, 4)], endpoint="completions")
    assert report.num_errors == 0 and report.mean_output_tokens == 6
    assert all("prompt" in body and "messages" not in body for body in server.bodies)


def test_http_500_counted_and_reported(fake: tuple[FakeServer, str]) -> None:
    _, root = fake
    (failed,) = _bench(f"{root}/fail/v1", [(2, 4)])
    assert failed.num_errors == 4 and failed.request_throughput == 0
    assert failed.first_error == "HTTP 500: the fake server is down"
    assert failed.ttft_ms_p50 is None and failed.mean_output_tokens is None

    (flaky,) = _bench(f"{root}/flaky/v1", [(1, 6)])
    assert (flaky.num_requests, flaky.num_errors) == (6, 3)
    assert flaky.mean_output_tokens == 6 and flaky.ttft_ms_p50 is not None

    (midstream,) = _bench(f"{root}/midstream/v1", [(2, 2)])
    assert midstream.num_errors == 2 and midstream.first_error == "engine died"


def test_cli_reports_errors_and_fails_fast(
    fake: tuple[FakeServer, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, root = fake
    argv = ["--base-url", f"{root}/fail/v1", "--num-requests", "2", "--output-tokens", "3"]
    assert serve.main([*argv, "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "concurrency 1: 2 of 2 requests failed; first error: HTTP 500" in out
    assert serve.main([*argv, "--warmup", "1"]) == 1  # warm-up all failed: nothing to measure
    assert "every warm-up request" in capsys.readouterr().err


def test_compare_prints_and_writes_ratios(
    fake: tuple[FakeServer, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, root = fake
    path = tmp_path / "bench.json"
    code = serve.main(
        ["--base-url", f"{root}/ok/v1", "--compare-base-url", f"{root}/slow/v1",
         "--compare-name", "slowpoke", "--concurrency", "1", "2", "--num-requests", "2",
         "--output-tokens", "4", "--warmup", "1", "--json", str(path),
         "--plot", str(tmp_path / "chart.png")]
    )  # fmt: skip
    assert code == 0
    assert (
        (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")
    )  # tests/unit/test_bench_plot.py
    out = capsys.readouterr().out
    assert "fake-ok: " in out and "slowpoke: " in out and "ratio fake-ok/slowpoke" in out
    result = json.loads(path.read_text())
    assert [run["name"] for run in result["runs"]] == ["fake-ok", "slowpoke"]
    assert [row["concurrency"] for row in result["ratios"]] == [1, 2]
    ours_levels, theirs_levels = (run["levels"] for run in result["runs"])
    for row, ours, theirs in zip(result["ratios"], ours_levels, theirs_levels, strict=True):
        assert row["ttft_ms_p50"] == round(ours["ttft_ms_p50"] / theirs["ttft_ms_p50"], 3)
        assert row["ttft_ms_p50"] < 1  # the slow server waits 100 ms before its first token
        assert row["output_throughput"] > 0


def test_percentile_interpolates_like_numpy() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50.5 and percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 90) == 3.0 and percentile([], 50) is None
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4


def test_bench_subcommands_registered() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["bench", "serve", "--base-url", "http://h:1/v1", "--concurrency", "1", "8"]
    )
    assert args.run is serve.run_command and args.concurrency == [1, 8]
    assert args.num_requests is None and args.endpoint == "chat" and args.output_tokens == 128
    args = parser.parse_args(["bench", "offline", "--num-prompts", "4"])
    assert args.run is offline.run_command and args.num_prompts == 4
    assert serve._api_root("http://h:1/") == "http://h:1/v1"
    assert serve._api_root("http://h:1/v1/") == "http://h:1/v1"
