"""Fill-in-the-middle: FIM tokens found in real tokenizers' vocabularies, prompts built from
them, and the server's `suffix` and /infill paths against the fake engine."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.unit.fake_engine import (
    MODEL,
    ByteTokenizer,
    FakeAsyncEngine,
    assert_error,
    client_for,
    make_app,
    sse_events,
)
from tokenmill.server.protocol import InfillRequest
from tokenmill.server.routers.infill import _select_fields, to_completion_request
from tokenmill.tokenizer.fim import FimTokens, detect_fim, leading_special_ids

STARCODER = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
QWEN = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
QWEN_REPO = ["<|repo_name|>", "<|file_sep|>"]


@pytest.fixture(scope="module")
def smol_tokenizer(bundled_gguf_path: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    path = Path(bundled_gguf_path)
    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


def with_tokens(tokenizer: Any, tokens: list[str]) -> Any:
    """A copy of the tokenizer with these special tokens added (as a fine-tune would)."""
    clone = copy.deepcopy(tokenizer)
    clone.add_special_tokens({"additional_special_tokens": tokens})
    return clone


# --- detection ------------------------------------------------------------------------


def test_bundled_smollm2_has_no_fim_tokens(smol_tokenizer: Any) -> None:
    """SmolLM2's vocabulary keeps StarCoder's <reponame>/<file_sep> but not the FIM markers:
    the bundled model cannot infill."""
    vocab = smol_tokenizer.get_vocab()
    assert "<file_sep>" in vocab and "<fim_prefix>" not in vocab
    assert detect_fim(vocab) is None


def test_starcoder_family_detected_with_its_end_tokens(smol_tokenizer: Any) -> None:
    tok = with_tokens(smol_tokenizer, STARCODER)
    vocab = tok.get_vocab()
    fim = detect_fim(vocab)
    assert fim is not None and fim.family == "starcoder"
    assert (fim.prefix_id, fim.suffix_id, fim.middle_id) == (
        vocab["<fim_prefix>"], vocab["<fim_suffix>"], vocab["<fim_middle>"]
    )  # fmt: skip
    ends = set(fim.end_ids)
    assert {vocab["<fim_pad>"], vocab["<|endoftext|>"], vocab["<file_sep>"]} <= ends
    assert {fim.prefix_id, fim.suffix_id, fim.middle_id} <= ends
    assert fim.repo_id == vocab["<reponame>"] and fim.file_sep_id == vocab["<file_sep>"]


def test_qwen_family_detected(smol_tokenizer: Any) -> None:
    tok = with_tokens(smol_tokenizer, [*QWEN, *QWEN_REPO])
    vocab = tok.get_vocab()
    fim = detect_fim(vocab)
    assert fim is not None and fim.family == "qwen"
    assert fim.prefix_id == vocab["<|fim_prefix|>"] and fim.middle_id == vocab["<|fim_middle|>"]
    assert vocab["<|fim_pad|>"] in fim.end_ids and vocab["<|endoftext|>"] in fim.end_ids
    assert fim.repo_id == vocab["<|repo_name|>"] and fim.file_sep_id == vocab["<|file_sep|>"]
    # the markers are single tokens in text, as the model was trained
    ids = tok.encode("a<|fim_suffix|>b", add_special_tokens=False)
    assert fim.suffix_id in ids


def test_partial_marker_sets_are_not_fim() -> None:
    assert detect_fim({"<fim_prefix>": 1, "<fim_suffix>": 2}) is None
    assert detect_fim({"<|fim_prefix|>": 1, "<|fim_middle|>": 3}) is None


@pytest.mark.parametrize(
    ("vocab", "family", "ends"),
    [
        (
            {"<｜fim▁begin｜>": 5, "<｜fim▁hole｜>": 6, "<｜fim▁end｜>": 7, "<|EOT|>": 8},
            "deepseek",
            {8, 5, 6, 7},
        ),
        (
            {"▁<PRE>": 32007, "▁<SUF>": 32008, "▁<MID>": 32009, "▁<EOT>": 32010},
            "codellama",
            {32010},
        ),
        ({"<PRE>": 1, "<SUF>": 2, "<MID>": 3, "<EOT>": 4}, "codellama", {4}),
        (
            {"<fim-prefix>": 1, "<fim-suffix>": 2, "<fim-middle>": 3, "<fim-pad>": 4},
            "santacoder",
            {4},
        ),
    ],
)
def test_other_families(vocab: dict[str, int], family: str, ends: set[int]) -> None:
    fim = detect_fim(vocab)
    assert fim is not None and fim.family == family
    assert ends <= set(fim.end_ids)


# --- prompts --------------------------------------------------------------------------

FIM = FimTokens("test", prefix_id=100, suffix_id=101, middle_id=102, end_ids=(103,))


def test_psm_and_spm_orders() -> None:
    assert FIM.build([1, 2], [3]) == [100, 1, 2, 101, 3, 102]
    assert FIM.build([1, 2], [3], order="spm") == [101, 3, 100, 1, 2, 102]
    assert FIM.build([], [], leading_ids=[9], extra_ids=[7], middle_ids=[8]) == [
        9, 7, 100, 101, 102, 8
    ]  # fmt: skip
    with pytest.raises(ValueError):
        FIM.build([1], [2], order="mps")  # type: ignore[arg-type]


def test_extra_context_with_and_without_repo_markers() -> None:
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    files = [("a.py", "x")]
    assert FIM.extra_context(files, encode) == [ord("x")]
    assert FIM.extra_context([], encode) == []
    repo = FimTokens("test", 100, 101, 102, (103,), repo_id=104, file_sep_id=105)
    assert repo.extra_context(files, encode) == [
        104, *encode("myproject\n"), 105, *encode("a.py\nx"), 105, *encode("filename\n")
    ]  # fmt: skip


def test_leading_special_ids(smol_tokenizer: Any) -> None:
    assert leading_special_ids(lambda t, s: smol_tokenizer.encode(t, add_special_tokens=s)) == []
    assert leading_special_ids(ByteTokenizer().encode) == [0]  # BOS


# --- the server, against the fake engine ------------------------------------------------

MARKERS = {"<fim_prefix>": 250, "<fim_suffix>": 251, "<fim_middle>": 252, "<fim_pad>": 253}


class FimByteTokenizer(ByteTokenizer):
    def get_vocab(self) -> dict[str, int]:
        return {**{chr(b): b + 2 for b in range(128)}, **MARKERS}


@pytest.fixture
def fim_engine() -> FakeAsyncEngine:
    engine = FakeAsyncEngine()
    engine.tokenizer.hf = FimByteTokenizer()
    return engine


@pytest.fixture
async def fim_client(fim_engine: FakeAsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app(fim_engine)) as client:
        yield client


def ids(text: str) -> list[int]:
    return [b + 2 for b in text.encode()]


pytestmark = pytest.mark.anyio


async def test_suffix_builds_the_psm_prompt(
    fim_client: httpx.AsyncClient, fim_engine: FakeAsyncEngine
) -> None:
    body = {"prompt": "def f(", "suffix": "):", "max_tokens": 3, "echo": True}
    r = await fim_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    prompt, params, _ = fim_engine.requests[-1]
    assert prompt == [0, 250, *ids("def f("), 251, *ids("):"), 252]  # BOS first
    assert {250, 251, 252, 253} <= set(params.stop_token_ids)
    choice = r.json()["choices"][0]
    assert choice["text"] == "def f(abc"  # echo shows the prefix, then the middle
    assert r.json()["usage"]["prompt_tokens"] == len(prompt)


async def test_suffix_with_token_ids_and_empty_prefix(
    fim_client: httpx.AsyncClient, fim_engine: FakeAsyncEngine
) -> None:
    body = {"prompt": [0, 5, 6], "suffix": "z", "max_tokens": 1, "stop_token_ids": [253]}
    assert (await fim_client.post("/v1/completions", json=body)).status_code == 200
    prompt, params, _ = fim_engine.requests[-1]
    assert prompt == [0, 250, 5, 6, 251, *ids("z"), 252]  # the given BOS moved first, once
    assert params.stop_token_ids.count(253) == 1
    body = {"prompt": "", "suffix": "z", "max_tokens": 1, "add_special_tokens": False}
    assert (await fim_client.post("/v1/completions", json=body)).status_code == 200
    assert fim_engine.requests[-1][0] == [250, 251, *ids("z"), 252]


async def test_suffix_streams_the_same_text(fim_client: httpx.AsyncClient) -> None:
    body = {"prompt": "a", "suffix": "b", "max_tokens": 4}
    whole = (await fim_client.post("/v1/completions", json=body)).json()
    r = await fim_client.post("/v1/completions", json={**body, "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"truncate_prompt_tokens": 3}, "truncate_prompt_tokens"),
        ({"prompt": []}, "prompt"),
        ({"suffix": "x" * (4 * 1024 * 1024 + 1)}, "suffix"),
    ],
)
async def test_suffix_combinations_that_are_400(
    fim_client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    body = {"prompt": "a", "suffix": "b", **extra}
    assert_error(await fim_client.post("/v1/completions", json=body), 400, param)


async def test_suffix_without_fim_tokens_is_400(client: httpx.AsyncClient) -> None:
    message = assert_error(
        await client.post("/v1/completions", json={"prompt": "a", "suffix": "b"}), 400, "suffix"
    )
    assert "no FIM tokens" in message


async def test_infill_prompt_and_response_shape(
    fim_client: httpx.AsyncClient, fim_engine: FakeAsyncEngine
) -> None:
    body = {
        "input_prefix": "p",
        "input_suffix": "s",
        "input_extra": [{"filename": "f.py", "text": "x"}],
        "prompt": "m",
        "n_predict": 2,
        "temperature": 0,
        "return_tokens": True,
        "cache_prompt": True,
        "n_probs": 0,
    }
    r = await fim_client.post("/infill", json=body)
    assert r.status_code == 200, r.text
    prompt, params, _ = fim_engine.requests[-1]
    assert prompt == [0, *ids("x"), 250, *ids("p"), 251, *ids("s"), 252, *ids("m")]
    assert params.temperature == 0 and params.max_tokens == 2 and params.top_k == 40
    result = r.json()
    assert result["content"] == "ab" and result["stop"] is True
    assert result["tokens"] == ids("ab") and result["stop_type"] == "limit"
    assert result["tokens_predicted"] == 2 and result["tokens_evaluated"] == len(prompt)
    r = await fim_client.post("/infill", json={**body, "spm_infill": True})
    assert fim_engine.requests[-1][0][:5] == [0, *ids("x"), 251, *ids("s"), 250]
    r = await fim_client.post("/infill", json={**body, "response_fields": ["content", "a/b"]})
    assert r.json() == {"content": "ab"}


async def test_infill_stream_shape(fim_client: httpx.AsyncClient) -> None:
    body = {"input_prefix": "p", "input_suffix": "s", "n_predict": 3, "stream": True}
    r = await fim_client.post("/infill", json=body)
    assert r.status_code == 200 and "[DONE]" not in r.text
    events = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n") if e]
    assert [e["stop"] for e in events] == [False, False, False, True]
    assert "".join(e["content"] for e in events) == "abc"
    assert events[-1]["stop_type"] == "limit" and events[-1]["tokens_predicted"] == 3


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"samplers": ["top_k"]}, "samplers"),
        ({"n_probs": 3}, "n_probs"),
        ({"t_max_predict_ms": 250}, "t_max_predict_ms"),
        ({"input_extra": [{"text": "x", "lang": "py"}]}, None),
        ({"n_predict": 10_000}, "n_predict"),
    ],
)
async def test_infill_unsupported_fields_are_400(
    fim_client: httpx.AsyncClient, extra: dict[str, Any], param: str | None
) -> None:
    r = await fim_client.post("/infill", json={"input_prefix": "p", **extra})
    assert_error(r, 400, param)


async def test_infill_without_fim_tokens_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/infill", json={"input_prefix": "p", "input_suffix": "s"})
    assert "no FIM tokens" in assert_error(r, 400, "input_suffix")


def test_infill_to_completion_request() -> None:
    body = InfillRequest.model_validate(
        {"model": MODEL, "input_prefix": "a", "n_predict": -1, "top_k": 0, "temperature": -1}
    )
    request = to_completion_request(body)
    assert request.prompt == "a" and request.suffix == ""
    assert request.max_tokens is None and request.top_k == -1 and request.temperature == 0
    assert request.cache_salt is None and request.seed is None
    salted = to_completion_request(body.model_copy(update={"cache_prompt": False}))
    assert salted.cache_salt is not None
    assert _select_fields({"a": {"b": 1}, "c": 2}, ["a/b", "x"]) == {"b": 1}
