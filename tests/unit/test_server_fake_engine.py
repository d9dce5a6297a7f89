"""The HTTP server against a fake engine: routes, envelopes, auth, SSE, cancellation."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest

from tests.unit.fake_engine import (
    KEY,
    MODEL,
    ByteTokenizer,
    FakeAsyncEngine,
    assert_error,
    client_for,
    make_app,
    sse_events,
)
from tokenmill.engine.client import EngineStats
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.server.app import build_app
from tokenmill.server.settings import ServerSettings

pytestmark = pytest.mark.anyio

# --- Completions ---------------------------------------------------------------------


async def test_completion_response_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "text": "abcde",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


async def test_completion_prompt_forms_and_choice_indexes(
    client: httpx.AsyncClient, engine: FakeAsyncEngine
) -> None:
    r = await client.post("/v1/completions", json={"prompt": ["a", "bb"], "n": 2, "max_tokens": 2})
    assert [(c["index"], c["text"]) for c in r.json()["choices"]] == [
        (0, "ab"), (1, "bc"), (2, "ab"), (3, "bc")
    ]  # fmt: skip
    assert r.json()["usage"]["prompt_tokens"] == 2 + 3  # BOS each, counted once per prompt
    await client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1})
    assert engine.requests[-1][0] == [5, 6, 7]
    r = await client.post("/v1/completions", json={"prompt": [[5], [6, 7]], "max_tokens": 1})
    assert len(r.json()["choices"]) == 2 and engine.requests[-1][0] == [6, 7]


async def test_completion_echo_stop_and_params(
    client: httpx.AsyncClient, engine: FakeAsyncEngine
) -> None:
    body = {"prompt": "xy", "max_tokens": 6, "echo": True, "stop": "d", "seed": 7}
    r = await client.post("/v1/completions", json=body | {"logit_bias": {"5": 3}})
    choice = r.json()["choices"][0]
    assert choice["text"] == "xyabc"
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "d")
    params = engine.requests[-1][1]
    assert params.stop == ["d"] and params.seed == 7 and params.logit_bias == {5: 3.0}
    r = await client.post(
        "/v1/completions", json={"prompt": [72, 73], "echo": True, "max_tokens": 0}
    )
    assert r.json()["choices"][0] == {
        "index": 0, "text": "FG", "logprobs": None, "finish_reason": "length", "stop_reason": None
    }  # fmt: skip


async def test_max_tokens_none_fills_the_context(
    client: httpx.AsyncClient, engine: FakeAsyncEngine
) -> None:
    await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": None})
    assert engine.requests[-1][1].max_tokens == 64 - 4


async def test_the_models_sampling_defaults_fill_only_unset_fields(
    client: httpx.AsyncClient, engine: FakeAsyncEngine
) -> None:
    engine.sampling_defaults = {"temperature": 0.3, "top_p": 0.8, "top_k": 5, "max_tokens": 7}
    await client.post("/v1/completions", json={"prompt": "abc"})
    params = engine.requests[-1][1]
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.3, 0.8, 5, 7)
    body = {"prompt": "abc", "temperature": 1.0, "top_k": -1, "max_tokens": 3, "min_p": 0.1}
    await client.post("/v1/completions", json=body)
    params = engine.requests[-1][1]
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (1.0, 0.8, -1, 3)
    assert params.min_p == 0.1 and params.repetition_penalty == 1.0  # no default: vLLM's
    messages = [{"role": "user", "content": "hi"}]
    await client.post("/v1/chat/completions", json={"messages": messages})
    params = engine.requests[-1][1]
    assert (params.temperature, params.max_tokens) == (0.3, 7)
    await client.post(
        "/v1/chat/completions",
        json={"messages": messages, "temperature": 0, "max_completion_tokens": 2},
    )
    params = engine.requests[-1][1]
    assert (params.temperature, params.max_tokens) == (0.0, 2)


async def test_context_overflow_names_both_numbers(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "x" * 10, "max_tokens": 60})
    message = assert_error(r, 400, "max_tokens")
    assert "64" in message and "71" in message and "11" in message


async def test_completion_stream(client: httpx.AsyncClient) -> None:
    body = {"prompt": "hi", "max_tokens": 4, "stream": True}
    r = await client.post("/v1/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abcd"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)
    r = await client.post(
        "/v1/completions", json=body | {"stream_options": {"include_usage": True}}
    )
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_stream_n_interleaves_by_index(client: httpx.AsyncClient) -> None:
    body = {"prompt": "hi", "max_tokens": 3, "n": 2, "stream": True}
    chunks = [
        json.loads(e)
        for e in sse_events((await client.post("/v1/completions", json=body)).text)[:-1]
    ]
    texts: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "abc", 1: "bcd"}


async def test_the_engine_sends_deltas_and_the_server_folds_them(
    client: httpx.AsyncClient, engine: FakeAsyncEngine
) -> None:
    """The server asks for what is new each step (no step copies a long output) and reads
    the deltas folded into one cumulative output: the same text streamed or whole."""
    body = {"prompt": "hi", "max_tokens": 6, "n": 2, "stop": ["e"]}
    whole = (await client.post("/v1/completions", json=body)).json()
    assert engine.requests[-1][1].output_kind is RequestOutputKind.DELTA
    assert [c["text"] for c in whole["choices"]] == ["abcd", "bcd"]
    assert whole["usage"]["completion_tokens"] == 5 + 4  # (the stop string's tokens count)
    streamed = (await client.post("/v1/completions", json=body | {"stream": True})).text
    texts: dict[int, str] = {}
    for event in sse_events(streamed)[:-1]:
        (choice,) = json.loads(event)["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "abcd", 1: "bcd"}


async def test_error_after_stream_started(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"prompt": "FAIL", "max_tokens": 5, "stream": True}
    )
    events = sse_events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "the fake engine failed"


# --- Chat ----------------------------------------------------------------------------


async def test_chat_response_and_template(
    client: httpx.AsyncClient, engine: FakeAsyncEngine
) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
    ]
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": messages, "max_completion_tokens": 3, "max_tokens": 9},
    )
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == "abc"
    prompt = engine.tokenizer.decode(engine.requests[-1][0])
    assert prompt == "<|system|>be brief<|end|><|user|>one\ntwo<|end|><|assistant|>"
    assert engine.requests[-1][1].max_tokens == 3  # max_completion_tokens wins


async def test_chat_template_options(client: httpx.AsyncClient, engine: FakeAsyncEngine) -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Ans"}]
    body = {
        "messages": messages, "max_tokens": 2, "echo": True,
        "add_generation_prompt": False, "continue_final_message": True,
    }  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    assert engine.tokenizer.decode(engine.requests[-1][0]) == "<|user|>q<|end|><|assistant|>Ans"
    assert r.json()["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Ansab",
        "tool_calls": [],
    }
    body = {
        "messages": messages[:1], "max_tokens": 1, "documents": [{"title": "T", "text": "body"}],
        "chat_template_kwargs": {"greeting": "hey"},
    }  # fmt: skip
    await client.post("/v1/chat/completions", json=body)
    prompt = engine.tokenizer.decode(engine.requests[-1][0])
    assert prompt == "<|user|>q<|end|>[doc:T:body][hey]<|assistant|>"
    body = {
        "messages": messages[:1],
        "max_tokens": 1,
        "chat_template": "{{ messages[0].content }}!",
    }
    await client.post("/v1/chat/completions", json=body)
    assert engine.tokenizer.decode(engine.requests[-1][0]) == "q!"


async def test_chat_stream(client: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == "abc"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 29, "completion_tokens": 3, "total_tokens": 32}


async def test_chat_without_template_is_400_but_completions_work() -> None:
    async with client_for(make_app(FakeAsyncEngine(chat_template=None))) as c:
        r = await c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]}
        )
        assert "no chat template" in assert_error(r, 400)
        assert (await c.post("/v1/completions", json={"prompt": "q"})).status_code == 200
        body = {
            "messages": [{"role": "user", "content": "q"}],
            "chat_template": "{{ messages[0]['content'] }}",
        }
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200


async def test_chat_input_errors(client: httpx.AsyncClient) -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": [image]}]}
    )
    assert "does not accept images" in assert_error(r, 400, "messages.0.content.0")
    bad = {
        "messages": [{"role": "user", "content": "q"}],
        "chat_template": "{{ raise_exception('nope') }}",
    }
    assert "nope" in assert_error(await client.post("/v1/chat/completions", json=bad), 400)
    both = {"messages": [{"role": "user", "content": "q"}], "continue_final_message": True}
    assert_error(
        await client.post("/v1/chat/completions", json=both), 400, "continue_final_message"
    )
    empty = {"messages": []}
    assert_error(await client.post("/v1/chat/completions", json=empty), 400, "messages")
    role = {"messages": [{"role": "wizard", "content": "q"}]}
    assert_error(await client.post("/v1/chat/completions", json=role), 400, "messages.0.role")


# --- Errors and validation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "n": "many"}, "n"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"9999": 1}}, "logit_bias"),
        ({"prompt": [1, 999]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        (
            {"prompt": "x", "guided_json": {}, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            {"prompt": "x", "guided_regex": "a+", "guided_decoding_backend": "nope"},
            "guided_decoding_backend",
        ),
        (
            {
                "prompt": "x",
                "guided_grammar": 'root ::= "a"',
                "guided_decoding_backend": "outlines",
            },
            "guided_grammar",
        ),
        ({"prompt": "x", "guided_choice": []}, "guided_choice"),
        ({"prompt": "x", "structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
        (
            {"prompt": "x", "use_beam_search": True, "n": 2, "guided_choice": ["a", "b"]},
            "guided_choice",
        ),
        (
            {"prompt": "x", "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
    ],
)
async def test_bad_completion_requests_are_400(
    client: httpx.AsyncClient, body: dict[str, Any], param: str | None
) -> None:
    assert_error(await client.post("/v1/completions", json=body), 400, param)
    assert (await client.post("/v1/completions", json={"prompt": "ok"})).status_code == 200


async def test_malformed_bodies_are_400(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    for content in ('{"prompt": "x"', '{"prompt": "x", "temperature": NaN}', "[1, 2]", ""):
        r = await client.post("/v1/completions", content=content, headers=headers)
        assert_error(r, 400)


async def test_unknown_fields_accepted_and_text_format_works(client: httpx.AsyncClient) -> None:
    body = {
        "prompt": "x",
        "max_tokens": 1,
        "some_future_field": {"a": 1},
        "response_format": {"type": "text"},
    }
    assert (await client.post("/v1/completions", json=body)).status_code == 200


@pytest.mark.parametrize(
    ("path", "constraint", "kind", "param"),
    [
        ("/v1/completions", {"guided_regex": "[0-9]+"}, "regex", "guided_regex"),
        ("/v1/chat/completions", {"guided_choice": ["a", "b"]}, "choice", "guided_choice"),
        ("/v1/completions", {"response_format": {"type": "json_object"}}, "json_object",
         "response_format"),
        ("/v1/chat/completions",
         {"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "object"}}}},
         "json", "response_format.json_schema.schema"),
        ("/v1/chat/completions", {"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar",
         "structured_outputs.grammar"),
    ],
)  # fmt: skip
async def test_constraints_reach_the_engine_compiled(
    client: httpx.AsyncClient,
    engine: FakeAsyncEngine,
    path: str,
    constraint: dict[str, Any],
    kind: str,
    param: str,
) -> None:
    prompt = (
        {"prompt": "x"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "q"}]}
    )
    r = await client.post(path, json={**prompt, "max_tokens": 1, **constraint})
    assert r.status_code == 200, r.text
    spec = engine.requests[-1][1].structured_outputs
    assert spec is not None and (spec.kind, spec.param) == (kind, param)
    assert engine.grammars[-1] is spec  # compiled before admission, handed to the engine


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert "gpt-4" in assert_error(r, 404, "model")
    r = await client.post(
        "/v1/completions", json={"model": "alias", "prompt": "x", "max_tokens": 1}
    )
    assert r.json()["model"] == "alias"


async def test_unexpected_errors_are_generic_500(engine: FakeAsyncEngine) -> None:
    def broken() -> EngineStats:
        raise RuntimeError("secret internals")

    engine.stats = broken  # type: ignore[method-assign]
    app = make_app(engine)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    async with client_for(app, raise_app_exceptions=False) as c:
        r = await c.get("/boom")
        assert r.status_code == 500 and "secret" not in r.text
        assert r.json()["error"]["message"] == "internal server error"
        assert (await c.get("/metrics")).status_code == 200  # a broken engine does not break it


async def test_engine_down_is_503(engine: FakeAsyncEngine, client: httpx.AsyncClient) -> None:
    engine.alive = False
    assert_error(await client.get("/health"), 503)
    assert_error(await client.post("/v1/completions", json={"prompt": "x"}), 503)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_overload_is_503_with_retry_after_streaming_or_not(
    engine: FakeAsyncEngine, client: httpx.AsyncClient, path: str, stream: bool
) -> None:
    engine.overloaded = True
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    r = await client.post(path, json=body)
    assert_error(r, 503)
    assert r.headers["retry-after"] == "1"


async def test_cache_salt_reaches_the_engine(
    engine: FakeAsyncEngine, client: httpx.AsyncClient
) -> None:
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert (await client.post("/v1/chat/completions", json={**chat, "cache_salt": "t1"})).is_success
    completion = {"prompt": "x", "max_tokens": 1, "cache_salt": "t2"}
    assert (await client.post("/v1/completions", json=completion)).is_success
    assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).is_success
    assert engine.cache_salts == ["t1", "t2", None]
    assert_error(await client.post("/v1/completions", json={**completion, "cache_salt": ""}), 400)


# --- Auth, CORS, operational routes -------------------------------------------------


async def test_key_is_checked_before_the_body_is_read() -> None:
    settings = ServerSettings(served_model_names=[MODEL], api_key=KEY, max_request_body_bytes=1000)
    app = build_app(FakeAsyncEngine(), settings)
    body = {"prompt": "x" * 2000}
    async with client_for(app) as c:
        assert_error(await c.post("/v1/completions", json=body), 401)
        good = {"Authorization": f"Bearer {KEY}"}
        assert_error(await c.post("/v1/completions", json=body, headers=good), 413)
        preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
        assert (await c.options("/v1/completions", headers=preflight)).status_code != 401


async def test_api_key() -> None:
    async with client_for(make_app(api_key=KEY)) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = await c.post("/v1/completions", json={"prompt": "x"}, headers=headers)
            assert_error(r, 401)
            assert r.json()["error"]["code"] == 401
        r = await c.post(
            "/v1/completions", content="{bad json", headers={"content-type": "application/json"}
        )
        assert_error(r, 401)  # no validation details before auth
        assert_error(await c.get("/v1/models"), 401)
        good = {"Authorization": f"Bearer {KEY}"}
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=good)
        assert r.status_code == 200
        assert [m["id"] for m in (await c.get("/v1/models", headers=good)).json()["data"]] == [
            MODEL,
            "alias",
        ]
        for path in ("/health", "/version", "/metrics"):
            assert (await c.get(path)).status_code == 200
        assert (await c.post("/tokenize", json={"prompt": "ab"})).status_code == 200


async def test_cors_only_when_origins_given() -> None:
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    async with client_for(make_app(allowed_origins=["http://ui.example"])) as c:
        r = await c.options("/v1/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
    async with client_for(make_app()) as c:
        r = await c.get("/v1/models", headers={"Origin": "http://ui.example"})
        assert "access-control-allow-origin" not in r.headers


async def test_root_path_behind_a_proxy() -> None:
    app = make_app(api_key=KEY)
    async with client_for(app, root_path="/api") as c:
        r = await c.get("/api/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert_error(
            await c.post(
                "/api/v1/completions", content="{", headers={"content-type": "application/json"}
            ),
            401,
        )
        text = (await c.get("/api/metrics")).text
        assert 'handler="/v1/models",method="GET",status="2xx"' in text


async def test_tokenize_detokenize_version(client: httpx.AsyncClient) -> None:
    r = await client.post("/tokenize", json={"prompt": "AB", "return_token_strs": True})
    assert r.json() == {
        "count": 3,
        "max_model_len": 64,
        "tokens": [0, 67, 68],
        "token_strs": ["<0>", "A", "B"],
    }
    r = await client.post("/tokenize", json={"messages": [{"role": "user", "content": "q"}]})
    assert r.json()["tokens"] == ByteTokenizer().encode("<|user|>q<|end|><|assistant|>", False)
    assert (await client.post("/detokenize", json={"tokens": [67, 68]})).json() == {"prompt": "AB"}
    assert_error(await client.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    assert_error(await client.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404)
    assert isinstance((await client.get("/version")).json()["version"], str)


# vLLM's metrics: name -> Prometheus type (what /metrics declares in its TYPE lines)
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:cache_config_info": "gauge",
    **{
        f"vllm:{name}": "histogram"
        for name in (
            "time_to_first_token_seconds", "inter_token_latency_seconds",
            "time_per_output_token_seconds", "e2e_request_latency_seconds",
            "request_queue_time_seconds", "request_inference_time_seconds",
            "request_prefill_time_seconds", "request_decode_time_seconds",
            "request_prompt_tokens", "request_generation_tokens",
            "request_max_num_generation_tokens", "request_params_n", "request_params_max_tokens",
            "iteration_tokens_total",
        )
    },
}  # fmt: skip
# queries of vLLM's published Grafana dashboard (examples/online_serving/prometheus_grafana)
DASHBOARD_QUERIES = [
    'histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',
    'rate(vllm:e2e_request_latency_seconds_sum{model_name="$model_name"}[$__rate_interval]) / rate(vllm:e2e_request_latency_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'histogram_quantile(0.99, sum by(le) (rate(vllm:time_per_output_token_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',
    'rate(vllm:time_per_output_token_seconds_sum{model_name="$model_name"}[$__rate_interval]) / rate(vllm:time_per_output_token_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    'histogram_quantile(0.99, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',
    'rate(vllm:time_to_first_token_seconds_sum{model_name="$model_name"}[$__rate_interval]) / rate(vllm:time_to_first_token_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'vllm:gpu_cache_usage_perc{model_name="$model_name"}',
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}[$__rate_interval]))',
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}[$__rate_interval])',
]  # fmt: skip


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics text -> sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _value(text: str, name: str, **labels: str) -> float:
    return sum(v for got, v in _samples(text)[name] if labels.items() <= got.items())


async def test_metrics_have_vllms_names_types_and_labels(client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    await client.post("/v1/completions", json={"prompt": "hi", "temperature": -1})
    text = (await client.get("/metrics")).text
    types = {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }
    for name, kind in VLLM_METRICS.items():  # a counter's TYPE line names its _total
        assert types.get(f"{name}_total" if kind == "counter" else name) == kind, name
    assert not any(name.endswith("_created") for name in types)
    model = {"model_name": "fake-model", "engine": "0"}
    for name in VLLM_METRICS:
        sample = name if VLLM_METRICS[name] != "counter" else f"{name}_total"
        sample = sample if VLLM_METRICS[name] != "histogram" else f"{name}_count"
        assert any(model.items() <= labels.items() for labels, _ in _samples(text)[sample]), name
    samples = _samples(text)
    for query in DASHBOARD_QUERIES:  # every series the dashboard reads exists, for this model
        for name in re.findall(r"vllm:[a-z0-9_]+", query):
            assert any(model.items() <= labels.items() for labels, _ in samples[name]), name
    assert _value(text, "http_requests_total", handler="/v1/completions", status="2xx") == 1
    assert _value(text, "http_requests_total", handler="/v1/completions", status="4xx") == 1
    assert _value(text, "vllm:generation_tokens_total") == 3
    assert _value(text, "vllm:prompt_tokens_total") == 3
    assert _value(text, "vllm:request_success_total", finished_reason="length") == 1
    assert _value(text, "vllm:time_to_first_token_seconds_count") == 1
    assert _value(text, "vllm:inter_token_latency_seconds_count") == 2
    assert _value(text, "vllm:e2e_request_latency_seconds_count") == 1
    assert _value(text, "vllm:request_generation_tokens_sum") == 3
    assert _value(text, "vllm:request_params_max_tokens_sum") == 3
    assert _value(text, "vllm:kv_cache_usage_perc") == 0.25
    buckets = [float(labels["le"]) for labels, _ in samples["vllm:request_prompt_tokens_bucket"]]
    assert buckets[:4] == [1, 2, 5, 10]  # vLLM's 1-2-5 series up to max_model_len
    # the fake's steps: the 3-token prompt, then a token each
    assert _value(text, "vllm:iteration_tokens_total_count") == 3
    assert _value(text, "vllm:iteration_tokens_total_sum") == 5
    assert _value(text, "vllm:iteration_tokens_total_bucket", le="1.0") == 2
    assert _value(text, "vllm:iteration_tokens_total_bucket", le="8.0") == 3
    (info,) = samples["vllm:cache_config_info"]
    assert info == ({"model_name": "fake-model", "engine": "0", "block_size": "16",
                     "cache_dtype": "float16", "enable_prefix_caching": "True",
                     "gpu_memory_utilization": "0.9", "num_gpu_blocks": "1024",
                     "kv_cache_memory_bytes": str(1024 * 16 * 1024)}, 1.0)  # fmt: skip


async def test_load_counts_the_models_requests_in_flight() -> None:
    """GET /load (vLLM's server load): requests to the model's routes until their response
    ends, streams included; other routes never count."""
    app = make_app(FakeAsyncEngine(delay=0.05))
    async with client_for(app) as c:
        assert (await c.get("/load")).json() == {"server_load": 0}
        body = {"prompt": "hi", "max_tokens": 10}
        running = [
            asyncio.create_task(c.post("/v1/completions", json=body)),
            asyncio.create_task(c.post("/v1/completions", json={**body, "stream": True})),
            asyncio.create_task(c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})),
        ]  # fmt: skip
        for _ in range(400):  # (until all three are in: each lasts 0.5 s)
            if (await c.get("/load")).json()["server_load"] == 3:
                break
            await asyncio.sleep(0.005)
        await c.post("/tokenize", json={"prompt": "hi"})
        assert (await c.get("/load")).json() == {"server_load": 3}
        assert all(r.is_success for r in await asyncio.gather(*running))
        assert (await c.get("/load")).json() == {"server_load": 0}
        await c.post("/v1/completions", json={"prompt": "x", "temperature": -1})  # a 400
        assert (await c.get("/load")).json() == {"server_load": 0}


def test_stats_line_says_what_vllms_says_and_quiets_when_idle() -> None:
    import logging

    from tokenmill.server.metrics import ServerMetrics
    from tokenmill.server.stats_log import StatsLogger

    stats = EngineStats(2, 1, 0.125, 0, 0)
    metrics = ServerMetrics(lambda: [stats], MODEL, 64)
    log = StatsLogger(metrics, lambda: stats, 10.0)
    start = log._last_time
    metrics.prompt_tokens.inc(300)
    metrics.generation_tokens.inc(50)
    metrics.prefix_cache_queries.inc(200)
    metrics.prefix_cache_hits.inc(50)
    level, text = log.line(start + 10)
    assert level == logging.INFO
    assert text == (
        "Avg prompt throughput: 30.0 tokens/s, Avg generation throughput: 5.0 tokens/s, "
        "Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 25.0%"
    )
    stats = EngineStats(0, 0, 0.0, 0, 0)
    level, text = log.line(start + 20)  # nothing since: the line after a busy one still shows
    assert level == logging.INFO and "Avg prompt throughput: 0.0 tokens/s" in text
    assert log.line(start + 30)[0] == logging.DEBUG  # idle: quiet


def test_prompt_tokens_count_when_the_engine_takes_the_prompt_in() -> None:
    """As vLLM counts them: at the engine's first output, not while the request waits, nor
    if it is aborted first; beam search and best_of > n, which answer only at the end, on
    arrival."""
    from tokenmill.engine.outputs import CompletionOutput, RequestOutput
    from tokenmill.server.metrics import ServerMetrics

    metrics = ServerMetrics(lambda: [EngineStats(0, 0, 0.0, 0, 0)], MODEL, 64)
    timer = metrics.start_request(5, SamplingParams(max_tokens=4))
    assert metrics.prompt_tokens.value == 0
    output = CompletionOutput(index=0, text="a", token_ids=[7])
    timer.on_output(RequestOutput("r", [1] * 5, [output]))
    timer.on_output(RequestOutput("r", [1] * 5, [output]))
    assert metrics.prompt_tokens.value == 5  # once
    metrics.start_request(3, SamplingParams(max_tokens=4)).on_abort()  # left while waiting
    assert metrics.prompt_tokens.value == 5
    metrics.start_request(2, SamplingParams(max_tokens=4, n=2, use_beam_search=True))
    metrics.start_request(4, SamplingParams(max_tokens=4, n=1, best_of=3))
    assert metrics.prompt_tokens.value == 5 + 2 + 4


def test_stats_line_interval_comes_from_vllms_variable(monkeypatch) -> None:
    """As vLLM reads it: not above 0 is the default; not a number is an error."""
    from tokenmill.server.stats_log import DEFAULT_INTERVAL_S, interval_from_env

    monkeypatch.delenv("VLLM_LOG_STATS_INTERVAL", raising=False)
    assert interval_from_env() == DEFAULT_INTERVAL_S
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "2.5")
    assert interval_from_env() == 2.5
    for default in ("0", "-1", "nan"):
        monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", default)
        assert interval_from_env() == DEFAULT_INTERVAL_S
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="VLLM_LOG_STATS_INTERVAL must be a number"):
        interval_from_env()


# --- Cancellation --------------------------------------------------------------------


async def _call_and_disconnect(
    app: Any, body: dict[str, Any], disconnect_after: float
) -> list[dict[str, Any]]:
    """Drive the ASGI app directly; the client goes away after `disconnect_after` seconds."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "root_path": "", "query_string": b"", "server": ("test", 80), "client": ("test", 1),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
    }  # fmt: skip
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_aborts_the_request(stream: bool) -> None:
    engine = FakeAsyncEngine(delay=0.02)
    app = make_app(engine)
    body = {"prompt": ["a", "b"], "max_tokens": 50, "stream": stream}
    await _call_and_disconnect(app, body, disconnect_after=0.1)
    await asyncio.sleep(0.05)
    assert {r[2] for r in engine.requests} == engine.aborted and len(engine.aborted) == 2
    assert not engine.running
    async with client_for(app) as c:
        assert (await c.get("/load")).json() == {"server_load": 0}  # the clients left
        text = (await c.get("/metrics")).text
        assert 'vllm:request_success_total{engine="0",finished_reason="abort"' in text
        assert _value(text, "vllm:request_success_total", finished_reason="abort") == 2
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.json()["choices"][0]["text"] == "ab"


# --- CLI -----------------------------------------------------------------------------


def test_cli_value_parsers() -> None:
    from tokenmill.server.flag_types import parse_bytes, parse_dtype, parse_list, parse_tokens

    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1e9") == 10**9 and parse_bytes("4096") == 4096
    assert parse_tokens("4k") == 4096 and parse_tokens("2048") == 2048
    assert parse_list('["http://a", "http://b"]') == ["http://a", "http://b"]
    assert parse_list("http://a, http://b") == ["http://a", "http://b"]
    assert parse_dtype("half") == "float16" and parse_dtype("auto") == "auto"
    for parser, value in (
        (parse_bytes, "2 parsecs"),
        (parse_tokens, "many"),
        (parse_dtype, "int3"),
    ):
        with pytest.raises(Exception, match="not a|unknown"):
            parser(value)


def test_cli_flags_reach_the_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.server import cli

    seen = {}

    def fake_load(args: Any) -> Any:
        seen["args"] = args
        raise cli.StartupError("stop here")

    monkeypatch.setattr(cli, "_load_engine", fake_load)
    monkeypatch.setenv("TOKENMILL_API_KEY", "from-env")
    argv = ["serve", "m.gguf", "--port", "0", "--kv-cache-memory", "1GiB", "--allowed-origins",
            "a,b", "--served-model-name", "x", "y", "--max-model-len", "2k",
            "--guided-decoding-backend", "outlines", "--generation-config", "vllm",
            "--backend", "torch"]  # fmt: skip
    assert cli.main(argv) == 1
    args = seen["args"]
    assert (args.kv_cache_memory, args.allowed_origins, args.max_model_len) == (
        2**30,
        ["a", "b"],
        2048,
    )
    assert args.served_model_name == ["x", "y"]
    assert cli._server_settings(args).api_keys == ("from-env",)  # the env's key
    assert args.guided_decoding_backend == "outlines"
    assert (args.generation_config, args.backend) == ("vllm", "torch")


def test_guided_decoding_backend_flag_names_every_backend() -> None:
    from typing import get_args

    from tokenmill.config import GuidedDecodingBackend
    from tokenmill.structured import BACKEND_NAMES

    assert set(get_args(GuidedDecodingBackend)) == set(BACKEND_NAMES)


def test_cli_startup_failure_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from tokenmill.server.cli import main

    assert main(["serve", "--chat-template", "/no/such/template.jinja"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenmill serve: error:") and "\n" not in err


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_cli_warns_when_serving_beyond_loopback_without_a_key(
    host: str, warned: bool, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The address is bound before the model loads, so a missing model still shows it."""
    from tests.e2e.conftest import free_port
    from tokenmill.server.cli import main

    args = ["serve", "/no/such/model-dir", "--host", host, "--port", str(free_port())]
    with caplog.at_level("WARNING", logger="tokenmill.server.cli"):
        assert main(args) == 1
    warnings = [r.getMessage() for r in caplog.records if "without --api-key" in r.getMessage()]
    assert bool(warnings) is warned, warnings
    with caplog.at_level("WARNING", logger="tokenmill.server.cli"):
        caplog.clear()
        assert main([*args, "--api-key", "k"]) == 1
    assert not [r for r in caplog.records if "without --api-key" in r.getMessage()]
    assert "tokenmill serve: error:" in capsys.readouterr().err
