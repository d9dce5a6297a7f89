"""Fill-in-the-middle against real servers: a tiny random model whose tokenizer has StarCoder's
FIM tokens (the bundled SmolLM2 tokenizer plus the markers) and one without them. `suffix`
through the official openai client, llama.cpp's /infill over raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.e2e.conftest import Server

FIM_MARKERS = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
PREFIX, SUFFIX = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def fim_tokenizer(bundled_gguf_path: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    path = Path(bundled_gguf_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.add_special_tokens({"additional_special_tokens": FIM_MARKERS})
    return tokenizer


@pytest.fixture(scope="module")
def fim_model_dir(tmp_path_factory: pytest.TempPathFactory, fim_tokenizer: Any) -> Path:
    """A tiny random llama whose vocabulary holds the FIM markers (ids 49152..49155)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("tiny-fim")
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(fim_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    model.save_pretrained(str(directory))
    fim_tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def fim_servers(
    start_server: Any, fim_model_dir: Path, tiny_hf_model_dir: Callable[..., Path]
) -> dict[str, Server]:
    """'fim' (markers in the vocabulary) and 'plain' (none), started in parallel."""
    plain_dir = tiny_hf_model_dir("llama")
    started = {
        "fim": start_server("fim", str(fim_model_dir), "--served-model-name", "fim", wait=False),
        "plain": start_server("plain", str(plain_dir), "--served-model-name", "plain", wait=False),
    }
    for server in started.values():
        start_server.wait_healthy(server)
    return started


@pytest.fixture(scope="module")
def fim_server(fim_servers: dict[str, Server]) -> Server:
    return fim_servers["fim"]


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def expected_prompt(tokenizer: Any, prefix: str, suffix: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids
    encode = tokenizer.encode
    return [
        ids("<fim_prefix>"),
        *encode(prefix, add_special_tokens=False),
        ids("<fim_suffix>"),
        *encode(suffix, add_special_tokens=False),
        ids("<fim_middle>"),
    ]


def test_suffix_prompt_is_the_fim_sequence(fim_server: Server, fim_tokenizer: Any) -> None:
    """The engine saw [fim_prefix] prefix [fim_suffix] suffix [fim_middle]: prompt_logprobs name
    every prompt token after the first, and usage counts them all."""
    completion = client(fim_server).completions.create(
        model="fim",
        prompt=PREFIX,
        suffix=SUFFIX,
        max_tokens=4,
        temperature=0,
        extra_body={"prompt_logprobs": 0},
    )
    expected = expected_prompt(fim_tokenizer, PREFIX, SUFFIX)
    assert completion.usage is not None and completion.usage.prompt_tokens == len(expected)
    entries = completion.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    assert entries[0] is None and len(entries) == len(expected)
    seen = [int(next(iter(entry))) for entry in entries[1:]]
    assert seen == expected[1:]


def test_suffix_stream_equals_non_stream(fim_server: Server) -> None:
    openai_client = client(fim_server)
    args: dict[str, Any] = dict(
        model="fim", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0
    )
    whole = openai_client.completions.create(**args)
    stream = openai_client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage == whole.usage
    echoed = openai_client.completions.create(**args, echo=True)
    assert echoed.choices[0].text == PREFIX + whole.choices[0].text  # echo shows the prefix


def test_fim_end_token_stops_generation(fim_server: Server, fim_tokenizer: Any) -> None:
    pad = fim_tokenizer.convert_tokens_to_ids("<fim_pad>")
    completion = client(fim_server).completions.create(
        model="fim",
        prompt=PREFIX,
        suffix=SUFFIX,
        max_tokens=8,
        temperature=0,
        logit_bias={str(pad): 100},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.text == ""
    assert choice.model_extra["stop_reason"] == pad  # type: ignore[index]


def test_suffix_on_a_model_without_fim_tokens_is_400(fim_servers: dict[str, Server]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(fim_servers["plain"]).completions.create(
            model="plain", prompt="a", suffix="b", max_tokens=1
        )
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "suffix"
    assert "no FIM tokens" in error["message"]
    r = httpx.post(f"{fim_servers['plain'].url}/infill", json={"input_prefix": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_suffix"


def test_infill_matches_suffix_and_streams(fim_server: Server, fim_tokenizer: Any) -> None:
    body = {
        "input_prefix": PREFIX,
        "input_suffix": SUFFIX,
        "n_predict": 12,
        "temperature": 0,
        "cache_prompt": True,
        "return_tokens": True,
    }
    r = httpx.post(f"{fim_server.url}/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["stop"] is True and result["stop_type"] in {"eos", "limit"}
    assert result["tokens_evaluated"] == len(expected_prompt(fim_tokenizer, PREFIX, SUFFIX))
    assert result["tokens_predicted"] == len(result["tokens"])
    same = client(fim_server).completions.create(
        model="fim", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0
    )
    assert result["content"] == same.choices[0].text  # one FIM path

    with httpx.stream(
        "POST", f"{fim_server.url}/infill", json={**body, "stream": True}, timeout=60
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in stream.iter_lines() if line]
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    assert all(line.startswith("data: {") for line in lines)  # no [DONE]
    assert [e["stop"] for e in events][-1] is True and not any(e["stop"] for e in events[:-1])
    assert "".join(e["content"] for e in events) == result["content"]

    r = httpx.post(f"{fim_server.url}/infill", json={**body, "samplers": ["top_k"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "samplers"
