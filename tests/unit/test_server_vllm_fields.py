"""Fields and flags as `vllm serve` has them: the client's request id, usage in streams by
default once stream_options is sent (and always with --enable-force-include-usage), default
chat template kwargs, and a 400 for each OpenAI or vLLM field tokenmill cannot honour."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.unit.fake_engine import (
    CHATML,
    FakeAsyncEngine,
    assert_error,
    client_for,
    make_app,
    sse_events,
)

pytestmark = pytest.mark.anyio
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_the_response_id_is_the_clients_header_else_its_request_id(
    client: httpx.AsyncClient, engine: FakeAsyncEngine
) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT | {"request_id": "body-1"})
    assert r.json()["id"] == "chatcmpl-body-1"
    r = await client.post(
        "/v1/chat/completions",
        json=CHAT | {"request_id": "body-1"},
        headers={"X-Request-Id": "head-2"},
    )
    assert r.json()["id"] == "chatcmpl-head-2"
    r = await client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True},
        headers={"X-Request-Id": "head-3"},
    )  # fmt: skip
    assert {json.loads(e)["id"] for e in sse_events(r.text)[:-1]} == {"cmpl-head-3"}
    r = await client.post("/v1/embeddings", json={"input": "hi", "request_id": "e-4"})
    assert r.json()["id"] == "embd-e-4"
    # a client's id need not be unique: the engine's ids stay apart
    engine_ids = [request_id for _, _, request_id in engine.requests]
    assert engine_ids[0].startswith("chatcmpl-body-1-") and len(set(engine_ids)) == 4
    r = await client.post("/v1/chat/completions", json=CHAT)
    new = r.json()["id"]
    assert new.startswith("chatcmpl-") and len(new) == len("chatcmpl-") + 32
    for bad in ("", "two words", "line\nbreak", "x" * 257):
        r = await client.post("/v1/chat/completions", json=CHAT | {"request_id": bad})
        assert_error(r, 400, "request_id")
    r = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "a b"})
    assert_error(r, 400, "X-Request-Id")


async def _usage_chunks(client: httpx.AsyncClient, body: dict) -> list[dict | None]:
    r = await client.post("/v1/chat/completions", json=CHAT | {"stream": True} | body)
    return [json.loads(e).get("usage", "absent") for e in sse_events(r.text)[:-1]]


async def test_stream_options_include_usage_unless_set_false(client: httpx.AsyncClient) -> None:
    assert set(await _usage_chunks(client, {})) == {"absent"}
    for options in ({}, {"include_usage": True}):
        usage = await _usage_chunks(client, {"stream_options": options})
        assert usage[:-1] == [None] * (len(usage) - 1) and usage[-1]["completion_tokens"] == 2
    usage = await _usage_chunks(client, {"stream_options": {"include_usage": False}})
    assert set(usage) == {"absent"}
    # continuous_usage_stats alone: include_usage is on, so every chunk has the usage so far
    usage = await _usage_chunks(client, {"stream_options": {"continuous_usage_stats": True}})
    assert all(u is not None and u != "absent" for u in usage)


async def test_force_include_usage_ends_every_stream_with_usage(engine: FakeAsyncEngine) -> None:
    async with client_for(make_app(engine, force_include_usage=True)) as client:
        usage = await _usage_chunks(client, {})
        assert usage[-1]["total_tokens"] > 0 and set(usage[:-1]) == {None}
        r = await client.post(
            "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}
        )
        assert json.loads(sse_events(r.text)[-2])["usage"]["completion_tokens"] == 2


async def test_default_chat_template_kwargs_sit_under_the_requests(
    engine: FakeAsyncEngine,
) -> None:
    engine.tokenizer.hf.chat_template = CHATML
    app = make_app(engine, default_chat_template_kwargs={"greeting": "server"})
    async with client_for(app) as client:
        await client.post("/v1/chat/completions", json=CHAT)
        await client.post(
            "/v1/chat/completions", json=CHAT | {"chat_template_kwargs": {"greeting": "request"}}
        )
    prompts = [bytes(i - 2 for i in ids if i >= 2).decode() for ids, _, _ in engine.requests]
    assert "[server]" in prompts[0] and "[request]" in prompts[1] and "server" not in prompts[1]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("logits_processors", ["pkg.Processor"], "runs no code a request names"),
        ("structural_tag", '{"type": "structural_tag"}', "not supported yet"),
        ("functions", [{"name": "f", "parameters": {}}], "send tools instead"),
        ("function_call", "auto", "tool_choice"),
        ("audio", {"voice": "alloy", "format": "wav"}, "outputs are text"),
        ("modalities", ["text", "audio"], "outputs are text"),
        ("web_search_options", {}, "runs no search"),
        ("prediction", {"type": "content", "content": "x"}, "speculative-config"),
        ("verbosity", "low", "verbosity"),
    ],
)
async def test_fields_tokenmill_cannot_honour_are_400s_naming_them(
    client: httpx.AsyncClient, field: str, value: object, says: str
) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT | {field: value})
    assert says in assert_error(r, 400, field)


async def test_those_fields_at_their_unused_values_pass(client: httpx.AsyncClient) -> None:
    unused = {"modalities": ["text"], "verbosity": "medium", "functions": None,
              "logits_processors": [], "audio": None}  # fmt: skip
    r = await client.post("/v1/chat/completions", json=CHAT | unused)
    assert r.status_code == 200, r.text
    for body in ({"prompt": "x", "prompt_embeds": "AAAA"}, {"prompt_embeds": "AAAA"}):
        r = await client.post("/v1/completions", json=body)
        assert "prompt_embeds" in assert_error(r, 400, "prompt_embeds")
    r = await client.post("/v1/completions", json={"max_tokens": 2})
    assert_error(r, 400, "prompt")


async def test_top_logprobs_0_needs_no_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT | {"top_logprobs": 0})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", json=CHAT | {"top_logprobs": 1})
    assert "logprobs must be set to true" in assert_error(r, 400, "top_logprobs")


async def test_invocations_routes_by_the_bodys_shape_as_sagemaker_calls_it(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/invocations", json=CHAT)
    assert r.json()["object"] == "chat.completion", r.text
    r = await client.post("/invocations", json={"prompt": "hi", "max_tokens": 2})
    assert r.json()["object"] == "text_completion"
    r = await client.post("/invocations", json={"input": "hi"})
    assert r.json()["object"] == "list" and r.json()["data"][0]["object"] == "embedding"
    r = await client.post("/invocations", json=CHAT | {"stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert_error(await client.post("/invocations", json={"text": "hi"}), 400)
    assert_error(await client.post("/invocations", content=b"{not json"), 400)
    assert_error(await client.post("/invocations", json=CHAT | {"n": "many"}), 400, "n")


async def test_invocations_needs_the_api_key(engine: FakeAsyncEngine) -> None:
    app = make_app(engine, api_key="sk-1", max_request_body_bytes=1000)
    async with client_for(app) as client:
        assert (await client.post("/invocations", json=CHAT)).status_code == 401
        # the key is checked before the body is read: no key, no 413 either
        r = await client.post("/invocations", content=b"x" * 5000)
        assert r.status_code == 401
        r = await client.post("/invocations", json=CHAT, headers={"Authorization": "Bearer sk-1"})
        assert r.status_code == 200
