"""A server started with a `vllm serve` command line: vLLM's flags, a --config file, TLS, a
Unix socket; each flag's effect or warning is checked on the running servers."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MAX_MODEL_LEN, free_port, serve_command

KEY_A, KEY_B = "key-a", "key-b"


def _launch(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"{name}.log"
    common = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "256MiB"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            serve_command(*common, *args), stdout=out, stderr=subprocess.STDOUT
        )
    return process, log


def _wait(process: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"server not ready:\n{log.read_text()}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    tmp = tmp_path_factory.mktemp("vllm-flags")
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    config = tmp / "config.yaml"
    config.write_text(f"served-model-name: [from-config]\nmax_num_seqs: 8\nport: {free_port()}\n")
    port = free_port()
    tls, tls_log = _launch(
        tmp, "tls", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--api-key", KEY_A, KEY_B, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
        "--trust-remote-code", "--enforce-eager", "--swap-space", "4",
        "--tensor-parallel-size", "1", "--disable-log-stats", "--enable-chunked-prefill",
        "--enable-request-id-headers", "--disable-fastapi-docs",
        "--structured-outputs-config.backend", "xgrammar", "--kv-cache-dtype", "fp8",
    )  # fmt: skip
    socket_path = tmp / "tokenmill.sock"
    uds, uds_log = _launch(
        tmp, "uds", "--uds", str(socket_path), "--enable-prompt-tokens-details",
        "--disable-playground", "--quantization", "rtn",
    )  # fmt: skip
    https = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=False, timeout=30)
    unix = httpx.Client(
        base_url="http://localhost", transport=httpx.HTTPTransport(uds=str(socket_path))
    )
    try:
        _wait(tls, tls_log, lambda: https.get("/health").status_code == 200)
        _wait(uds, uds_log, lambda: unix.get("/health").status_code == 200)
        yield {"https": https, "unix": unix, "tls_log": tls_log, "uds_log": uds_log}
    finally:
        https.close()  # first: an open keep-alive connection holds a graceful shutdown up
        unix.close()
        for process in (tls, uds):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def test_a_vllm_command_line_serves_with_each_flags_effect(servers: dict[str, object]) -> None:
    https = servers["https"]
    assert isinstance(https, httpx.Client)
    for key in (KEY_A, KEY_B):  # several keys, over TLS
        models = https.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200
        assert models.json()["data"][0]["id"] == "from-config"  # --config's served name
    assert https.get("/v1/models").status_code == 401
    assert https.get("/health", headers={"x-request-id": "r-1"}).headers["x-request-id"] == "r-1"
    assert https.get("/docs").status_code == 404
    page = https.get("/")  # the playground needs no key; the calls it makes do
    assert page.status_code == 200 and "playground.js" in page.text
    body = {"prompt": "Hi", "max_tokens": 8, "ignore_eos": True}
    usage = https.post(
        "/v1/completions", json=body, headers={"authorization": f"Bearer {KEY_A}"}, timeout=120
    ).json()["usage"]
    assert "prompt_tokens_details" not in usage  # vLLM's default
    assert usage["completion_tokens"] == 8  # decoded over the fp8 cache
    log = Path(str(servers["tls_log"])).read_text()
    assert "float8_e4m3fn)" in log  # --kv-cache-dtype fp8: the load line names the cache
    for flag in ("--trust-remote-code", "--swap-space 4"):
        assert f"{flag} has no effect here" in log, flag
    for quiet in (
        "--tensor-parallel-size", "--disable-log-stats", "--enable-chunked-prefill",
        "--enforce-eager",
    ):  # fmt: skip
        assert f"{quiet} has no effect" not in log
    assert "https://127.0.0.1" in log  # the ready line


def test_a_unix_socket_serves_completions_from_weights_rounded_at_load(
    servers: dict[str, object],
) -> None:
    unix = servers["unix"]
    assert isinstance(unix, httpx.Client)
    body = {"prompt": "The capital of France is " * 10, "max_tokens": 3, "temperature": 0}
    first = unix.post("/v1/completions", json=body, timeout=120)
    assert first.status_code == 200 and first.json()["choices"][0]["text"]
    again = unix.post("/v1/completions", json=body, timeout=120).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] >= 16  # the prefix cache, reported
    for path in ("/", "/playground/playground.js", "/playground/config"):  # --disable-playground
        assert unix.get(path).status_code == 404, path
    log = Path(str(servers["uds_log"])).read_text()  # --quantization rtn: rounded at load
    assert "rounded to Q8_0 blocks (rtn)" in log and "weights rtn" in log


def test_a_refused_flag_stops_the_server_with_what_to_do_instead(tmp_path: Path) -> None:
    done = subprocess.run(
        serve_command("--enable-lora", "--port", str(free_port())),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "--enable-lora: LoRA adapters are not supported" in done.stderr
    assert "merge_and_unload" in done.stderr
