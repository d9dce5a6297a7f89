"""Small server polish against the fake engine: GET /v1/models/{id} (with the official openai
client), /ping."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.unit.fake_engine import KEY, MODEL, FakeAsyncEngine, assert_error, client_for, make_app
from tokenmill.server.app import build_app
from tokenmill.server.settings import ServerSettings

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
