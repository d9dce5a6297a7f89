"""--data-parallel-size 2: two engine processes behind one server, driven by the official
client. Requests spread over both (the per-engine /metrics show it), a long shared prefix
stays on one engine (its prefix cache serves it), outputs equal one engine's, and an engine
that dies stops the server with a non-zero exit and no process left behind."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import Server, metric

MODEL = "smol"
DOCUMENT = " ".join(f"Clause {i}: the tenant keeps the garden tidy and pays on time." for i in
                    range(24))  # fmt: skip


def engine_processes(pid: int) -> list[int]:
    """The server's engine processes (not its template renderer)."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout  # fmt: skip
    return [int(line.split()[0]) for line in out.splitlines() if "engine_process" in line]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    return bool(status) and not status.startswith("Z")


def routed(server: Server, engine: str) -> float:
    return metric(server, "tokenmill:engine_requests_routed_total", engine=engine)


@pytest.fixture(scope="module")
def dp_server(start_server) -> Server:
    return start_server("dp", "--data-parallel-size", "2", "--served-model-name", MODEL)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_requests_spread_over_both_engines_and_equal_one_engine(
    dp_server: Server, server: Server
) -> None:
    """`server` is the suite's one-engine server of the same model and flags."""
    assert len(engine_processes(dp_server.process.pid)) == 2
    assert "data parallel: 2 engines" in dp_server.log_text()
    before = [routed(dp_server, e) for e in "01"]
    prompts = [f"Write one sentence about the number {i}." for i in range(6)]

    def complete(target: Server, prompt: str) -> str:
        response = client(target).completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0
        )
        return response.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: complete(dp_server, p), prompts))
    assert together == [complete(server, p) for p in prompts]
    after = [routed(dp_server, e) for e in "01"]
    spread = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(spread) == 6 and min(spread) >= 2, spread
    assert metric(dp_server, "vllm:num_requests_running") == 0
    text = httpx.get(f"{dp_server.url}/metrics", timeout=10).text
    assert 'vllm:kv_cache_usage_perc{engine="1"' in text
    for engine in "01":  # each engine's own steps and cache
        steps = metric(dp_server, "vllm:iteration_tokens_total_count", engine=engine)
        # >= 2 requests went there (spread above): at least their prefill step, each step
        # at least a token (a completion may end at EOS before its 16 tokens)
        assert steps >= 1, (engine, steps)
        tokens = metric(dp_server, "vllm:iteration_tokens_total_sum", engine=engine)
        assert tokens >= steps, (engine, tokens, steps)
        assert metric(dp_server, "vllm:cache_config_info", engine=engine) == 1


def test_streaming_chat_and_embeddings(dp_server: Server, server: Server) -> None:
    messages = [{"role": "user", "content": "Name a color."}]
    stream = client(dp_server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    whole = client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    assert streamed == whole.choices[0].message.content
    vectors = client(dp_server).embeddings.create(model=MODEL, input=["a cat", "a dog"])
    reference = client(server).embeddings.create(model=MODEL, input=["a cat", "a dog"])
    for got, want in zip(vectors.data, reference.data, strict=True):
        assert got.embedding == pytest.approx(want.embedding, abs=1e-5)


def test_a_long_shared_prefix_stays_on_one_engine(dp_server: Server) -> None:
    """Four questions about one document: all on the engine that cached it, each after
    the first reading the document from its prefix cache."""
    before = [routed(dp_server, e) for e in "01"]
    hits = metric(dp_server, "vllm:prefix_cache_hits_total")
    for question in ("Who keeps the garden?", "When is rent paid?", "How many clauses?",
                     "Summarise clause 3."):  # fmt: skip
        client(dp_server).completions.create(
            model=MODEL, prompt=f"{DOCUMENT}\n\nQuestion: {question}\nAnswer:", max_tokens=4,
            temperature=0,
        )  # fmt: skip
    spread = sorted(routed(dp_server, e) - b for e, b in zip("01", before, strict=True))
    assert spread == [0, 4]
    document_tokens = len(client(dp_server).completions.create(
        model=MODEL, prompt=DOCUMENT, max_tokens=1, echo=True, logprobs=0,
    ).choices[0].logprobs.tokens)  # fmt: skip
    assert metric(dp_server, "vllm:prefix_cache_hits_total") - hits >= 3 * (document_tokens - 16)


def test_bad_requests_are_400s_from_the_front(dp_server: Server) -> None:
    response = httpx.post(
        f"{dp_server.url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 100000},
        timeout=30,
    )
    assert response.status_code == 400
    response = httpx.post(
        f"{dp_server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
              "response_format": {"type": "json_schema", "json_schema": {
                  "name": "x", "schema": {"type": "nonsense"}}}},
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 400, response.text
    assert httpx.get(f"{dp_server.url}/health", timeout=5).status_code == 200


def test_an_engine_that_dies_stops_the_server(start_server) -> None:
    victim = start_server("dp-dies", "--data-parallel-size", "2", "--served-model-name", MODEL)
    engines = engine_processes(victim.process.pid)
    assert len(engines) == 2
    failures: list[BaseException] = []

    def stream() -> None:
        try:
            chunks = client(victim).completions.create(
                model=MODEL, prompt="Tell me a long story.", max_tokens=400, temperature=0,
                stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            for _ in chunks:
                pass
        except Exception as e:  # noqa: BLE001 - what the client sees
            failures.append(e)

    streams = [threading.Thread(target=stream) for _ in range(2)]
    for t in streams:
        t.start()
    deadline = time.monotonic() + 60
    while metric(victim, "vllm:num_requests_running") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(engines[0], signal.SIGKILL)
    code = victim.process.wait(timeout=60)
    for t in streams:
        t.join(timeout=30)
    assert code != 0
    assert failures, "the streams ended as if nothing happened"
    assert "data-parallel engine" in victim.log_text()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in engines) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in engines)


def test_a_client_that_leaves_aborts_its_request_on_its_engine(dp_server: Server) -> None:
    with httpx.stream(
        "POST", f"{dp_server.url}/v1/completions", timeout=60,
        json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "stream": True,
              "ignore_eos": True},
    ) as response:  # fmt: skip
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 30
    while metric(dp_server, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(dp_server, "vllm:num_requests_running") == 0
    assert metric(dp_server, "vllm:kv_cache_usage_perc") == 0
