"""Small server polish: GET /v1/models/{id} (with the official openai client) and /ping against
the fake engine; a .gguf file's served names; weight-loading progress without a terminal; no
triton import from the meta build; the native kernels' warm-up."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.unit.fake_engine import KEY, MODEL, FakeAsyncEngine, assert_error, client_for, make_app
from tokenmill import kernels
from tokenmill.model import weights
from tokenmill.server.app import build_app
from tokenmill.server.settings import ServerSettings, default_served_model_names

pytestmark = pytest.mark.anyio


def _openai(app: object, api_key: str = "none") -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    http = httpx.AsyncClient(transport=transport, base_url="http://test")
    return openai.AsyncOpenAI(
        base_url="http://test/v1", api_key=api_key, http_client=http, max_retries=0
    )


async def test_retrieve_model_with_the_openai_client() -> None:
    names = [MODEL, "org/alias", "/m/x.gguf"]
    app = build_app(FakeAsyncEngine(), ServerSettings(served_model_names=names))
    client = _openai(app)
    for name in (MODEL, "org/alias", "/m/x.gguf"):  # the client percent-encodes slashes
        model = await client.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == (name, "model", "tokenmill")
        assert isinstance(model.created, int)
        assert model.model_extra is not None and model.model_extra["root"] == "fake/model-dir"
    listed = [m.id for m in (await client.models.list()).data]
    assert listed == [MODEL, "org/alias", "/m/x.gguf"]
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("nope")
    assert info.value.status_code == 404 and info.value.code == "404"  # the client: str(code)
    assert "nope" in info.value.message


async def test_retrieve_model_raw_http_and_auth() -> None:
    async with client_for(make_app(api_key=KEY)) as c:
        assert_error(await c.get(f"/v1/models/{MODEL}"), 401)
        auth = {"Authorization": f"Bearer {KEY}"}
        r = await c.get(f"/v1/models/{MODEL}", headers=auth)
        assert r.status_code == 200 and r.json()["id"] == MODEL
        assert r.json()["max_model_len"] == 64
        r = await c.get("/v1/models/alias", headers=auth)
        assert r.status_code == 200 and r.json()["id"] == "alias"
        assert assert_error(await c.get("/v1/models/a/b", headers=auth), 404)
    client = _openai(make_app(api_key=KEY), api_key=KEY)
    assert (await client.models.retrieve("alias")).id == "alias"


async def test_ping_answers_as_health(engine: FakeAsyncEngine) -> None:
    async with client_for(make_app(engine, api_key=KEY)) as c:  # open, as /health
        for method in ("GET", "POST"):
            r = await c.request(method, "/ping")
            assert r.status_code == 200 and r.content == b""
        engine.alive = False
        for method in ("GET", "POST"):
            r = await c.request(method, "/ping")
            assert_error(r, 503)
            assert (await c.get("/health")).status_code == 503


# --- First run: served names, weight-loading progress, no triton import, kernel warm-up ---


@pytest.mark.parametrize(
    ("model", "names"),
    [
        ("/models/q/SmolLM2-135M-Instruct-Q8_0.gguf",
         ["SmolLM2-135M-Instruct-Q8_0", "/models/q/SmolLM2-135M-Instruct-Q8_0.gguf"]),
        ("./m.GGUF", ["m", "./m.GGUF"]),
        ("org/name", ["org/name"]),
        ("/models/llama3", ["/models/llama3"]),
        ("SmolLM2-135M-Instruct", ["SmolLM2-135M-Instruct"]),
    ],
)  # fmt: skip
def test_gguf_served_as_its_stem_with_the_path_as_alias(model: str, names: list[str]) -> None:
    assert default_served_model_names(model) == names


async def test_both_gguf_names_answer() -> None:
    names = default_served_model_names("/models/q/x-Q4_0.gguf")
    app = build_app(FakeAsyncEngine(), ServerSettings(served_model_names=names))
    async with client_for(app) as c:
        for name in names:
            r = await c.post("/v1/completions", json={"model": name, "prompt": "x"})
            assert r.status_code == 200 and r.json()["model"] == name
        r = await c.post("/v1/completions", json={"prompt": "x"})
        assert r.json()["model"] == "x-Q4_0"  # the stem is the default
    assert [m.id for m in (await _openai(app).models.list()).data] == names


def _source(count: int) -> Any:
    def read(skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        for i in range(count):
            yield f"w{i}", torch.ones(4, dtype=torch.float16)

    return SimpleNamespace(iter_weights=read, num_weights=count, path="/models/x.gguf")


def test_weight_progress_is_plain_log_lines_without_a_terminal(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenmill.model.weights")
    assert not sys.stderr.isatty()  # pytest captures it
    out = list(weights._on_device(_source(5), torch.device("cpu"), torch.float32))
    assert [t.dtype for _, t in out] == [torch.float16] * 5  # as stored: copy_ converts
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "Loading weights" not in captured.err
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "loading 5 weight tensors from /models/x.gguf", lines
    assert lines[1].startswith("loaded 5 weight tensors (0.0 MiB) in "), lines
    assert len(lines) == 2


def test_weight_progress_bar_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(weights, "_stderr_is_a_terminal", lambda: True)
    assert len(list(weights._on_device(_source(3), torch.device("cpu"), torch.float32))) == 3
    assert "Loading weights" in capsys.readouterr().err


def test_meta_build_skips_init_and_does_not_import_dynamo() -> None:
    """nn.init.normal_ on a meta tensor imports torch._dynamo and with it triton, whose
    nanobind bindings print ~30 lines of leak warnings at exit."""
    code = (
        "import sys, torch\n"
        "from tokenmill.model.weights import skip_init\n"
        "normal = torch.nn.init.normal_\n"
        "with torch.device('meta'), skip_init():\n"
        "    torch.nn.Embedding(10, 4); torch.nn.Linear(4, 4)\n"
        "assert torch.nn.init.normal_ is normal\n"
        "print('torch._dynamo' in sys.modules, 'triton' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"], done.stderr
    assert "nanobind" not in done.stderr


def test_kernel_warm_up_loads_on_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(kernels, "load", lambda: calls.append("load"))
    kernels.warm_up("cuda")
    assert calls == []
    kernels.warm_up("cpu")
    assert calls == ["load"]


def test_serving_processes_freeze_the_loaded_heap_and_collect_young_objects_less_often() -> None:
    """engine/heap.py, run where the server runs it (in a process of its own: it sets the
    whole process's collector)."""
    code = (
        "import gc; from tokenmill.engine.heap import YOUNG_THRESHOLD, settle_heap; "
        "before = gc.get_threshold(); loaded = [[i] for i in range(1000)]; settle_heap(); "
        "assert gc.get_freeze_count() >= 1000, gc.get_freeze_count(); "
        "assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:]) != before"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
