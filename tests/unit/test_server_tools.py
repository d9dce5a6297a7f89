"""Tools through the real HTTP app over a scripted engine (its output is given text): the
request side (template, constraint, 400s) and the response side (tool_calls, finish_reason,
the stream's deltas adding up to the whole response), for each tool-call format."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.unit.fake_engine import FakeAsyncEngine, assert_error, client_for, make_app, sse_events
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.tools.formats import FORMATS

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS_TEMPLATE = (
    "{% if tools %}[TOOLS {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}]"
    "<tool_call>{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}[CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}]{% endfor %}{% endif %}<|end|>{% endfor %}"
)


class ScriptedEngine(FakeAsyncEngine):
    """Every sequence writes `script` in pieces of random sizes (seeded), then stops."""

    max_model_len = 4096  # room for the tools' system message

    def __init__(self, script: str, seed: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.script, self.rng = script, random.Random(seed)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, **kw: Any
    ) -> AsyncIterator[RequestOutput]:
        self.requests.append((prompt_token_ids, params, request_id))
        self.grammars.append(kw.get("grammar"))
        cut = 0
        while cut < len(self.script):
            start = cut if params.output_kind is RequestOutputKind.DELTA else 0
            cut = min(len(self.script), cut + self.rng.randint(1, 4))
            done = cut == len(self.script)
            seqs = [
                CompletionOutput(
                    k, self.script[start:cut], list(range(start, cut)), "stop" if done else None
                )
                for k in range(params.n)
            ]
            yield RequestOutput(request_id, prompt_token_ids, seqs, finished=done)


def _body(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER], **extra}


def _collect_stream(body: str) -> dict[int, dict[str, Any]]:
    choices: dict[int, dict[str, Any]] = {}
    for event in sse_events(body)[:-1]:
        for choice in json.loads(event)["choices"]:
            entry = choices.setdefault(
                choice["index"], {"content": "", "calls": {}, "finish": None}
            )
            delta = choice["delta"]
            entry["content"] += delta.get("content") or ""
            for piece in delta.get("tool_calls") or []:
                call = entry["calls"].setdefault(
                    piece["index"], {"id": None, "name": None, "arguments": ""}
                )
                if "id" in piece:
                    assert call["id"] is None and piece["type"] == "function"
                    call["id"], call["name"] = piece["id"], piece["function"]["name"]
                call["arguments"] += piece["function"]["arguments"]
            entry["finish"] = choice["finish_reason"] or entry["finish"]
    return choices


@pytest.mark.anyio
@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral", "pythonic"])
@pytest.mark.parametrize("seed", range(4))
async def test_streamed_calls_add_up_to_the_whole_response(parser, seed):
    fmt = FORMATS[parser]
    script = (
        "Checking.\n"
        + fmt.call_text("get_weather", '{"city": "Paris"}')
        + fmt.call_text("get_weather", '{"city": "Rome \\"x\\""}')
    )
    engine = ScriptedEngine(script, seed)
    async with client_for(make_app(engine, tool_call_parser=parser)) as client:
        whole = await client.post("/v1/chat/completions", json=_body(n=2))
        streamed = await client.post("/v1/chat/completions", json=_body(n=2, stream=True))
    assert whole.status_code == 200, whole.text
    stream = _collect_stream(streamed.text)
    for choice in whole.json()["choices"]:
        message = choice["message"]
        assert choice["finish_reason"] == "tool_calls"
        assert message["content"] == "Checking."
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
        assert calls == [
            ("get_weather", '{"city": "Paris"}'),
            ("get_weather", '{"city": "Rome \\"x\\""}'),
        ]
        assert all(
            c["id"].startswith("call_") and c["type"] == "function" for c in message["tool_calls"]
        )
        got = stream[choice["index"]]
        assert got["content"] == message["content"] and got["finish"] == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in got["calls"].values()] == calls
    spec = engine.grammars[0]
    assert spec.kind == "structural_tag" and spec.backend == "xgrammar"
    trigger = "[get_weather(" if fmt.pythonic else fmt.trigger
    assert json.loads(spec.value)["format"]["triggers"] == [trigger]


@pytest.mark.anyio
async def test_plain_answers_and_tool_choice_none_are_text():
    engine = ScriptedEngine("It is sunny.\n")
    async with client_for(make_app(engine)) as client:
        auto = await client.post("/v1/chat/completions", json=_body())
        none = await client.post("/v1/chat/completions", json=_body(tool_choice="none"))
    for response in (auto, none):
        choice = response.json()["choices"][0]
        assert choice["message"] == {
            "role": "assistant",
            "content": "It is sunny.\n",
            "tool_calls": [],
        }
        assert choice["finish_reason"] == "stop"
    assert engine.grammars[0].kind == "structural_tag" and engine.grammars[1] is None


@pytest.mark.anyio
@pytest.mark.parametrize("choice", ["required", "auto"])
async def test_an_empty_tools_list_is_no_tools_as_openai_takes_it(choice):
    """vLLM (after OpenAI): `tools: []` with tool_choice "required" or "auto" answers in text,
    unconstrained, the template given no tools."""
    engine = ScriptedEngine("It is sunny.\n")
    async with client_for(make_app(engine)) as client:
        response = await client.post(
            "/v1/chat/completions", json=_body(tools=[], tool_choice=choice)
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "It is sunny.\n"
    assert engine.grammars == [None]


@pytest.mark.anyio
async def test_templates_get_the_tools_and_earlier_calls():
    engine = ScriptedEngine("ok")
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    async with client_for(make_app(engine)) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=_body(messages=history, chat_template=TOOLS_TEMPLATE, tool_choice="none"),
        )
        assert response.status_code == 200, response.text
        generic = await client.post("/v1/chat/completions", json=_body(messages=history))
        assert generic.status_code == 200, generic.text
    prompts = [bytes(i - 2 for i in r[0] if i >= 2).decode() for r in engine.requests]
    assert prompts[0].startswith("[TOOLS get_weather]")
    assert '[CALL get_weather {"city": "Paris"}]' in prompts[0]
    assert "<|tool|>sunny" in prompts[0]
    # the fake's own template renders no tools: a system message describes them, and the
    # earlier call is written as the model is asked to write calls
    assert prompts[1].startswith("<|system|>You can call the following functions")
    assert FORMATS["generic"].call_text("get_weather", '{"city": "Paris"}') in prompts[1]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tools": None, "tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "x y"}}]}, "tools.0.function.name"),
        ({"response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [WEATHER] * 129}, "tools"),
    ],
)  # fmt: skip
async def test_bad_tool_requests(extra, param):
    async with client_for(make_app(ScriptedEngine("x"))) as client:
        response = await client.post("/v1/chat/completions", json=_body(**extra))
    assert_error(response, 400, param)


def _deep_schema(depth: int) -> dict[str, Any]:
    """Arrays of arrays: `depth` nested objects."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.anyio
async def test_hostile_tools_at_and_past_every_limit():
    many = [{"type": "function", "function": {"name": f"t{i}", "parameters": {
        "type": "object", "properties": {f"p{j}": {"type": "string"} for j in range(8)}}}}
        for i in range(128)]  # fmt: skip
    looping = (
        "{% for a in tools %}{% for b in tools %}{% for c in tools %}{{ a }}{{ b }}{{ c }}"
        "{% endfor %}{% endfor %}{% endfor %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    deep = {"type": "function", "function": {"name": "deep", "parameters": _deep_schema(64)}}
    deeper = {"type": "function", "function": {"name": "deep", "parameters": _deep_schema(65)}}
    engine = ScriptedEngine("ok")
    engine.max_model_len = 100_000  # a byte per token: the tools' system message is long
    async with client_for(make_app(engine)) as client:
        at_limit = await client.post("/v1/chat/completions", json=_body(tools=many))
        assert at_limit.status_code == 200, at_limit.text  # 128 tools: the cap, accepted
        ok = await client.post("/v1/chat/completions", json=_body(tools=[deep]))
        assert ok.status_code == 200, ok.text  # nested 64 deep: the cap, accepted
        assert_error(await client.post("/v1/chat/completions", json=_body(tools=[deeper])), 400,
                     "tools.0.function.parameters")  # fmt: skip
        # a template that loops over the tools cubed stays inside the renderer's budget
        loop = await client.post(
            "/v1/chat/completions",
            json=_body(tools=many, tool_choice="none", chat_template=looping),
        )
        message = assert_error(loop, 400, None)
        assert "characters" in message or "seconds" in message, message
        assert (await client.post("/v1/chat/completions", json=_body())).status_code == 200
