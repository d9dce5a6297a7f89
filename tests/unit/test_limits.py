"""Request limits through the HTTP app (fake engine): each cap is a 400 naming the parameter,
the limit and the value, before any work it bounds; the server keeps serving afterwards."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.unit.fake_engine import FakeAsyncEngine, assert_error, client_for, make_app
from tokenmill.errors import InvalidRequestError
from tokenmill.server.limits import RequestLimits
from tokenmill.server.settings import ServerSettings
from tokenmill.structured import spec_from_request_fields
from tokenmill.tokenizer.template_sandbox import RenderBudget

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "q"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
VOCAB = FakeAsyncEngine.vocab_size  # 258
OK = {"prompt": "ok", "max_tokens": 1}


async def limited_client(**limits: Any) -> httpx.AsyncClient:
    return client_for(make_app(FakeAsyncEngine(), limits=RequestLimits(**limits)))


async def assert_400(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str, *fragments: str
) -> None:
    """A 400 naming `param` whose message has every fragment; then a normal request works."""
    message = assert_param(await client.post(path, json=body), param)
    for fragment in fragments:
        assert fragment in message, message
    assert (await client.post(COMPLETIONS, json=OK)).status_code == 200


def assert_param(response: httpx.Response, param: str) -> str:
    """A 400 naming `param` (or a part of it: `logit_bias.5`); returns the message."""
    message = assert_error(response, 400)
    named = response.json()["error"]["param"]
    assert named == param or named.startswith(f"{param}."), (named, message)
    return message


def test_defaults() -> None:
    limits = ServerSettings(served_model_names=["m"]).limits
    assert (limits.max_n, limits.max_logprobs, limits.max_stop, limits.max_logit_bias) == (
        128, 20, 64, 2048,
    )  # fmt: skip
    assert limits.max_json_schema_depth == 64 and limits.max_messages == 2048
    assert limits.max_input_chars == 4 * 2**20
    assert limits.render_budget == RenderBudget()  # the offline API renders with the same


# --- n, best_of, logprobs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (COMPLETIONS, {"prompt": "x", "n": 10**9}),
        (COMPLETIONS, {"prompt": ["a", "b"], "n": 10**9, "stream": True}),
        (CHAT, {"messages": USER, "n": 10**9}),
        (CHAT, {"messages": USER, "n": 10**9, "stream": True}),
    ],
)
async def test_huge_n_is_rejected_before_any_work(
    client: httpx.AsyncClient, engine: FakeAsyncEngine, path: str, body: dict[str, Any]
) -> None:
    start = time.monotonic()
    r = await client.post(path, json=body)
    assert time.monotonic() - start < 5  # nothing was copied n times
    assert assert_error(r, 400, "n") == "n must be <= 128; got 1000000000"
    assert engine.requests == []


async def test_n_and_best_of_at_the_cap(client: httpx.AsyncClient, engine: FakeAsyncEngine) -> None:
    r = await client.post(COMPLETIONS, json={"prompt": "x", "n": 128, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 128
    await assert_400(
        client, COMPLETIONS, {"prompt": "x", "best_of": 129}, "best_of", "<= 128", "got 129"
    )


async def test_max_n_is_configurable() -> None:
    async with await limited_client(max_n=4) as c:
        await assert_400(c, CHAT, {"messages": USER, "n": 5}, "n", "n must be <= 4; got 5")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"messages": USER, "prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
async def test_logprobs_over_20(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    await assert_400(client, path, body, param, "20", "21")


async def test_max_logprobs_is_configurable() -> None:
    async with await limited_client(max_logprobs=5) as c:
        await assert_400(c, COMPLETIONS, {"prompt": "x", "logprobs": 6}, "logprobs", "5", "6")
        body = {"messages": USER, "logprobs": True, "top_logprobs": 6}
        await assert_400(c, CHAT, body, "top_logprobs", "[0, 5]; got 6")


# --- Prompt length and token ids ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, {"prompt": "x" * 70, "max_tokens": None}, "prompt"),
        (COMPLETIONS, {"prompt": [5] * 70, "max_tokens": 1}, "max_tokens"),
        (CHAT, {"messages": [{"role": "user", "content": "x" * 70}]}, "messages"),
    ],
)
async def test_prompt_longer_than_the_context(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    await assert_400(client, path, body, param, "maximum context length is 64 tokens")


@pytest.mark.parametrize("prompt", [[1, VOCAB], [-1], [[1, 2], [3, 10**6]]])
async def test_prompt_token_ids_outside_the_vocabulary(
    client: httpx.AsyncClient, prompt: list[Any]
) -> None:
    await assert_400(client, COMPLETIONS, {"prompt": prompt}, "prompt", f"[0, {VOCAB})")


# --- Stop strings and token-id lists -----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"stop": [f"s{i}" for i in range(65)]}, "stop", "at most 64 strings; got 65"),
        ({"stop": ["ok", "x" * 1025]}, "stop", "stop[1] may have at most 1024 characters; got 1025"),
        ({"stop": "x" * 1025}, "stop", "at most 1024 characters"),
        ({"stop_token_ids": [1] * 1025}, "stop_token_ids", "at most 1024 entries; got 1025"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids", f"[0, {VOCAB})"),
    ],
)  # fmt: skip
async def test_stop_limits(
    client: httpx.AsyncClient, body: dict[str, Any], param: str, fragment: str
) -> None:
    await assert_400(client, COMPLETIONS, {"prompt": "x", **body}, param, fragment)


@pytest.mark.parametrize(
    ("logit_bias", "fragment"),
    [
        ({str(i): 1 for i in range(2049)}, "at most 2048 entries; got 2049"),
        ({str(VOCAB): 1}, f"outside the vocabulary [0, {VOCAB})"),
        ({"-1": 1}, "outside the vocabulary"),
        ({"a": 1}, "must be token ids"),
        ({"5": 100.5}, "[-100, 100]"),
        ({"5": -1000}, "[-100, 100]"),
    ],
)
async def test_logit_bias_limits(
    client: httpx.AsyncClient, logit_bias: dict[str, float], fragment: str
) -> None:
    body = {"prompt": "x", "logit_bias": logit_bias}
    await assert_400(client, COMPLETIONS, body, "logit_bias", fragment)


@pytest.mark.parametrize(
    ("allowed", "fragment"),
    [
        ([1, VOCAB], f"outside the vocabulary [0, {VOCAB})"),
        ([-3], "outside the vocabulary"),
        ([1] * (VOCAB + 1), f"at most {VOCAB} entries; got {VOCAB + 1}"),
        ([], "must not be empty"),
    ],
)
async def test_allowed_token_ids_limits(
    client: httpx.AsyncClient, allowed: list[int], fragment: str
) -> None:
    body = {"prompt": "x", "allowed_token_ids": allowed}
    await assert_400(client, COMPLETIONS, body, "allowed_token_ids", fragment)


# --- Structured outputs ------------------------------------------------------------------


def nested_schema(depth: int) -> dict[str, Any]:
    """A schema whose objects nest `depth` levels."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    ("constraint", "param", "fragment"),
    [
        ({"guided_json": {"type": "object", "description": "x" * 70_000}}, "guided_json",
         "at most 65536 characters (as compact JSON)"),
        ({"guided_json": nested_schema(100)}, "guided_json",
         "nested more than 64 levels deep (the limit)"),
        ({"guided_json": "[" * 100_000 + "]" * 100_000}, "guided_json", "nested too deeply"),
        ({"guided_json": json.dumps(nested_schema(80))}, "guided_json", "more than 64 levels deep"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": nested_schema(70)}}},
         "response_format.json_schema.schema", "64 levels"),
        ({"structured_outputs": {"json": nested_schema(70)}}, "structured_outputs.json",
         "64 levels"),
        ({"guided_regex": "a" * 16_385}, "guided_regex", "at most 16384 characters; got 16385"),
        ({"guided_grammar": 'root ::= "' + "a" * 65_536 + '"'}, "guided_grammar",
         "at most 65536 characters"),
        ({"guided_choice": [str(i) for i in range(1025)]}, "guided_choice",
         "at most 1024 choices; got 1025"),
        ({"guided_choice": ["x" * 40_000, "y" * 40_000]}, "guided_choice",
         "at most 65536 characters in all choices; got 80000"),
    ],
)  # fmt: skip
async def test_structured_output_limits(
    client: httpx.AsyncClient, constraint: dict[str, Any], param: str, fragment: str
) -> None:
    await assert_400(client, COMPLETIONS, {"prompt": "x", **constraint}, param, fragment)


def test_schema_depth_check_ends_on_a_cyclic_schema() -> None:
    schema: dict[str, Any] = {"type": "object"}
    schema["properties"] = {"self": schema}  # only the offline API can pass one
    with pytest.raises(InvalidRequestError, match="more than 64 levels deep"):
        spec_from_request_fields(guided_json=schema)


async def test_schema_at_the_depth_limit_is_accepted(client: httpx.AsyncClient) -> None:
    body = {"prompt": "x", "max_tokens": 1, "guided_json": nested_schema(64)}
    assert (await client.post(COMPLETIONS, json=body)).status_code == 200


# --- Prompts and messages ----------------------------------------------------------------


async def test_message_and_prompt_counts() -> None:
    async with await limited_client(max_messages=3, max_prompts=2) as c:
        await assert_400(c, CHAT, {"messages": USER * 4}, "messages", "at most 3 messages; got 4")
        await assert_400(c, "/tokenize", {"messages": USER * 4}, "messages", "at most 3")
        body = {"prompt": ["a", "b", "c"]}
        await assert_400(c, COMPLETIONS, body, "prompt", "at most 2 prompts; got 3")
        await assert_400(c, COMPLETIONS, {"prompt": [[1], [2], [3]]}, "prompt", "at most 2")
        assert (await c.post(COMPLETIONS, json={"prompt": [1, 2, 3], "max_tokens": 1})).is_success


async def test_message_count_default_is_2048(client: httpx.AsyncClient) -> None:
    body = {"messages": USER * 2049}
    await assert_400(client, CHAT, body, "messages", "at most 2048 messages; got 2049")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "x" * 101}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": "xy"}] * 60}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 60}]},
                             {"role": "user", "content": "y" * 60}]}, "messages"),
        (CHAT, {"messages": USER, "documents": [{"title": "t", "text": "x" * 100}]}, "messages"),
        (COMPLETIONS, {"prompt": "x" * 101}, "prompt"),
        (COMPLETIONS, {"prompt": ["x" * 60, "y" * 60]}, "prompt"),
        ("/tokenize", {"prompt": "x" * 101}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x" * 101}]}, "messages"),
    ],
)  # fmt: skip
async def test_input_text_size(path: str, body: dict[str, Any], param: str) -> None:
    async with await limited_client(max_input_chars=100) as c:
        await assert_400(c, path, body, param, "at most 100 characters")


async def test_request_template_size() -> None:
    async with await limited_client(max_chat_template_chars=50) as c:
        body = {"messages": USER, "chat_template": "{{ messages }}" + " " * 50}
        await assert_400(c, CHAT, body, "chat_template", "at most 50 characters; got 64")


# --- Malformed bodies --------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize(
    "content",
    [
        "[1, 2]",
        '"a string"',
        "null",
        "42",
        "true",
        "",
        '{"prompt": "x"',  # truncated
        "{'prompt': 'x'}",  # not JSON
        "[" * 100_000 + "]" * 100_000,  # nested deeper than the decoder recurses
        '{"prompt": "x", "n": ' + "9" * 5000 + "}",  # over Python's int-parsing digit limit
    ],
)
async def test_non_object_and_malformed_bodies(
    client: httpx.AsyncClient, path: str, content: str
) -> None:
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "NaN"),
        ("top_p", "Infinity"),
        ("presence_penalty", "Infinity"),
        ("frequency_penalty", "-Infinity"),
        ("min_p", "NaN"),
        ("repetition_penalty", "NaN"),
        ("logit_bias", '{"5": NaN}'),
        ("logit_bias", '{"5": Infinity}'),
    ],
)
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_non_finite_floats_are_400(
    client: httpx.AsyncClient, engine: FakeAsyncEngine, path: str, field: str, value: str
) -> None:
    head = '"prompt": "x"' if path == COMPLETIONS else f'"messages": {json.dumps(USER)}'
    content = f'{{{head}, "{field}": {value}}}'
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert "finite" in assert_param(r, field)
    assert engine.requests == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": [["user", "hi"]]}, "messages.0"),
        ({"messages": USER, "n": "many"}, "n"),
        ({"messages": USER, "n": 1.5}, "n"),
        ({"messages": USER, "stop": 5}, "stop"),
        ({"messages": USER, "logit_bias": [1, 2]}, "logit_bias"),
        ({"messages": USER, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
        ({"messages": USER, "max_tokens": {"a": 1}}, "max_tokens"),
    ],
)
async def test_wrong_types_are_400(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    await assert_400(client, CHAT, body, param)


# --- Untrusted chat templates ------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
         "took over 1 s"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
        ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(64) }}",
         "took over 1 s"),
        ("{{ 'x' * 10**9 }}", "chat template error"),
        ("{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}", "output over"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ cycler.__init__.__globals__ }}", "unsafe"),
        ("{{ self._TemplateReference__context }}", "unsafe"),
    ],
)  # fmt: skip
async def test_malicious_request_templates_are_400_and_the_server_recovers(
    template: str, fragment: str
) -> None:
    async with await limited_client(max_template_seconds=1.0) as c:
        start = time.monotonic()
        body = {"messages": USER, "chat_template": template}
        r = await c.post(CHAT, json=body)
        assert time.monotonic() - start < 30  # bounded by the budget, not by the template
        assert fragment in assert_error(r, 400, "chat_template")
        ok = await c.post(CHAT, json={"messages": USER, "max_tokens": 1})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "a"


async def test_malicious_model_template_fails_chat_but_not_the_server() -> None:
    evil = FakeAsyncEngine(chat_template="{{ cycler.__init__.__globals__.os.system('id') }}")
    async with client_for(make_app(evil)) as c:
        assert "unsafe" in assert_error(await c.post(CHAT, json={"messages": USER}), 400)
        assert (await c.post(COMPLETIONS, json=OK)).status_code == 200


@pytest.mark.parametrize(
    "key", ["messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "tokenize",
            "raise_exception", "range", "namespace"],
)  # fmt: skip
async def test_chat_template_kwargs_cannot_override_reserved_names(
    client: httpx.AsyncClient, key: str
) -> None:
    body = {"messages": USER, "chat_template_kwargs": {key: "x"}}
    await assert_400(client, CHAT, body, "chat_template_kwargs", key)


def test_max_logprobs_flag_sets_the_server_and_engine_caps() -> None:
    from tokenmill.server.cli import _server_settings, build_parser

    args = build_parser().parse_args(["serve", "--max-logprobs", "30"])
    assert _server_settings(args).limits.max_logprobs == 30
    assert args.max_logprobs == 30  # passed to EngineConfig as max_logprobs
    default = build_parser().parse_args(["serve"])
    assert _server_settings(default).limits.max_logprobs == 20
