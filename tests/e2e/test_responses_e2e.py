"""The Responses API against the real server (bundled SmolLM2, the generic tool format),
through the official openai client: text, the streamed events and their order, function
calls, json_schema output, previous_response_id, and 400s that name the field."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import Server

MODEL = "smol"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _items(output: list[Any]) -> list[dict[str, Any]]:
    """Output items without their ids (random on each response)."""
    return [item.model_dump(exclude={"id", "call_id"}, exclude_none=True) for item in output]


def test_a_text_response_parses_and_has_output_text(server: Server) -> None:
    response = _client(server).responses.create(
        model=MODEL, input="What is the capital of France?", instructions="Answer briefly.",
        max_output_tokens=24, temperature=0, metadata={"case": "text"},
    )  # fmt: skip
    assert response.id.startswith("resp_") and response.model == MODEL
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.output[0].type == "message" and response.metadata == {"case": "text"}
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 24


def test_the_stream_follows_the_documented_order_and_adds_up(server: Server) -> None:
    client = _client(server)
    args: dict[str, Any] = dict(
        model=MODEL, input="Tell me about Paris.", max_output_tokens=20, temperature=0.8,
        extra_body={"seed": 11},
    )  # fmt: skip
    whole = client.responses.create(**args)
    events = list(client.responses.create(**args, stream=True))
    types = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert types[:4] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
    ]  # fmt: skip
    assert types[-4:-1] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
    ]  # fmt: skip
    assert types[-1] == ("response.incomplete" if whole.status == "incomplete" else
                         "response.completed")  # fmt: skip
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    with client.responses.stream(**args) as helper:
        deltas = [e.delta for e in helper if e.type == "response.output_text.delta"]
    assert "".join(deltas) == text


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_function_calls_follow_the_tool_schema(server: Server, tool_choice: Any) -> None:
    client = _client(server)
    args: dict[str, Any] = dict(
        model=MODEL, input="What is the weather like in Paris today?", tools=[WEATHER],
        tool_choice=tool_choice, max_output_tokens=120, temperature=0.7, extra_body={"seed": 3},
    )  # fmt: skip
    response = client.responses.create(**args)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and response.status == "completed"
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    events = list(client.responses.create(**args, stream=True))
    assert _items(events[-1].response.output) == _items(response.output)
    arguments = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    assert arguments == "".join(call.arguments for call in calls)
    follow_up = client.responses.create(
        model=MODEL, tools=[WEATHER], max_output_tokens=16, temperature=0,
        input=[
            {"role": "user", "content": "What is the weather like in Paris today?"},
            *[c.model_dump(exclude_none=True) for c in calls],
            *[{"type": "function_call_output", "call_id": c.call_id, "output": "22 C, sunny"}
              for c in calls],
        ],
    )  # fmt: skip
    assert follow_up.status in ("completed", "incomplete")


def test_json_schema_output_validates(server: Server) -> None:
    response = _client(server).responses.create(
        model=MODEL, input="Describe a person as JSON.", max_output_tokens=80, temperature=0.7,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                         "strict": True}},
        extra_body={"seed": 5},
    )  # fmt: skip
    assert response.status == "completed", response.output_text
    jsonschema.validate(json.loads(response.output_text), PERSON)


def test_previous_response_id_round_trip(server: Server) -> None:
    client = _client(server)
    first = client.responses.create(
        model=MODEL, input="My name is Ada.", max_output_tokens=8, temperature=0
    )
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id,
        max_output_tokens=8, temperature=0,
    )  # fmt: skip
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert client.responses.retrieve(second.id).output_text == second.output_text
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")
    assert raised.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input.0.content.0"),
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
    ],
)  # fmt: skip
def test_what_cannot_be_served_is_a_400_naming_the_field(
    server: Server, extra: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "input": "hello", **extra}
    response = httpx.post(f"{server.url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_endpoint_needs_the_api_key(auth_server: Server) -> None:
    response = httpx.post(f"{auth_server.url}/v1/responses", json={"input": "x"}, timeout=30)
    assert response.status_code == 401
