"""POST /v1/responses through the real HTTP app over fake and scripted engines, with the
official openai client: the request's translation to chat (input items, tools, formats, 400s),
the output items, the streamed events (their order, and their deltas adding up to the
non-streamed output), and the in-memory store behind previous_response_id."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.unit.fake_engine import KEY, FakeAsyncEngine, assert_error, client_for, make_app
from tests.unit.test_server_tools import TOOLS_TEMPLATE, ScriptedEngine
from tokenmill.server.serving_responses import ResponsesServer, ResponseStore
from tokenmill.tools.formats import FORMATS
from tokenmill.tools.reasoning import ReasoningMarkers

MODEL = "fake-model"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
HERMES = FORMATS["hermes"]


def app_with(engine: Any = None, store: ResponseStore | None = None, **settings: Any) -> Any:
    """The app, its Responses server given `store` (a fresh one by default)."""
    if engine is None:
        engine = FakeAsyncEngine()
        engine.max_model_len = 512
    app = make_app(engine, **settings)
    state = app.state
    state.responses = ResponsesServer(
        state.engine, state.settings, state.metrics, state.executor, chat=state.chat, store=store
    )
    return app


def openai_client(app: Any, api_key: str = "unused") -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
    return openai.AsyncOpenAI(
        api_key=api_key, base_url="http://test/v1", http_client=http, max_retries=0
    )


def _prompt(engine: FakeAsyncEngine, k: int = -1) -> str:
    return bytes(i - 2 for i in engine.requests[k][0] if i >= 2).decode()


def _events(body: str) -> list[dict[str, Any]]:
    """The events of a Responses SSE body, checking `event:` matches each data's type."""
    assert body.endswith("data: [DONE]\n\n")
    events = []
    for block in body.split("\n\n")[:-2]:
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def _without_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]


def _from_deltas(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items rebuilt from the added events and the deltas alone."""
    items: list[dict[str, Any]] = []
    for event in events:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert event["output_index"] == len(items)
            items.append(dict(event["item"], content=[]) if "content" in event["item"] else
                         dict(event["item"]))  # fmt: skip
        elif kind == "response.content_part.added":
            items[event["output_index"]]["content"].append(dict(event["part"]))
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            items[event["output_index"]]["content"][event["content_index"]]["text"] += event[
                "delta"
            ]
        elif kind == "response.function_call_arguments.delta":
            items[event["output_index"]]["arguments"] += event["delta"]
        elif kind == "response.output_item.done":
            items[event["output_index"]]["status"] = event["item"]["status"]
    return items


# -- plain text --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_string_input_answers_with_one_message_and_output_text():
    app = app_with()
    client = openai_client(app)
    response = await client.responses.create(
        model=MODEL, input="hi", instructions="Be brief.", max_output_tokens=5,
        metadata={"k": "v"}, store=False,
    )  # fmt: skip
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.output_text == "abcde"
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.id.startswith("msg_")
    assert message.role == "assistant" and message.content[0].type == "output_text"
    assert response.usage.output_tokens == 5
    total = response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.total_tokens == total
    assert response.metadata == {"k": "v"} and response.instructions == "Be brief."
    assert response.max_output_tokens == 5 and response.store is False
    assert _prompt(app.state.engine) == "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"


@pytest.mark.anyio
async def test_a_stop_completes_the_response():
    client = openai_client(app_with())
    response = await client.responses.create(
        model=MODEL, input="hi", max_output_tokens=10, extra_body={"stop": ["d"], "seed": 3}
    )
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output_text == "abc"


@pytest.mark.anyio
async def test_the_stream_has_the_documented_order_and_numbering():
    app = app_with()
    async with client_for(app) as client:
        body = {"model": MODEL, "input": "hi", "max_output_tokens": 3, "stream": True}
        streamed = await client.post("/v1/responses", json=body)
    events = _events(streamed.text)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert (
        events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    )
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["output"][0]["content"][0]["text"] == "abc"
    assert events[-4]["text"] == "abc"
    assert events[-2]["item"] == final["output"][0]
    assert {e["response"]["id"] for e in (events[0], events[1], events[-1])} == {final["id"]}


@pytest.mark.anyio
async def test_the_openai_client_iterates_the_stream_and_its_stream_helper_finishes():
    client = openai_client(app_with())
    stream = await client.responses.create(
        model=MODEL, input="hi", max_output_tokens=4, stream=True
    )
    types = [event.type async for event in stream]
    assert types[0] == "response.created" and types[-1] == "response.incomplete"
    async with client.responses.stream(
        model=MODEL, input="hi", max_output_tokens=9, extra_body={"stop": ["e"]}
    ) as helper:
        deltas = [e.delta async for e in helper if e.type == "response.output_text.delta"]
        final = await helper.get_final_response()
    assert "".join(deltas) == final.output_text == "abcd" and final.status == "completed"


# -- reasoning and tool calls --------------------------------------------------------------------


def _scripted(script: str, seed: int, reasoning: bool = False) -> ScriptedEngine:
    engine = ScriptedEngine(script, seed=seed)
    if reasoning:
        engine.reasoning_markers = ReasoningMarkers("<think>", "</think>", (1000,), (1001,))
    return engine


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(4))
async def test_streamed_deltas_add_up_to_the_non_streamed_output(seed):
    script = (
        "<think>\nTwo and two.\n</think>\n\nChecking.\n"
        + HERMES.call_text("get_weather", '{"city": "Paris"}')
        + HERMES.call_text("get_weather", '{"city": "Rome \\"x\\""}')
    )
    engine = _scripted(script, seed, reasoning=True)
    body = {"model": MODEL, "input": "weather?", "tools": [WEATHER]}
    async with client_for(app_with(engine, tool_call_parser="hermes")) as client:
        whole = (await client.post("/v1/responses", json=body)).json()
        streamed = await client.post("/v1/responses", json={**body, "stream": True})
    output = whole["output"]
    assert [item["type"] for item in output] == [
        "reasoning", "message", "function_call", "function_call",
    ]  # fmt: skip
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "\nTwo and two.\n"}]
    assert output[1]["content"][0]["text"] == "Checking."
    assert [(c["name"], c["arguments"]) for c in output[2:]] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_weather", '{"city": "Rome \\"x\\""}'),
    ]
    assert all(c["id"].startswith("fc_") and c["call_id"].startswith("call_") for c in output[2:])
    assert output[0]["id"].startswith("rs_") and whole["status"] == "completed"
    events = _events(streamed.text)
    assert _without_ids(_from_deltas(events)) == _without_ids(output)
    assert _without_ids(events[-1]["response"]["output"]) == _without_ids(output)
    types = [e["type"] for e in events]
    assert "response.reasoning_text.done" in types
    assert types.count("response.function_call_arguments.done") == 2
    assert types[-1] == "response.completed"


@pytest.mark.anyio
async def test_function_tools_reach_the_template_and_calls_parse_through_the_client():
    engine = _scripted(HERMES.call_text("get_weather", '{"city": "Oslo"}'), 0)
    engine.tokenizer.chat_template = TOOLS_TEMPLATE
    client = openai_client(app_with(engine, tool_call_parser="hermes"))
    response = await client.responses.create(
        model=MODEL, input="weather?", tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
    )  # fmt: skip
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Oslo"} and response.output_text == ""
    assert _prompt(engine).startswith("[TOOLS get_weather]")
    assert engine.grammars[0].kind == "structural_tag"
    assert response.tool_choice.name == "get_weather" and response.tools[0].name == "get_weather"


@pytest.mark.anyio
async def test_function_call_items_and_their_outputs_become_chat_messages():
    engine = _scripted("It is sunny.", 0)
    engine.tokenizer.chat_template = TOOLS_TEMPLATE
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]  # fmt: skip
    client = openai_client(app_with(engine))
    response = await client.responses.create(model=MODEL, input=items, tools=[WEATHER])
    assert response.output_text == "It is sunny."
    prompt = _prompt(engine)
    assert '<|assistant|>[CALL get_weather {"city": "Oslo"}]<|end|><|tool|>sunny<|end|>' in prompt


@pytest.mark.anyio
async def test_the_stream_helper_accumulates_reasoning_and_calls():
    script = "<think>hmm</think>" + HERMES.call_text("get_weather", '{"city": "Oslo"}')
    engine = _scripted(script, 2, reasoning=True)
    client = openai_client(app_with(engine, tool_call_parser="hermes"))
    async with client.responses.stream(model=MODEL, input="weather?", tools=[WEATHER]) as helper:
        types = [event.type async for event in helper]
        final = await helper.get_final_response()
    assert [item.type for item in final.output] == ["reasoning", "function_call"]
    assert final.output[0].content[0].text == "hmm"
    assert final.output[1].arguments == '{"city": "Oslo"}'
    assert types.count("response.output_item.done") == 2


@pytest.mark.anyio
async def test_an_engine_failure_mid_stream_raises_in_the_client():
    client = openai_client(app_with())
    stream = await client.responses.create(
        model=MODEL, input="FAIL", max_output_tokens=8, stream=True
    )
    seen = []
    with pytest.raises(openai.APIError, match="the fake engine failed"):
        async for event in stream:
            seen.append(event.type)
    assert seen[:2] == ["response.created", "response.in_progress"]


# -- the store -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_previous_response_id_continues_the_conversation_without_its_instructions():
    app = app_with()
    client = openai_client(app)
    first = await client.responses.create(
        model=MODEL, input="one", instructions="Old.", max_output_tokens=2
    )
    second = await client.responses.create(
        model=MODEL, input="two", instructions="New.", previous_response_id=first.id,
        max_output_tokens=2,
    )  # fmt: skip
    assert _prompt(app.state.engine) == (
        "<|system|>New.<|end|><|user|>one<|end|><|assistant|>ab<|end|><|user|>two<|end|>"
        "<|assistant|>"
    )
    assert second.previous_response_id == first.id
    third = await client.responses.create(
        model=MODEL, input="three", previous_response_id=second.id, max_output_tokens=1
    )
    assert "<|user|>one" in _prompt(app.state.engine) and third.output_text == "a"
    fetched = await client.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == "ab"


@pytest.mark.anyio
async def test_unknown_and_unstored_responses_are_400_and_404():
    app = app_with()
    client = openai_client(app)
    unstored = await client.responses.create(
        model=MODEL, input="x", store=False, max_output_tokens=1
    )
    async with client_for(app) as http:
        for missing in ("resp_nope", unstored.id):
            body = {"input": "x", "previous_response_id": missing}
            message = assert_error(
                await http.post("/v1/responses", json=body), 400, "previous_response_id"
            )
            assert "kept in memory per process" in message
            assert_error(await http.get(f"/v1/responses/{missing}"), 404)


def test_a_response_stored_again_under_its_id_is_counted_once():
    store = ResponseStore(max_responses=10, max_chars=10_000)
    for _ in range(50):
        store.put({"id": "same", "text": "x" * 100}, [])
    assert store.num_chars < 200 and store.get("same") is not None


@pytest.mark.anyio
async def test_a_request_id_naming_a_stored_response_is_a_400():
    async with client_for(app_with()) as client:
        body = {"input": "x", "max_output_tokens": 2, "request_id": "resp_once"}
        assert (await client.post("/v1/responses", json=body)).status_code == 200
        assert_error(await client.post("/v1/responses", json=body), 400, "request_id")


def test_the_store_drops_the_least_recently_used_past_its_caps():
    store = ResponseStore(max_responses=2, max_chars=10_000)
    for name in ("a", "b"):
        store.put({"id": name}, [])
    assert store.get("a") is not None  # now b is the least recently used
    store.put({"id": "c"}, [])
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    store.put({"id": "big"}, [{"content": "x" * 20_000}])  # over the whole cap: never kept
    assert store.get("big") is None and len(store) == 2
    store.put({"id": "half"}, [{"content": "x" * 6_000}])
    store.put({"id": "half2"}, [{"content": "x" * 6_000}])
    assert store.get("half") is None and store.num_chars <= 10_000


# -- request translation and errors --------------------------------------------------------------


@pytest.mark.anyio
async def test_text_format_json_schema_becomes_the_constraint():
    app = app_with()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    text = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    async with client_for(app) as client:
        body = {"input": "x", "max_output_tokens": 2, "text": text}
        response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == text
    spec = app.state.engine.grammars[0]
    assert spec is not None and json.loads(spec.value) == schema


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [WEATHER, {"type": "web_search"}]}, "tools.1"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input.0.content.0"),
        ({"input": [{"role": "user", "content": "x"}, {"type": "item_reference", "id": "a"}]},
         "input.1.type"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
        ({"input": []}, "input"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"tool_choice": {"type": "web_search"}, "tools": [WEATHER]}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"max_output_tokens": 10_000}, "max_output_tokens"),
        ({"model": "nope"}, "model"),
        ({"prompt": {"id": "pmpt_123"}}, "prompt"),
        ({"n": 2}, "n"),
        ({"return_token_ids": True}, "return_token_ids"),
        ({"logits_processors": ["pkg.P"]}, "logits_processors"),
    ],
)  # fmt: skip
async def test_what_cannot_be_served_is_a_client_error_naming_the_field(extra, param):
    async with client_for(app_with()) as client:
        response = await client.post("/v1/responses", json={"input": "x", **extra})
    assert_error(response, 404 if param == "model" else 400, param)


@pytest.mark.anyio
async def test_vllm_extras_reach_the_chat_request_and_request_id_names_the_response():
    app = app_with()
    async with client_for(app) as client:
        body = {"input": "x", "max_output_tokens": 2, "guided_choice": ["yes", "no"],
                "request_id": "resp_mine", "n": 1}  # fmt: skip
        response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "resp_mine"
    spec = app.state.engine.grammars[0]
    assert spec is not None and spec.kind == "choice"


@pytest.mark.anyio
async def test_the_openai_client_gets_bad_request_errors_with_their_param():
    client = openai_client(app_with())
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(model=MODEL, input="x", tools=[{"type": "file_search"}])
    assert raised.value.body["param"] == "tools.0"


@pytest.mark.anyio
async def test_the_endpoint_needs_the_api_key():
    app = app_with(api_key=KEY)
    async with client_for(app) as client:
        assert_error(await client.post("/v1/responses", json={"input": "x"}), 401)
        assert_error(await client.get("/v1/responses/resp_x"), 401)
    response = await openai_client(app, api_key=KEY).responses.create(
        model=MODEL, input="x", max_output_tokens=1
    )
    assert response.output_text == "a"
