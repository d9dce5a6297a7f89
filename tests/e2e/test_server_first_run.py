"""First-run polish on a real `tokenmill serve` (bundled GGUF model, stderr to a log file):
the kernel library compiled before the server is healthy and never on a request, plain
weight-loading log lines, no nanobind leak report at exit; error bodies, /ping and
/v1/models/{id} over real HTTP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import _stop
from tokenmill.model.loader import bundled_model_path


def test_first_run_on_a_real_server(
    start_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))  # a first run's compile
    gguf = bundled_model_path()
    server = start_server("first-run", gguf)
    url = server.url

    for method in ("GET", "POST"):
        r = httpx.request(method, f"{url}/ping", timeout=10)
        assert r.status_code == 200 and r.content == b""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    assert gguf in [m.id for m in client.models.list().data]
    assert client.models.retrieve(gguf).id == gguf  # a path with slashes, percent-encoded
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    body = '{\n  "prompt": "x",\n  "max_tokens": 2,,\n}'
    r = httpx.post(
        f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith("invalid JSON at line 3 column 19: "), error
    assert error["code"] == 400 and error["param"] is None
    r = httpx.post(f"{url}/v1/completions", content="", timeout=10)
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content='{"prompt": "x"}', timeout=10)
    assert r.status_code == 400 and "Content-Type" in r.json()["error"]["message"]

    done = client.completions.create(model=gguf, prompt="Hello", max_tokens=3, temperature=0)
    assert done.choices[0].text
    _stop(server)  # SIGINT, exit 0

    log = server.log_text()
    ready = log.index("tokenmill ready on")
    compiled = log.index("compiled native kernel all in ")
    assert log.index("compiling native kernel all") < compiled < ready
    assert "compil" not in log[ready:], log[ready:]  # nothing built on a request
    assert "\r" not in log and "Loading weights" not in log  # no progress bar in a file
    counts = re.findall(r"loading (\d+) weight tensors from .*\n.*loaded (\d+) weight tensors", log)
    assert len(counts) == 1 and counts[0][0] == counts[0][1], log[:ready]
    assert "nanobind" not in log and "triton" not in log, log[-3000:]
