"""vLLM's bad_words, return_tokens_as_token_ids and priority through the HTTP app (fake
engine) and the logprob formatter."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.fake_engine import (
    FakeAsyncEngine,
    assert_error,
    client_for,
    make_app,
    sse_events,
)
from tokenmill.engine.outputs import Logprob
from tokenmill.server.limits import RequestLimits
from tokenmill.server.logprobs import LogprobFormatter

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}
BODIES = [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]


# -- logprob formatting ----------------------------------------------------------------------


class ByteTexts:
    """TokenTexts of the fake engine's byte tokenizer: id = byte + 2."""

    def text(self, token_id: int) -> str:
        return chr(token_id - 2)

    def bytes(self, token_id: int) -> list[int]:
        return [token_id - 2]


def formatter() -> LogprobFormatter:
    return LogprobFormatter(ByteTexts())  # type: ignore[arg-type]


def entry(chosen: int, *others: int) -> dict[int, Logprob]:
    """The chosen token first (rank 2), then the others by rank (the first is the top)."""
    result = {chosen: Logprob(-1.0, rank=2, decoded_token=chr(chosen - 2))}
    for rank, token in enumerate(others, start=1):
        result[token] = Logprob(-0.5 * rank, rank=rank if rank < 2 else rank + 1)
    return result


def test_completion_logprobs_name_tokens_by_id_and_offsets_follow_those_names() -> None:
    ids = [106, 107]  # "hi"
    entries = [entry(106, 108), entry(107, 109)]
    plain = formatter().completion(ids, entries)
    assert plain.tokens == ["h", "i"] and plain.text_offset == [0, 1]
    named = formatter().completion(ids, entries, as_ids=True)
    assert named.tokens == ["token_id:106", "token_id:107"]
    assert named.text_offset == [0, len("token_id:106")]
    assert named.top_logprobs == [
        {"token_id:106": -1.0, "token_id:108": -0.5},
        {"token_id:107": -1.0, "token_id:109": -0.5},
    ]
    assert named.token_logprobs == plain.token_logprobs
    shifted = formatter().completion(ids, entries, initial_offset=7, as_ids=True)
    assert shifted.text_offset == [7, 7 + len("token_id:106")]


def test_chat_logprobs_name_tokens_by_id_with_the_names_bytes() -> None:
    content = formatter().chat([106], [entry(106, 108)], num_top=2, as_ids=True).content
    assert content is not None and len(content) == 1
    item = content[0]
    assert item.token == "token_id:106" and item.bytes == list(b"token_id:106")
    assert [(t.token, t.bytes) for t in item.top_logprobs] == [
        ("token_id:108", list(b"token_id:108")),
        ("token_id:106", list(b"token_id:106")),
    ]
    plain = formatter().chat([106], [entry(106, 108)], num_top=2).content
    assert plain is not None and plain[0].token == "h" and plain[0].bytes == [ord("h")]


# -- bad_words ---------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "body"), BODIES)
async def test_bad_words_reach_the_engine_tokenized(path: str, body: dict[str, Any]) -> None:
    engine = FakeAsyncEngine()
    async with client_for(make_app(engine)) as client:
        response = await client.post(path, json={**body, "bad_words": [" ab", "c"]})
    assert response.status_code == 200, response.text
    params = engine.requests[-1][1]
    # byte ids are byte + 2; " ab" loses its space; the spaced variants have more tokens
    assert params.bad_words == [" ab", "c"]
    assert params.bad_words_token_ids == [[ord("a") + 2, ord("b") + 2], [ord("c") + 2]]


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "body"), BODIES)
async def test_bad_words_over_the_limits_or_empty_are_400s(path: str, body: dict[str, Any]) -> None:
    limits = RequestLimits(max_bad_words=2, max_bad_word_chars=4)
    async with client_for(make_app(limits=limits)) as client:
        many = await client.post(path, json={**body, "bad_words": ["a", "b", "c"]})
        assert "at most 2 words; got 3" in assert_error(many, 400, "bad_words")
        long = await client.post(path, json={**body, "bad_words": ["a", "abcde"]})
        assert "bad_words[1] may have at most 4" in assert_error(long, 400, "bad_words")
        empty = await client.post(path, json={**body, "bad_words": [" "], "stream": True})
        assert "no tokens" in assert_error(empty, 400, "bad_words")
        beams = {**body, "bad_words": ["a"], "use_beam_search": True, "n": 2}
        assert_error(await client.post(path, json=beams), 400, "bad_words")


# -- priority ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "body"), BODIES)
@pytest.mark.parametrize("stream", [False, True])
async def test_priority_is_a_400_under_fcfs(path: str, body: dict[str, Any], stream: bool) -> None:
    engine = FakeAsyncEngine()
    async with client_for(make_app(engine)) as client:
        response = await client.post(path, json={**body, "priority": 3, "stream": stream})
        assert "--scheduling-policy priority" in assert_error(response, 400, "priority")
        assert (await client.post(path, json={**body, "priority": 0})).status_code == 200
    assert engine.priorities == [0]


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "body"), BODIES)
async def test_priority_reaches_the_engine_under_the_priority_policy(
    path: str, body: dict[str, Any]
) -> None:
    engine = FakeAsyncEngine()
    engine.scheduling_policy = "priority"
    async with client_for(make_app(engine)) as client:
        plain = await client.post(path, json={**body, "priority": -2})
        streamed = await client.post(path, json={**body, "priority": 5, "stream": True})
        assert plain.status_code == 200, plain.text
        assert json.loads(sse_events(streamed.text)[0])["id"]
    assert engine.priorities == [-2, 5]
