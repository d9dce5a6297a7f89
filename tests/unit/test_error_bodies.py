"""Error bodies for requests that are not a JSON object: malformed JSON (line and column), an
empty body, a body without a JSON content type; `code` is always the HTTP status (an int)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.unit.fake_engine import KEY, assert_error, client_for, make_app

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}
PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize"]


def _error(r: httpx.Response, status: int = 400) -> dict[str, object]:
    assert_error(r, status)
    error = r.json()["error"]
    assert error["code"] == status and isinstance(error["code"], int)
    assert error["type"] == "BadRequestError" if status == 400 else True
    return dict(error)


@pytest.mark.parametrize("path", PATHS)
async def test_malformed_json_names_line_and_column(client: httpx.AsyncClient, path: str) -> None:
    content = '{\n  "prompt": "x",\n  "max_tokens": 5,,\n  "n": 1\n}'
    with pytest.raises(json.JSONDecodeError) as decode:
        json.loads(content)
    error = _error(await client.post(path, content=content, headers=JSON))
    where = f"invalid JSON at line {decode.value.lineno} column {decode.value.colno}"
    assert decode.value.lineno == 3
    assert str(error["message"]).startswith(where + ": "), error
    assert error["param"] is None  # not the character offset


async def test_truncated_json_points_past_the_end(client: httpx.AsyncClient) -> None:
    error = _error(await client.post("/v1/completions", content='{"prompt": "x"', headers=JSON))
    assert str(error["message"]).startswith("invalid JSON at line 1 column 15"), error


@pytest.mark.parametrize("headers", [JSON, {}])
@pytest.mark.parametrize("path", PATHS)
async def test_empty_body_says_so(
    client: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> None:
    error = _error(await client.post(path, content="", headers=headers))
    assert "request body is empty" in str(error["message"])


@pytest.mark.parametrize(
    ("headers", "shown"),
    [({"content-type": "text/plain"}, "Content-Type: text/plain"), ({}, "no Content-Type")],
)
async def test_body_without_a_json_content_type_says_so(
    client: httpx.AsyncClient, headers: dict[str, str], shown: str
) -> None:
    r = await client.post("/v1/completions", content='{"prompt": "x"}', headers=headers)
    message = str(_error(r)["message"])
    assert "Content-Type: application/json" in message and shown in message
    ok = await client.post("/v1/completions", content='{"prompt": "x"}', headers=JSON)
    assert ok.status_code == 200
    plus_json = {"content-type": "application/vnd.api+json; charset=utf-8"}
    ok = await client.post("/v1/completions", content='{"prompt": "x"}', headers=plus_json)
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("content", "kind"), [("[1, 2]", "an array"), ("true", "a boolean"), ('"x"', "a string"),
                          ("3", "a number"), ("null", "null")],
)  # fmt: skip
async def test_non_object_json_names_what_it_got(
    client: httpx.AsyncClient, content: str, kind: str
) -> None:
    for path in PATHS:
        message = str(_error(await client.post(path, content=content, headers=JSON))["message"])
        assert message == f"the request body must be a JSON object, not {kind}", message


async def test_unparseable_json_beyond_the_decoder_is_a_400(client: httpx.AsyncClient) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    message = str(_error(await client.post("/tokenize", content=deep, headers=JSON))["message"])
    assert message == "invalid JSON: nested too deeply"
    digits = '{"prompt": "x", "n": ' + "9" * 5000 + "}"
    r = await client.post("/v1/completions", content=digits, headers=JSON)
    message = str(_error(r)["message"])
    assert message.startswith("invalid JSON: ") and "sys." not in message


async def test_field_errors_name_the_field_without_pydantic_internals(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/tokenize", json={"prompt": 5})
    error = _error(r)
    assert error["param"] == "prompt" and "function-wrap" not in str(error["message"])
    messages = [{"role": "user", "content": 5}]
    error = _error(await client.post("/v1/chat/completions", json={"messages": messages}))
    assert error["param"] == "messages.0.content"


async def test_code_is_the_status_on_every_path() -> None:
    """401 (middleware), 404 (route and model), 405, 400, 413: `code` is the int status."""
    async with client_for(make_app(api_key=KEY, max_request_body_bytes=1000)) as c:
        auth = {"Authorization": f"Bearer {KEY}"}
        cases = [
            (await c.post("/v1/completions", json={"prompt": "x"}), 401),
            (await c.get("/nope"), 404),
            (await c.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=auth),
             404),
            (await c.get("/v1/completions", headers=auth), 405),
            (await c.post("/v1/completions", content="{", headers=auth | JSON), 400),
            (await c.post("/v1/completions", content="x" * 2000, headers=auth | JSON), 413),
        ]  # fmt: skip
        for r, status in cases:
            assert_error(r, status)
            assert r.json()["error"]["code"] == status, r.text
