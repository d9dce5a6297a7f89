"""bad_words, priority scheduling and return_tokens_as_token_ids on the bundled model: the
offline API, and the HTTP app in front of a real AsyncEngine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.fake_engine import client_for, make_app, sse_events
from tokenmill import LLM
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams

PROMPT = "The capital of France is"
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def priority_llm(bundled_gguf_path: str) -> Iterator[LLM]:
    """Its own engine, one running request at a time."""
    llm = LLM(
        bundled_gguf_path,
        kv_cache_memory=64 << 20,
        scheduling_policy="priority",
        max_num_seqs=1,
    )
    yield llm


def greedy(llm: LLM, params: SamplingParams = GREEDY) -> tuple[str, list[int]]:
    output = llm.generate([PROMPT], params)[0].outputs[0]
    return output.text, list(output.token_ids)


def word_token(llm: LLM, text: str) -> int:
    (token,) = llm.tokenizer.encode(text, add_special_tokens=False)
    return token


# -- bad_words -------------------------------------------------------------------------------


def test_a_banned_word_is_not_generated_and_the_text_before_it_is_unchanged(
    default_llm: LLM,
) -> None:
    text, ids = greedy(default_llm)
    united = word_token(default_llm, " United")
    assert "United" in text and united in ids  # " Paris.\n\nThe United States has ..."
    banned_text, banned_ids = greedy(default_llm, SamplingParams(**_greedy(bad_words=["United"])))
    cut = ids.index(united)
    assert banned_ids[:cut] == ids[:cut] and banned_ids[cut] != united
    assert "United" not in banned_text


def test_a_multi_token_word_bans_only_its_last_token_after_the_rest(default_llm: LLM) -> None:
    text, ids = greedy(default_llm)
    united = word_token(default_llm, " United")
    cut = ids.index(united)
    assert "The United" in text
    banned_text, banned_ids = greedy(
        default_llm, SamplingParams(**_greedy(bad_words=["The United"]))
    )
    # "The" alone is still generated; " United" right after it is not
    assert banned_ids[:cut] == ids[:cut] and banned_ids[cut] != united
    assert "The United" not in banned_text


def _greedy(**changes: Any) -> dict[str, Any]:
    return {"temperature": 0.0, "max_tokens": 16, **changes}


# -- priority ------------------------------------------------------------------------------------


def test_fcfs_refuses_priorities_and_priorities_must_match_the_prompts(
    default_llm: LLM, priority_llm: LLM
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        default_llm.generate([PROMPT], GREEDY, priority=[1])
    assert refused.value.param == "priority"
    with pytest.raises(ValueError, match="2 priorities for 1 prompts"):
        priority_llm.generate([PROMPT], GREEDY, priority=[0, 1])


def test_priority_orders_admission_and_never_changes_greedy_outputs(
    default_llm: LLM, priority_llm: LLM
) -> None:
    prompts = [PROMPT, "Once upon a time", "def add(a, b):", "The sky is"]
    expected = [o.outputs[0].token_ids for o in default_llm.generate(prompts, GREEDY)]
    outputs = priority_llm.generate(prompts, GREEDY, priority=[3, 1, 2, 0])
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # one request runs at a time: they finish in priority order, not in arrival order
    engine = priority_llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=3)
    for i, priority in enumerate([3, 1, 2, 0]):
        engine.add_request(
            f"p{i}", priority_llm.tokenizer.encode(prompts[i]), params, priority=priority
        )
    finished = []
    while engine.has_unfinished:
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["p3", "p1", "p2", "p0"]


# -- the HTTP app on the real engine ------------------------------------------------------------


def test_server_bad_words_priority_and_token_ids(
    default_llm: LLM, priority_llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    baseline_text, _ = greedy(default_llm)
    # the module's engine outlives this AsyncEngine: its shutdown must not close it
    monkeypatch.setattr(priority_llm.engine, "shutdown", lambda: None)
    monkeypatch.setattr(priority_llm.engine.structured_outputs, "close", lambda: None)
    engine = AsyncEngine(priority_llm.engine)

    async def main() -> None:
        await engine.start()
        try:
            async with client_for(make_app(engine)) as client:
                await _check_bad_words(client, baseline_text)
                await _check_token_ids(client)
                urgent = {"prompt": PROMPT, "max_tokens": 2, "priority": -5}
                assert (await client.post("/v1/completions", json=urgent)).status_code == 200
            async with client_for(make_app(engine, return_tokens_as_token_ids=True)) as client:
                await _check_server_default(client)
        finally:
            await engine.shutdown()

    asyncio.run(main())


async def _check_bad_words(client: Any, baseline_text: str) -> None:
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "bad_words": ["United"]}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    assert "United" not in text and "United" in baseline_text
    assert text.split("\n")[0] == baseline_text.split("\n")[0]  # " Paris." either way


async def _check_token_ids(client: Any) -> None:
    common = {"max_tokens": 4, "temperature": 0, "return_token_ids": True}
    completion = {**common, "prompt": PROMPT, "logprobs": 2, "return_tokens_as_token_ids": True}
    choice = (await client.post("/v1/completions", json=completion)).json()["choices"][0]
    names = [f"token_id:{t}" for t in choice["token_ids"]]
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == names
    assert all(all(k.startswith("token_id:") for k in top) for top in logprobs["top_logprobs"])
    offsets = [sum(len(n) for n in names[:i]) for i in range(len(names))]
    assert logprobs["text_offset"] == offsets

    streamed = await client.post("/v1/completions", json={**completion, "stream": True})
    chunks = [json.loads(e) for e in sse_events(streamed.text) if e != "[DONE]"]
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert tokens == names

    chat = {**common, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
            "top_logprobs": 2, "return_tokens_as_token_ids": True}  # fmt: skip
    choice = (await client.post("/v1/chat/completions", json=chat)).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in choice["token_ids"]]
    for item in content:
        assert item["bytes"] == list(item["token"].encode())
        for top in item["top_logprobs"]:
            assert top["token"].startswith("token_id:")
            assert top["bytes"] == list(top["token"].encode())
    streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True})
    chunks = [json.loads(e) for e in sse_events(streamed.text) if e != "[DONE]"]
    streamed_tokens = [
        item["token"]
        for c in chunks
        for choice in c["choices"]
        if choice.get("logprobs")
        for item in choice["logprobs"]["content"]
    ]
    assert streamed_tokens == [c["token"] for c in content]


async def _check_server_default(client: Any) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 0}
    by_default = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    assert all(t.startswith("token_id:") for t in by_default["logprobs"]["tokens"])
    body["return_tokens_as_token_ids"] = False
    overridden = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    assert not any(t.startswith("token_id:") for t in overridden["logprobs"]["tokens"])
