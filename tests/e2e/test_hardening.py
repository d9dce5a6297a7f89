"""Hardening, end to end: auth-bypass attempts, CORS, body limits, overload, load with
disconnects, engine death and graceful shutdown, against real `tokenmill serve` processes."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tests.e2e.conftest import metric

if TYPE_CHECKING:
    from tests.e2e.conftest import Server

ORIGIN = "https://good.example"
PROMPTS = ["The capital of France is", "List: apple, banana,", "1, 2, 3, 4,", "Once upon a"]


@pytest.fixture(scope="module")
def limited(start_server: Any) -> Server:
    """One running sequence, one waiting place, a 64 KiB body limit, CORS for one origin."""
    return start_server(  # type: ignore[no-any-return]
        "limited",
        "--max-num-seqs", "1", "--max-waiting-requests", "1",
        "--max-request-body-bytes", "64KiB", "--allowed-origins", ORIGIN,
    )  # fmt: skip


def raw_request(server: Server, method: str, path: str, headers: dict[str, str] | None = None):
    """Send the path exactly as written (httpx would normalise `..` and `//`)."""
    netloc = urlsplit(server.url).netloc
    connection = http.client.HTTPConnection(netloc, timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def completion(server: Server, timeout: float = 120, **body: Any) -> httpx.Response:
    body = {"model": body.pop("model", None) or _model(server), **body}
    return httpx.post(
        f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=timeout
    )


def _model(server: Server) -> str:
    return httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"][0]["id"]


# --- Auth cannot be bypassed by path tricks or methods ----------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/"),
        ("GET", "/v1/../v1/models"),
        ("GET", "/v1/./models"),
        ("GET", "//v1/models"),
        ("GET", "/V1/models"),
        ("GET", "/v1/%6dodels"),
        ("GET", "/%76%31/models"),
        ("GET", "/v1/models?api_key=anything"),
        ("HEAD", "/v1/models"),
        ("OPTIONS", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/score"),  # the model's routes outside /v1 need it too
        ("POST", "/v2/%72erank"),
        ("POST", "/pooling/"),
    ],
)
def test_no_path_or_method_trick_reaches_v1_without_the_key(
    auth_server: Server, method: str, path: str
) -> None:
    status, body = raw_request(auth_server, method, path)
    assert status != 200 and status < 500, (status, body)
    assert '"object":"list"' not in body.replace(" ", "")  # no model list leaked
    routed = ("/v1/models", "/v1/%6dodels", "/%76%31/models", "/v1/completions", "/score",
              "/v2/%72erank")  # fmt: skip
    if method in ("GET", "POST") and path in routed:
        assert status == 401  # the routed path needs the key, however it was spelled


def test_wrong_keys_are_rejected(auth_server: Server) -> None:
    key = auth_server.api_key or ""
    for header in (f"Bearer {key}x", f"Bearer {key[:-1]}", f"Basic {key}", key, "Bearer "):
        status, _ = raw_request(auth_server, "GET", "/v1/models", {"Authorization": header})
        assert status == 401, header
    status, _ = raw_request(auth_server, "GET", "/v1/models", auth_server.headers)
    assert status == 200


def test_cors_is_off_by_default(server: Server) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    response = httpx.options(f"{server.url}/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    response = httpx.get(f"{server.url}/v1/models", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_only_the_configured_origin(limited: Server) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    good = httpx.options(f"{limited.url}/v1/completions", headers={**preflight, "Origin": ORIGIN})
    assert good.headers.get("access-control-allow-origin") == ORIGIN
    evil = httpx.options(
        f"{limited.url}/v1/completions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in evil.headers


# --- Request body limit ------------------------------------------------------------------


def test_body_over_the_limit_is_413_then_serving_goes_on(limited: Server) -> None:
    response = completion(limited, prompt="x" * 100_000, max_tokens=1)
    assert response.status_code == 413, response.text
    assert "65536" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit applies while the body streams in
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'"}'

    response = httpx.post(
        f"{limited.url}/v1/completions", content=chunks(), timeout=60,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 413, response.text
    assert completion(limited, prompt=PROMPTS[0], max_tokens=2).status_code == 200


# --- Overload ----------------------------------------------------------------------------


def test_overload_is_503_with_retry_after_and_recovers(limited: Server) -> None:
    long_body = {"prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "stream": True}
    url = f"{limited.url}/v1/completions"
    with httpx.Client(timeout=120) as http, http.stream("POST", url, json=long_body) as running:
        lines = running.iter_lines()  # kept: a dropped iterator would close the stream
        next(line for line in lines if line.startswith("data: {"))
        waiting: dict[str, httpx.Response] = {}
        thread = threading.Thread(
            target=lambda: waiting.setdefault(
                "r", completion(limited, prompt=PROMPTS[0], max_tokens=3)
            )
        )
        thread.start()
        wait_for(lambda: metric(limited, "vllm:num_requests_waiting") >= 1)
        shed = completion(limited, prompt=PROMPTS[2], max_tokens=3)
        assert shed.status_code == 503, shed.text
        assert int(shed.headers["retry-after"]) >= 1
        assert "overloaded" in shed.json()["error"]["message"]
    # the running stream is closed (client gone): the waiting request now runs and completes
    thread.join(timeout=120)
    assert waiting["r"].status_code == 200, waiting["r"].text
    assert completion(limited, prompt=PROMPTS[2], max_tokens=3).status_code == 200


# --- Disconnects and slow readers -----------------------------------------------------------


def test_slow_reader_does_not_stall_the_engine(server: Server) -> None:
    """A stream nobody reads: other requests still complete, then closing it aborts it."""
    body = {"model": _model(server), "prompt": PROMPTS[1], "max_tokens": 400,
            "ignore_eos": True, "stream": True}  # fmt: skip
    url = f"{server.url}/v1/completions"
    with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as stalled:
        lines = stalled.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        for prompt in PROMPTS[:2]:  # meanwhile, the stalled stream is never read
            assert _reference(server, prompt, 8)
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 0)
    wait_for(lambda: metric(server, "vllm:kv_cache_usage_perc") == 0)


@pytest.mark.parametrize("structured", [False, True])
def test_leaving_during_prefill_or_grammar_compile_frees_everything(
    server: Server, structured: bool
) -> None:
    body: dict[str, Any] = {"model": _model(server), "prompt": "word " * 480, "max_tokens": 8}
    if structured:
        schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(40)}}
        body |= {"prompt": PROMPTS[0], "response_format": {"type": "json_schema",
                 "json_schema": {"name": "s", "schema": schema}}}  # fmt: skip
    aborted = metric(server, "vllm:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.2)
    if not structured:  # (a request still compiling never reached the engine)
        wait_for(
            lambda: (
                metric(server, "vllm:request_success_total", finished_reason="abort") >= aborted + 1
            )
        )
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 0)
    wait_for(lambda: metric(server, "vllm:num_requests_waiting") == 0)
    wait_for(lambda: metric(server, "vllm:kv_cache_usage_perc") == 0)
    assert _reference(server, PROMPTS[0], 2)


# --- Load with disconnects ------------------------------------------------------------------


def _reference(server: Server, prompt: str, max_tokens: int) -> str:
    response = completion(server, prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


@pytest.mark.anyio
async def test_200_streaming_clients_some_leaving_leave_nothing_behind(server: Server) -> None:
    """Mixed lengths, a third of the clients leave at a random point; the rest get exactly
    what they get alone, and afterwards no KV block is held and memory is back near where
    it started."""
    rng = random.Random(7)
    lengths = [1, 4, 8, 16]
    references = {(p, n): _reference(server, p, n) for p in PROMPTS for n in lengths}
    process = psutil.Process(server.process.pid)
    rss_before = process.memory_info().rss
    model = _model(server)

    async def client(http: httpx.AsyncClient, i: int) -> tuple[str, int, str, str | None] | None:
        prompt, n = PROMPTS[i % len(PROMPTS)], rng.choice(lengths)
        leave_after = rng.choice([None, None, 0, 1, 3]) if i % 3 == 0 else None
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
        text, finish = "", None
        async with http.stream(
            "POST", "/v1/completions", json={**body, "stream": True}
        ) as response:
            assert response.status_code == 200
            events = 0
            async for line in response.aiter_lines():
                if leave_after is not None and events >= leave_after:
                    return None  # leaving mid-stream (or before the first token)
                if not line.startswith("data: {"):
                    continue
                events += 1
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
        return prompt, n, text, finish

    limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as http:
        results = await asyncio.gather(*(client(http, i) for i in range(200)))
    finished = [r for r in results if r is not None]
    assert len(finished) >= 120
    for prompt, n, text, finish in finished:
        assert finish in ("stop", "length"), (prompt, n, finish)
        assert text == references[(prompt, n)], (prompt, n, text)
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 0)
    wait_for(lambda: metric(server, "vllm:kv_cache_usage_perc") == 0)
    assert metric(server, "vllm:num_requests_waiting") == 0
    rss_after = process.memory_info().rss
    assert rss_after < rss_before * 1.5 + 300 * 2**20, (rss_before, rss_after)


# --- Faults and shutdown --------------------------------------------------------------------

# A server whose engine loop raises once the file named by argv[1] exists.
_DYING_SERVER = """
import os, sys
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.server.cli import main
flag, args = sys.argv[1], sys.argv[2:]
step = LLMEngine.step
def failing_step(self):
    if os.path.exists(flag):
        raise RuntimeError("injected engine-loop fault")
    return step(self)
LLMEngine.step = failing_step
sys.exit(main(["serve", *args]))
"""


def test_engine_loop_death_fails_in_flight_requests_and_exits_nonzero(
    server: Server, tmp_path: Any
) -> None:
    from tests.e2e.conftest import free_port

    flag = tmp_path / "die"
    port = free_port()
    log = (tmp_path / "dying.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", _DYING_SERVER, str(flag), "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "512", "--kv-cache-memory", "64MiB"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url) or process.poll() is not None, timeout=180)
        assert process.poll() is None, (tmp_path / "dying.log").read_text()
        body = {"prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            flag.touch()
            rest = list(lines)
        errors = [json.loads(line[6:]) for line in rest if line.startswith('data: {"error"')]
        assert errors and "engine" in errors[0]["error"]["message"], rest[-5:]
        assert process.wait(timeout=60) == 1
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert "engine loop died" in (tmp_path / "dying.log").read_text()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_finishes_in_flight_requests_then_exits_0(limited: Server) -> None:
    """Last in this module: it stops the `limited` server (one running, one waiting)."""
    server = limited
    model = _model(server)
    results: list[dict[str, Any]] = []
    length = 160  # long enough to see one running and one waiting, even on a loaded machine

    def run(prompt: str) -> None:
        response = completion(
            server, model=model, prompt=prompt, max_tokens=length, ignore_eos=True
        )
        results.append(response.json())

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS[:2]]
    # one at a time: the second, sent while the first still waited, would be over the
    # one waiting place (503)
    threads[0].start()
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 1)
    threads[1].start()
    wait_for(
        lambda: (
            metric(server, "vllm:num_requests_running") == 1
            and metric(server, "vllm:num_requests_waiting") == 1
        )
    )
    children = psutil.Process(server.process.pid).children(recursive=True)
    assert children  # the chat-template sandbox process
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=120)
    assert server.process.wait(timeout=60) == 0, server.log_text()
    assert len(results) == 2
    for result in results:
        assert result["choices"][0]["finish_reason"] == "length", result
        assert result["usage"]["completion_tokens"] == length
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive  # no orphans
