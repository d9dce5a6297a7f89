"""vLLM's sampling extras, logprobs, best_of and beam search through a real server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from tests.e2e.test_server import FRANCE, MODEL, QUESTION, client, tokenize

if TYPE_CHECKING:
    from tests.e2e.conftest import Server

CJK = "你好，世界。你好，世界。你好，世界。你好，世界。"


def complete(server: Server, prompt: str | list[int], **kwargs: Any) -> Any:
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in _EXTRAS}
    return client(server).completions.create(
        model=MODEL, prompt=prompt, temperature=kwargs.pop("temperature", 0), extra_body=extra,
        **kwargs,
    )  # fmt: skip


_EXTRAS = {
    "top_k", "min_tokens", "allowed_token_ids", "prompt_logprobs", "best_of", "use_beam_search",
    "length_penalty", "early_stopping", "include_stop_str_in_output", "ignore_eos",
}  # fmt: skip


def test_completion_logprobs_shape(server: Server) -> None:
    choice = complete(server, FRANCE, max_tokens=5, logprobs=3).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and top[token] == value  # the chosen token is always listed
        assert 3 <= len(top) <= 4 and max(top.values()) == value  # greedy: the best one
    assert choice.model_extra.get("prompt_logprobs") is None


def test_echo_logprobs_score_the_prompt_even_without_output(server: Server) -> None:
    ids = tokenize(server, prompt=FRANCE)
    only = complete(server, FRANCE, max_tokens=0, echo=True, logprobs=1).choices[0]
    assert only.text == FRANCE and only.finish_reason == "length"
    lp = only.logprobs
    assert len(lp.tokens) == len(ids) and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    more = complete(server, FRANCE, max_tokens=2, echo=True, logprobs=1).choices[0]
    assert more.logprobs.token_logprobs[: len(ids)] == lp.token_logprobs
    assert len(more.logprobs.tokens) == len(ids) + 2 and more.text.startswith(FRANCE)


def test_prompt_logprobs_as_vllm_returns_them(server: Server) -> None:
    ids = tokenize(server, prompt=FRANCE)
    choice = complete(server, FRANCE, max_tokens=1, prompt_logprobs=2).choices[0]
    prompt_lp = choice.model_extra["prompt_logprobs"]
    assert len(prompt_lp) == len(ids) and prompt_lp[0] is None
    for token_id, entry in zip(ids[1:], prompt_lp[1:], strict=True):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert set(entry[str(token_id)]) == {"logprob", "rank", "decoded_token"}
    chat = client(server).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    assert chat.model_extra["prompt_logprobs"][0] is None


def test_prompt_logprobs_stream_in_the_first_chunk_after_the_prefill(server: Server) -> None:
    """vLLM refuses prompt_logprobs above 0 in a stream; here they stream, once: in a
    completion choice's first chunk, and at the top of the chat stream's first chunk after
    the role chunk; the same as without streaming."""
    c = client(server)
    whole = complete(server, FRANCE, max_tokens=3, prompt_logprobs=2)
    stream = c.completions.create(model=MODEL, prompt=FRANCE, max_tokens=3, stream=True,
                                  extra_body={"prompt_logprobs": 2})  # fmt: skip
    carried = [ch.choices[0].model_extra.get("prompt_logprobs") for ch in stream if ch.choices]
    assert carried[0] == whole.choices[0].model_extra["prompt_logprobs"]
    assert all(lp is None for lp in carried[1:])
    chat_whole = c.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=3, extra_body={"prompt_logprobs": 0}
    )
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=3,
            stream=True,
            extra_body={"prompt_logprobs": 0},
        )
    )
    with_lp = [ch.model_extra.get("prompt_logprobs") for ch in chunks]
    assert with_lp[0] is None  # the role chunk comes before the prefill
    assert [lp for lp in with_lp if lp is not None] == [chat_whole.model_extra["prompt_logprobs"]]


def test_chat_logprobs_stream_and_not(server: Server) -> None:
    c = client(server)
    common = dict(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True)
    full = c.chat.completions.create(**common, top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    for item in content:
        assert [t.logprob for t in item.top_logprobs] == sorted(
            (t.logprob for t in item.top_logprobs), reverse=True
        )
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token
        assert bytes(item.bytes).decode(errors="replace") == item.token
    chunks = list(c.chat.completions.create(**common, stream=True))
    streamed = [i for ch in chunks if ch.choices and ch.choices[0].logprobs
                for i in ch.choices[0].logprobs.content]  # fmt: skip
    assert [i.token for i in streamed] == [i.token for i in content]
    assert all(i.top_logprobs == [] for i in streamed)  # logprobs without top_logprobs


def test_best_of_and_its_streaming_error(server: Server) -> None:
    response = complete(server, FRANCE, max_tokens=4, temperature=1.0, seed=5, n=2, best_of=4)
    assert [ch.index for ch in response.choices] == [0, 1]
    assert response.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as info:
        complete(server, FRANCE, max_tokens=4, n=1, best_of=2, stream=True)
    assert info.value.param == "best_of"


def test_beam_search_is_deterministic_and_distinct(server: Server) -> None:
    beams = dict(max_tokens=4, n=2, use_beam_search=True, best_of=3)
    first = [ch.text for ch in complete(server, FRANCE, **beams).choices]
    assert first == [ch.text for ch in complete(server, FRANCE, **beams).choices]
    assert len(set(first)) == 2
    streamed = ["", ""]
    for chunk in complete(server, FRANCE, stream=True, **beams):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == first
    chat = client(server).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, n=2,
        extra_body={"use_beam_search": True, "early_stopping": True},
    )  # fmt: skip
    assert len(chat.choices) == 2 and chat.choices[0].message.content


def test_allowed_token_ids_top_k_and_min_tokens(server: Server) -> None:
    allowed = tokenize(server, prompt=" yes no", add_special_tokens=False)
    r = complete(server, FRANCE, max_tokens=5, temperature=1.0, allowed_token_ids=allowed,
                 min_tokens=5, ignore_eos=True, top_k=2)  # fmt: skip
    text = r.choices[0].text
    assert r.usage.completion_tokens == 5 and set(text.split()) <= {"yes", "no"}


def test_stop_string_across_tokens_is_withheld_while_streaming(server: Server) -> None:
    base = complete(server, FRANCE, max_tokens=8).choices[0].text  # " Paris.\n\nThe answer..."
    stop = base[base.index("Paris") + 3 : base.index("Paris") + 7]  # "is.\n": spans two tokens
    chunks = list(
        client(server).completions.create(
            model=MODEL, prompt=FRANCE, max_tokens=8, temperature=0, stop=[stop], stream=True
        )
    )
    texts = [ch.choices[0].text for ch in chunks]
    assert "".join(texts) == base[: base.index(stop)]
    assert not any(stop[:2] in t for t in texts)  # the stop's start was never sent
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].model_extra["stop_reason"] == stop
    kept = complete(server, FRANCE, max_tokens=8, stop=[stop], include_stop_str_in_output=True)
    assert kept.choices[0].text == base[: base.index(stop) + len(stop)]


def test_cjk_streams_without_broken_characters(server: Server) -> None:
    full = complete(server, CJK, max_tokens=16).choices[0].text
    chunks = list(
        client(server).completions.create(
            model=MODEL, prompt=CJK, max_tokens=16, temperature=0, stream=True
        )
    )
    texts = [ch.choices[0].text for ch in chunks]
    assert "".join(texts) == full and any("\u4e00" <= c <= "\u9fff" for c in full)
    assert not any("\ufffd" in t for t in texts)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 21},
         "top_logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": "x", "early_stopping": True}, "early_stopping"),
        ("/v1/completions", {"prompt": "x", "allowed_token_ids": [10**6]}, "allowed_token_ids"),
        ("/v1/completions", {"prompt": "x", "min_p": 2}, "min_p"),
    ],
)  # fmt: skip
def test_bad_sampling_combinations_are_400(
    server: Server, path: str, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
