"""Tool calling against the real server (bundled SmolLM2, whose template has no tools: the
generic format), through the official openai client: every call's arguments validate against
its tool's schema, and a stream adds up to the non-streamed response for the same seed."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import Server

WEATHER = {
    "type": "function",
    "function": {
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
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def _random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A small object schema: strings (bounded), integers, numbers, booleans, enums, arrays
    and (once) a nested object; some properties required."""
    kinds = ["string", "integer", "number", "boolean", "enum", "array"]
    if depth == 0:
        kinds.append("object")
    properties: dict[str, Any] = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        if kind == "string":
            schema: dict[str, Any] = {"type": "string", "maxLength": rng.randint(1, 12)}
        elif kind == "integer":
            schema = {"type": "integer", "minimum": -50, "maximum": 50}
        elif kind == "enum":
            schema = {"enum": rng.sample(["red", "green", "blue", "cyan", "x y"], 3)}
        elif kind == "array":
            schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                      "maxItems": 3}  # fmt: skip
        elif kind == "object":
            schema = _random_schema(rng, depth + 1)
        else:
            schema = {"type": kind}
        properties[f"p{i}_{kind}"] = schema
    required = rng.sample(sorted(properties), rng.randint(0, len(properties)))
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}  # fmt: skip


def _streamed(stream: Any) -> tuple[str | None, list[tuple[str, str]], str | None]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            entry = calls.setdefault(piece.index, ["", ""])
            if piece.id is not None:
                assert piece.id.startswith("call_") and piece.type == "function"
                entry[0] = piece.function.name
            entry[1] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content or None, [tuple(c) for c in calls.values()], finish


def _whole(response: Any) -> tuple[str | None, list[tuple[str, str]], str | None]:
    choice = response.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return choice.message.content, calls, choice.finish_reason


def test_named_tool_choice_always_validates_and_streams_the_same(server: Server) -> None:
    client, rng = _client(server), random.Random(7)
    for case in range(6):
        schema = _random_schema(rng)
        tool = {"type": "function", "function": {"name": f"tool_{case}", "parameters": schema}}
        kwargs: dict[str, Any] = dict(
            model="smol", messages=MESSAGES, tools=[WEATHER, tool], max_tokens=160,
            tool_choice={"type": "function", "function": {"name": f"tool_{case}"}},
            temperature=0.8, seed=case,
        )  # fmt: skip
        whole = _whole(client.chat.completions.create(**kwargs))
        content, calls, finish = whole
        assert content is None and finish == "tool_calls", whole
        assert [name for name, _ in calls] == [f"tool_{case}"]
        jsonschema.validate(json.loads(calls[0][1]), schema)
        assert _streamed(client.chat.completions.create(stream=True, **kwargs)) == whole


def test_required_auto_and_none(server: Server) -> None:
    client = _client(server)
    common: dict[str, Any] = dict(model="smol", messages=MESSAGES, tools=[WEATHER],
                                  max_tokens=80, temperature=0)  # fmt: skip
    required = client.chat.completions.create(
        tool_choice="required", parallel_tool_calls=False, **common
    )
    content, calls, finish = _whole(required)
    assert finish == "tool_calls" and len(calls) == 1 and calls[0][0] == "get_weather"
    jsonschema.validate(json.loads(calls[0][1]), WEATHER["function"]["parameters"])
    stream = client.chat.completions.create(
        tool_choice="required", parallel_tool_calls=False, stream=True, **common
    )
    assert _streamed(stream) == (content, calls, finish)

    for choice in ("auto", "none"):  # this small model answers in text here
        whole = _whole(client.chat.completions.create(tool_choice=choice, **common))
        streamed = _streamed(
            client.chat.completions.create(tool_choice=choice, stream=True, **common)
        )
        assert streamed == whole
        for _name, arguments in whole[1]:  # were it to call one, the call is valid
            jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_tool_results_round_trip(server: Server) -> None:
    client = _client(server)
    first = client.chat.completions.create(
        model="smol", messages=MESSAGES, tools=[WEATHER], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(
        model="smol", messages=history, tools=[WEATHER], max_tokens=20, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    usage = second.usage
    assert usage is not None and usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "objekt"}}}}}], "auto", "tools"),
        ([WEATHER], {"type": "function", "function": {"name": "other"}}, "tool_choice"),
        (None, "required", "tool_choice"),
    ],
)  # fmt: skip
def test_bad_tools_are_400s(server: Server, tools: Any, choice: Any, param: str) -> None:
    body = {"model": "smol", "messages": MESSAGES, "tools": tools, "tool_choice": choice}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
