"""Tensor parallelism, end to end: `tokenmill serve --tensor-parallel-size 2` over a tiny
random Llama (4 heads, 2 key/value heads, float32) answers exactly what one process does,
drains and stops its follower on SIGTERM, and dies cleanly (exit 1, no follower left
behind) when a follower is killed mid-request, hangs past TOKENMILL_COLLECTIVE_TIMEOUT or
dies while the server is idle; heads that do not split are a startup error.

Each server here ends in its own way, so each test starts its own (small KV cache, short
generations). Every server's environment carries a marker that its children inherit: after
it exits, no process with that marker may remain (followers, the template sandbox)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.e2e.conftest import Server, free_port, serve_command

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="Linux processes")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
MAX_TOKENS = 16
MARK = "TOKENMILL_E2E_TP_MARK"  # env var inherited by every process a server starts
EXIT_ENGINE_DIED = 1  # tokenmill/server/lifecycle.py
STARTUP_TIMEOUT_S = 180
EXIT_WAIT_S = 60  # far beyond what a server needs to stop (step timeout 3 s, stop wait 10 s)
FOLLOWER_MODULE = "tokenmill.executor.follower"


# --- servers ------------------------------------------------------------------------------


class TPServer(Server):
    marker: str = ""


@pytest.fixture(scope="module")
def tiny_llama(tiny_hf_model_dir: Callable[..., Path]) -> Path:
    return tiny_hf_model_dir("llama")


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., TPServer]]:
    """Start `tokenmill serve ARGS` (with `env` added to its environment); every server is
    killed, with its children, after the module if a test left it running."""
    tmp = tmp_path_factory.mktemp("tp-servers")
    started: list[TPServer] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> TPServer:
        port = free_port()
        log = tmp / f"{name}.log"
        marker = f"{name}-{uuid.uuid4().hex}"
        environ = {k: v for k, v in os.environ.items() if k != "TOKENMILL_API_KEY"}
        environ |= {MARK: marker, **(env or {})}
        command = serve_command(
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
            "--kv-cache-memory", "64MiB", *args,
        )  # fmt: skip
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environ)
        server = TPServer(f"http://127.0.0.1:{port}", None, process, log)
        server.marker = marker
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            for child in _marked(server.marker):
                child.kill()
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_text()}")
        if _health(server) == 200:
            return
        time.sleep(0.25)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log_text()}")


def _tp_server(launch: Callable[..., TPServer], name: str, model: Path, **kw: Any) -> TPServer:
    server = launch(name, str(model), "-tp", "2", "--dtype", "float32", "--device", "cpu", **kw)
    _wait_healthy(server)
    return server


def _health(server: Server) -> int | None:
    """/health's status, None when nothing answers."""
    try:
        return httpx.get(f"{server.url}/health", timeout=5).status_code
    except httpx.HTTPError:
        return None


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def _model(server: Server) -> str:
    return _client(server).models.list().data[0].id


def _extra(choice: Any) -> dict[str, Any]:
    """A choice's fields beyond OpenAI's (return_token_ids: token_ids, prompt_token_ids)."""
    return choice.model_extra or {}


# --- processes ------------------------------------------------------------------------------


def _followers(server: Server) -> list[psutil.Process]:
    """The server's follower processes (its other child is the chat-template sandbox)."""
    children = psutil.Process(server.process.pid).children()
    return [p for p in children if FOLLOWER_MODULE in " ".join(_cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries `marker` (a server's descendants)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARK) == marker:
                found.append(process)
        except psutil.Error:  # gone, a zombie (no environment), or not ours
            continue
    return found


def _assert_no_leftovers(server: TPServer, seen: list[psutil.Process]) -> None:
    """After the server exited: the followers seen while it ran are gone (not even zombies:
    psutil counts a zombie as alive) and nothing else it started lives on."""
    assert server.process.poll() is not None
    _, alive = psutil.wait_procs(seen, timeout=30)
    assert not alive, [(p.pid, _status(p)) for p in alive]
    deadline = time.monotonic() + 30
    while (left := _marked(server.marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [(p.pid, _cmdline(p), _status(p)) for p in left]


def _status(process: psutil.Process) -> str:
    try:
        return str(process.status())
    except psutil.Error:
        return "gone"


def _wait_exit(server: Server) -> int:
    try:
        return server.process.wait(timeout=EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {EXIT_WAIT_S} s on:\n{server.log_text()[-4000:]}")


def _assert_clean_log(log: str) -> None:
    """No C++ abort from gloo or torch (it would bypass the server's own shutdown)."""
    assert "terminate called" not in log, log[-4000:]
    assert "core dumped" not in log.lower(), log[-4000:]


def _the_follower(server: TPServer) -> psutil.Process:
    """The one follower of a -tp 2 server, alive."""
    followers = [p for p in _followers(server) if _status(p) != psutil.STATUS_ZOMBIE]
    assert len(followers) == 1, (followers, server.log_text()[-4000:])
    return followers[0]


# --- a working server: the same tokens as one process; a clean drain ------------------------


@pytest.fixture(scope="module")
def served(launch: Callable[..., TPServer], tiny_llama: Path) -> TPServer:
    return _tp_server(launch, "tp2", tiny_llama)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> Callable[[list[int]], tuple[list[int], str]]:
    """Greedy tokens and text of one process (no tensor parallelism), in this process."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

    def run(prompt_ids: list[int]) -> tuple[list[int], str]:
        output = llm.generate([prompt_ids], greedy)[0].outputs[0]
        return list(output.token_ids), output.text

    return run


def test_two_ranks_answer_what_one_process_does(
    served: TPServer, reference: Callable[[list[int]], tuple[list[int], str]]
) -> None:
    log = served.log_text()
    assert "tensor parallel: 2 ranks (gloo, mp)" in log, log
    follower = _the_follower(served)
    logged = re.search(r"followers pid (\d+)", log)
    assert logged and int(logged.group(1)) == follower.pid, log
    assert FOLLOWER_MODULE in " ".join(follower.cmdline())

    client, model = _client(served), _model(served)
    extra = {"ignore_eos": True, "return_token_ids": True}
    for prompt in PROMPTS:
        # one request at a time: each runs alone in its batch, as the reference does
        response = client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
        )
        choice = response.choices[0]
        prompt_ids = _extra(choice)["prompt_token_ids"]
        expected_ids, expected_text = reference(prompt_ids)
        assert _extra(choice)["token_ids"] == expected_ids, prompt
        assert choice.text == expected_text, prompt
        assert choice.finish_reason == "length"

        stream = client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            extra_body=extra,
        )  # fmt: skip
        ids: list[int] = []
        text, finish = "", None
        for chunk in stream:
            for part in chunk.choices:
                ids += _extra(part).get("token_ids") or []
                text += part.text
                finish = part.finish_reason or finish
        assert ids == expected_ids, prompt
        assert text == expected_text, prompt
        assert finish == "length"
    assert _the_follower(served).pid == follower.pid  # the same follower served them all


def test_sigterm_drains_then_stops_the_follower_and_exits_0(served: TPServer) -> None:
    """Last user of `served`: a stream in flight at SIGTERM finishes, then the server stops
    its follower and exits 0."""
    follower = _the_follower(served)
    client, model = _client(served), _model(served)
    tokens = 200
    stream = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    chunks = iter(stream)
    received = [next(chunks) for _ in range(3)]
    served.process.send_signal(signal.SIGTERM)
    received += list(chunks)
    assert received[-1].choices[0].finish_reason == "length"
    ids = [i for c in received for part in c.choices for i in _extra(part)["token_ids"]]
    assert len(ids) == tokens  # none lost (a chunk may carry several)
    assert _wait_exit(served) == 0, served.log_text()[-4000:]
    log = served.log_text()
    assert "engine stopped: 0 requests unfinished, KV cache 0% in use" in log, log[-4000:]
    assert "rank 1:" not in log, log[-4000:]  # the follower left on "stop", no error
    assert _health(served) is None
    _assert_no_leftovers(served, [follower])
    _assert_clean_log(log)


# --- a follower that dies or hangs ----------------------------------------------------------


def test_follower_killed_mid_stream_fails_the_request_and_the_server_exits_1(
    launch: Callable[..., TPServer], tiny_llama: Path
) -> None:
    server = _tp_server(launch, "tp2-killed-mid-stream", tiny_llama)
    follower = _the_follower(server)
    client = _client(server)
    stream = client.completions.create(
        model=_model(server), prompt=PROMPTS[1], max_tokens=480, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = iter(stream)
    received = [next(chunks) for _ in range(3)]
    follower.kill()
    with pytest.raises(openai.APIError) as raised:
        received += list(chunks)  # bounded by the client's timeout: it must not hang
    # an error event in the stream (the engine failed the request), not a dropped connection
    assert not isinstance(raised.value, openai.APIConnectionError), raised.value
    assert "engine" in raised.value.message, raised.value.message
    assert len(received) < 480
    assert _wait_exit(server) == EXIT_ENGINE_DIED, server.log_text()[-4000:]
    log = server.log_text()
    assert "engine loop died" in log and "PeerError" in log, log[-4000:]
    assert _health(server) is None
    _assert_no_leftovers(server, [follower])
    _assert_clean_log(log)


def test_hung_follower_times_the_step_out_and_the_server_exits_1(
    launch: Callable[..., TPServer], tiny_llama: Path
) -> None:
    """A stopped follower (SIGSTOP) never answers: the step's collectives give up after
    TOKENMILL_COLLECTIVE_TIMEOUT, the request fails, and the server exits; the follower,
    still stopped, does not outlive it."""
    server = _tp_server(launch, "tp2-hung", tiny_llama, env={"TOKENMILL_COLLECTIVE_TIMEOUT": "3"})
    follower = _the_follower(server)
    follower.suspend()
    try:
        response = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": _model(server), "prompt": PROMPTS[0], "max_tokens": 8},
            timeout=EXIT_WAIT_S,
        )
        assert response.status_code == 503, response.text
        assert "engine" in response.json()["error"]["message"], response.text
        assert _wait_exit(server) == EXIT_ENGINE_DIED, server.log_text()[-4000:]
    finally:
        if follower.is_running() and _status(follower) == psutil.STATUS_STOPPED:
            follower.resume()  # (only if the test failed before the server could end it)
    log = server.log_text()
    assert "engine loop died" in log and "PeerError" in log, log[-4000:]
    _assert_no_leftovers(server, [follower])
    _assert_clean_log(log)


def test_idle_server_exits_1_when_its_follower_dies(
    launch: Callable[..., TPServer], tiny_llama: Path
) -> None:
    server = _tp_server(launch, "tp2-idle", tiny_llama)
    follower = _the_follower(server)
    follower.kill()
    deadline = time.monotonic() + EXIT_WAIT_S
    while _health(server) == 200:  # no request is needed: the server notices on its own
        assert time.monotonic() < deadline, server.log_text()[-4000:]
        time.sleep(0.1)
    assert _wait_exit(server) == EXIT_ENGINE_DIED, server.log_text()[-4000:]
    log = server.log_text()
    assert f"tensor-parallel worker (pid {follower.pid}) exited with code -9" in log, log
    assert "engine loop died" in log, log[-4000:]
    assert _health(server) is None
    _assert_no_leftovers(server, [follower])
    _assert_clean_log(log)


# --- a model that does not split ------------------------------------------------------------


def test_heads_that_do_not_split_fail_startup_with_a_clear_message(
    launch: Callable[..., TPServer],
) -> None:
    """The bundled SmolLM2 has 9 attention heads (3 key/value heads): 3 ranks, not 2."""
    server = launch("tp2-bundled", "-tp", "2")
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while server.process.poll() is None:  # note its followers while it loads
        assert time.monotonic() < deadline, server.log_text()[-4000:]
        try:
            seen |= {p.pid: p for p in _followers(server)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    code = _wait_exit(server)
    log = server.log_text()
    assert seen, log  # its follower was started (and must not outlive it)
    assert code != 0, log
    assert "9 attention heads do not split over tensor-parallel size 2" in log, log
    assert "tokenmill serve: error:" in log, log
    assert _health(server) is None
    _assert_no_leftovers(server, list(seen.values()))
    _assert_clean_log(log)
