"""A real `tokenmill serve` (bundled SmolLM2) driven by the official openai client and httpx."""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.e2e.conftest import metric

if TYPE_CHECKING:
    from tests.e2e.conftest import Server

MODEL = "smol"  # the open server's first --served-model-name; "smol-alias" is the second
APPLES = "List: apple, apple, apple, apple,"
FRANCE = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(server: Server, **kwargs: Any) -> OpenAI:
    key = server.api_key or "unused"
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120, **kwargs)


def greedy(server: Server, prompt: str | list[int], max_tokens: int, **kwargs: Any) -> str:
    response = client(server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs
    )
    return response.choices[0].text


def tokenize(server: Server, **body: Any) -> list[int]:
    response = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json()["tokens"])


def wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


# --- Completions -----------------------------------------------------------------------


def test_models_lists_served_names(server: Server) -> None:
    models = client(server).models.list().data
    assert [m.id for m in models] == server.served_names == [MODEL, "smol-alias"]
    assert models[0].model_extra is not None
    assert models[0].model_extra["max_model_len"] == server.max_model_len


def test_greedy_is_deterministic_and_stream_matches(server: Server) -> None:
    c = client(server)
    first = c.completions.create(
        model=MODEL, prompt=FRANCE, max_tokens=6, temperature=0, user="e2e"
    )
    second = c.completions.create(model=MODEL, prompt=FRANCE, max_tokens=6, temperature=0)
    text = first.choices[0].text
    assert text and text == second.choices[0].text
    assert first.id.startswith("cmpl-") and first.object == "text_completion"
    assert first.model == MODEL and first.choices[0].finish_reason == "length"
    assert first.usage is not None and first.usage.completion_tokens == 6
    chunks = list(
        c.completions.create(
            model=MODEL, prompt=FRANCE, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == first.usage.prompt_tokens


def test_n_and_seed(server: Server) -> None:
    c = client(server)
    sample = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=1.0, n=3)
    first = c.completions.create(**sample, seed=1234)
    again = c.completions.create(**sample, seed=1234)
    other = c.completions.create(**sample, seed=99)
    texts = [ch.text for ch in first.choices]
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    assert texts == [ch.text for ch in again.choices]  # a seed reproduces
    assert len(set(texts)) > 1  # the n samples are different samples
    assert texts != [ch.text for ch in other.choices]
    pair = c.completions.create(model=MODEL, prompt=FRANCE, max_tokens=3, temperature=0, n=2)
    assert pair.choices[0].text == pair.choices[1].text


def test_stop_and_max_tokens(server: Server) -> None:
    base = greedy(server, FRANCE, 6)  # " Paris.\n\nThe answer"-like
    stop = base.split()[1]
    response = client(server).completions.create(
        model=MODEL, prompt=FRANCE, max_tokens=6, temperature=0, stop=[stop, "never-seen"]
    )
    choice = response.choices[0]
    assert choice.text == base[: base.index(stop)]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop


def test_penalties_change_repetitive_output(server: Server) -> None:
    base = greedy(server, APPLES, 10)
    assert base.count("apple") >= 4, base
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = greedy(server, APPLES, 10, **penalty)
        assert penalised.count("apple") < base.count("apple"), (penalty, penalised)


def test_logit_bias(server: Server) -> None:
    (banana,) = tokenize(server, prompt=" banana")
    assert greedy(server, APPLES, 3, logit_bias={str(banana): 100}) == " banana banana banana"
    first = tokenize(server, prompt=greedy(server, APPLES, 1))[0]
    banned = greedy(server, APPLES, 1, logit_bias={str(first): -100})
    assert tokenize(server, prompt=banned)[0] != first


def test_echo_token_ids_and_list_prompts(server: Server) -> None:
    c = client(server)
    base = greedy(server, FRANCE, 3)
    assert greedy(server, FRANCE, 3, echo=True) == FRANCE + base
    ids = tokenize(server, prompt=FRANCE)
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == base and by_ids.usage is not None
    assert by_ids.usage.prompt_tokens == len(ids)
    apples_ids = tokenize(server, prompt=APPLES)
    for prompt in ([FRANCE, APPLES], [ids, apples_ids]):
        r = c.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=3, temperature=0)
        assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
        texts = [ch.text for ch in r.choices]
        assert texts[:2] == [base, base] and texts[2] == texts[3] == greedy(server, APPLES, 3)


@pytest.mark.anyio
async def test_async_client_matches_sync(server: Server) -> None:
    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        r = await c.completions.create(model=MODEL, prompt=FRANCE, max_tokens=3, temperature=0)
        stream = await c.completions.create(
            model=MODEL, prompt=FRANCE, max_tokens=3, temperature=0, stream=True
        )
        streamed = "".join([ch.choices[0].text async for ch in stream])
    assert r.choices[0].text == streamed == greedy(server, FRANCE, 3)


# --- Chat ------------------------------------------------------------------------------


def test_chat_stream_matches_non_stream(server: Server) -> None:
    c = client(server)
    full = c.chat.completions.create(
        model="smol-alias", messages=QUESTION, max_completion_tokens=5, temperature=0
    )
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    assert full.model == "smol-alias" and full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content and full.usage is not None
    chunks = list(
        c.chat.completions.create(
            model="smol-alias", messages=QUESTION, max_tokens=5, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.usage is None for ch in chunks)
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks)
        == full.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_chat_stream_n_and_usage(server: Server) -> None:
    chunks = list(
        client(server).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=3, temperature=0, n=2, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    texts: dict[int, str] = {0: "", 1: ""}
    finished = set()
    for ch in chunks[:-1]:
        (choice,) = ch.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert finished == {0, 1} and texts[0] == texts[1] != ""
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6
    assert usage.total_tokens == usage.prompt_tokens + 6


def test_the_clients_request_id_usage_by_default_and_sagemakers_route(server: Server) -> None:
    """As vLLM: X-Request-Id names the response; stream_options sent at all means usage;
    POST /invocations serves the body's API."""
    chunks = list(
        client(server).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=3, temperature=0, stream=True,
            stream_options={}, extra_headers={"X-Request-Id": "trace-42"},
        )
    )  # fmt: skip
    assert {c.id for c in chunks} == {"chatcmpl-trace-42"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    body = {"messages": QUESTION, "max_tokens": 3, "temperature": 0}
    via_sagemaker = httpx.post(f"{server.url}/invocations", json=body, timeout=60)
    assert via_sagemaker.status_code == 200, via_sagemaker.text
    chat = client(server).chat.completions.create(model=MODEL, **body)
    content = via_sagemaker.json()["choices"][0]["message"]["content"]
    assert content == chat.choices[0].message.content


def test_add_generation_prompt(server: Server) -> None:
    with_prompt = tokenize(server, messages=QUESTION)
    without = tokenize(server, messages=QUESTION, add_generation_prompt=False)
    assert with_prompt[: len(without)] == without
    tail = httpx.post(f"{server.url}/detokenize", json={"tokens": with_prompt[len(without) :]})
    assert tail.json()["prompt"] == "<|im_start|>assistant\n"


def test_continue_final_message_and_echo(server: Server) -> None:
    messages = [*QUESTION, {"role": "assistant", "content": FRANCE}]
    options = {"continue_final_message": True, "add_generation_prompt": False}
    prompt_ids = tokenize(server, messages=messages, **options)
    prompt = httpx.post(f"{server.url}/detokenize", json={"tokens": prompt_ids}).json()["prompt"]
    assert prompt.endswith(f"<|im_start|>assistant\n{FRANCE}")  # no end-of-turn after it
    chat = client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, temperature=0, extra_body=options
    )
    continued = chat.choices[0].message.content
    assert continued == greedy(server, prompt_ids, 3)
    echoed = client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, temperature=0,
        extra_body={**options, "echo": True},
    )  # fmt: skip
    assert echoed.choices[0].message.content == FRANCE + str(continued)


def test_per_request_template_kwargs_and_documents(server: Server) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    template = "{{ greeting }}, {{ messages[0]['content'] }}"
    kwargs = {"greeting": "Hello"}
    ids = tokenize(server, messages=hi, chat_template=template, chat_template_kwargs=kwargs)
    assert ids == tokenize(server, prompt="Hello, Hi", add_special_tokens=False)
    chat = client(server).chat.completions.create(
        model=MODEL, messages=hi, max_tokens=3, temperature=0,
        extra_body={"chat_template": template, "chat_template_kwargs": kwargs},
    )  # fmt: skip
    assert chat.choices[0].message.content == greedy(server, ids, 3)
    docs = [{"title": "Fact", "text": "Paris is in France."}]
    rag = (
        "{% for d in documents %}{{ d.title }}: {{ d.text }}\n{% endfor %}{{ messages[0].content }}"
    )
    ids = tokenize(server, messages=hi, chat_template=rag, documents=docs)
    assert ids == tokenize(server, prompt="Fact: Paris is in France.\nHi", add_special_tokens=False)
    # the model's own template ignores documents: no effect
    assert tokenize(server, messages=hi, documents=docs) == tokenize(server, messages=hi)


def test_server_chat_template_flag(auth_server: Server) -> None:
    ids = tokenize(auth_server, messages=[{"role": "user", "content": "Hi"}])
    text = httpx.post(f"{auth_server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == "[SERVER-TEMPLATE user]Hi"


# --- Auth ------------------------------------------------------------------------------


def test_api_key_required_on_v1_only(auth_server: Server) -> None:
    bad = OpenAI(base_url=f"{auth_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.completions.create(model="x", prompt="Hi", max_tokens=1)
    # `code` is the int status (vLLM's); the openai client turns it into a str
    assert info.value.status_code == 401 and info.value.code == "401"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{auth_server.url}/v1/chat/completions", json={"messages": QUESTION})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    good = client(auth_server)
    (model,) = good.models.list().data  # served under the model's own name by default
    r2 = good.completions.create(model=model.id, prompt=FRANCE, max_tokens=2, temperature=0)
    assert r2.choices[0].text
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{auth_server.url}{path}").status_code == 200


def test_no_key_means_open(server: Server) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200


# --- Errors ----------------------------------------------------------------------------


def _post(server: Server, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=60, **kwargs)


def test_error_classes_with_status_and_envelope(server: Server) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    cases: list[tuple[str, dict[str, Any], int, str | None, str]] = [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "gpt-4"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 10**7]}, 400, "prompt", "vocabulary"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": "two"}, 400, "n", "integer"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "required"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [image]}]}, 400,
         "messages.0.content.0", "does not accept images"),
        ("/v1/chat/completions", {"messages": QUESTION, "guided_regex": "(a"}, 400,
         "guided_regex", "invalid regex"),
    ]  # fmt: skip
    for path, body, status, param, fragment in cases:
        r = _post(server, path, json=body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and fragment in error["message"], error
    for raw in ('{"model": "smol", "prompt": ', '{"prompt": "x", "top_p": NaN}'):
        r = _post(
            server, "/v1/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.BadRequestError) as info:
        client(server).completions.create(model=MODEL, prompt="x", top_p=7)
    assert info.value.param == "top_p"
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=QUESTION)
    assert greedy(server, FRANCE, 1)  # still serving


def test_context_overflow_names_both_numbers(server: Server) -> None:
    prompt = "apple " * 500
    num_prompt = len(tokenize(server, prompt=prompt))
    with pytest.raises(openai.BadRequestError) as info:
        client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=100)
    message = info.value.message
    assert str(server.max_model_len) in message and str(num_prompt + 100) in message
    assert str(num_prompt) in message


# --- Cancellation, concurrency, metrics -------------------------------------------------


# Sampled at temperature 1, a request may draw EOS early and finish before the client
# leaves; without EOS it runs ~480 tokens (seconds on CPU), so the disconnect always aborts.
_RUNS_LONG = {"max_tokens": 480, "ignore_eos": True}


def test_stream_disconnect_aborts_and_next_request_works(server: Server) -> None:
    aborted = metric(server, "vllm:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": APPLES, "stream": True, **_RUNS_LONG}
    url = f"{server.url}/v1/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    wait_for(
        lambda: metric(server, "vllm:request_success_total", finished_reason="abort") == aborted + 1
    )
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 0)
    assert greedy(server, FRANCE, 2)


def test_non_stream_disconnect_aborts(server: Server) -> None:
    aborted = metric(server, "vllm:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": APPLES, **_RUNS_LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    wait_for(
        lambda: metric(server, "vllm:request_success_total", finished_reason="abort") == aborted + 1
    )
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 0)


@pytest.mark.anyio
async def test_32_concurrent_streaming_clients(server: Server) -> None:
    async with AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as c:

        async def one(i: int) -> tuple[str, str | None]:
            messages = [{"role": "user", "content": f"Count to {i}."}]
            stream = await c.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True
            )
            text, finish = "", None
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            return text, finish

        results = await asyncio.gather(*(one(i) for i in range(32)))
    assert all(text and finish in ("stop", "length") for text, finish in results), results


def test_metrics_after_traffic(server: Server) -> None:
    greedy(server, FRANCE, 2)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'http_requests_total{handler="/v1/completions",method="POST",status="2xx"}' in text
    for name in (
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",  # from the engine's first-scheduled time
        "vllm:request_prefill_time_seconds_count",
        "vllm:request_decode_time_seconds_count",
        "vllm:prefix_cache_queries_total",
    ):
        assert metric(server, name) > 0, name
    assert 0 <= metric(server, "vllm:kv_cache_usage_perc") <= 1
    assert metric(server, "vllm:num_requests_waiting") >= 0
    # the CPU kernels' thread pool: between one thread and torch's count, never 0
    assert 1 <= metric(server, "tokenmill:cpu_threads") <= max(1, os.cpu_count() or 1)
    assert metric(server, "tokenmill:cpu_thread_reductions_total") >= 0
    assert metric(server, "vllm:cache_config_info", block_size="16", engine="0") == 1


def test_iteration_tokens_count_each_steps_tokens(server: Server) -> None:
    """vllm:iteration_tokens_total (tests/unit/test_scheduler.py counts them exactly): a
    prompt of 33-64 tokens, cached nowhere, prefills in one step of that bucket, then a step
    a token. (Other tests' requests may still be ending: only lower bounds on the deltas.)"""

    def histogram() -> tuple[float, float, float]:
        return (metric(server, "vllm:iteration_tokens_total_count"),
                metric(server, "vllm:iteration_tokens_total_sum"),
                metric(server, "vllm:iteration_tokens_total_bucket", le="32.0"))  # fmt: skip

    prompt = f"{time.time_ns()} " + "one two three four five six seven eight nine ten " * 4
    num_prompt = len(httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}).json()["tokens"])
    assert 32 < num_prompt <= 64, num_prompt
    before = histogram()
    body = {"model": "smol", "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).is_success
    steps, tokens, at_most_32 = (b - a for a, b in zip(before, histogram(), strict=True))
    assert steps >= 4 and tokens >= num_prompt + 3
    assert steps - at_most_32 >= 1  # the prefill step: over 32 tokens


def test_stats_line_and_load(server: Server) -> None:
    """vLLM's periodic stats line in the log while requests run (VLLM_LOG_STATS_INTERVAL
    set short for this server); GET /load counts a stream until its end."""
    client = httpx.Client(base_url=server.url, timeout=60)

    def settles_at(load: int) -> bool:  # (an earlier test's abandoned stream may still end)
        deadline = time.monotonic() + 30
        while client.get("/load").json() != {"server_load": load}:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    assert settles_at(0)
    body = {"model": "smol", "prompt": FRANCE, "max_tokens": 64, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        assert client.get("/load").json() == {"server_load": 1}
        for _ in lines:
            pass
    assert settles_at(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "Avg generation throughput" not in server.log_text():
        time.sleep(0.2)
    line = next(x for x in server.log_text().splitlines() if "Avg generation throughput" in x)
    assert re.search(
        r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ tokens/s, "
        r"Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%, "
        r"Prefix cache hit rate: [\d.]+%",
        line,
    ), line


# --- Startup ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["/nonexistent/model.gguf"],
        ["NoSuchOrg/no-such-model-anywhere"],  # not cached, and the hub is never reached
        ["--port", "{busy}"],
    ],
)
def test_startup_failures_are_one_line(args: list[str], server: Server, launch_cli: Any) -> None:
    busy = server.url.rsplit(":", 1)[1]
    done = launch_cli(*(a.replace("{busy}", busy) for a in args))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tokenmill serve: error:"), done.stderr
