"""/v1/embeddings and /pooling against real servers, through the official openai client: a tiny
random float32 model (compared with transformers' last hidden states) and the bundled GGUF
(served beside generation; compared with transformers' dequantized model)."""

from __future__ import annotations

import asyncio
import base64
import struct
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from tests.e2e.conftest import Server

TEXTS = [
    "The weather today is sunny with a chance of rain later in the evening, so",
    "A short one.",
    "Paged attention keeps the keys and values of every sequence in fixed-size blocks.",
]


def _last_hidden(model: Any, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).last_hidden_state[0]


@pytest.fixture(scope="module")
def tiny(tiny_hf_model_dir: Any, start_server: Any) -> tuple[Server, Path]:
    directory = tiny_hf_model_dir("llama", is_matryoshka=True)
    server = start_server("tiny-embed", str(directory), "--dtype", "float32",
                          "--served-model-name", "tiny")  # fmt: skip
    return server, directory


def test_embeddings_equal_transformers_pooled_last_token(tiny: tuple[Server, Path]) -> None:
    """Within 1e-4 (float32 both sides, unit vectors); batched == alone; the openai client's
    default base64 encoding decodes to the same floats."""
    from transformers import AutoModel, AutoTokenizer

    server, directory = tiny
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    reference = AutoModel.from_pretrained(str(directory), dtype=torch.float32).eval()
    batch = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    total = 0
    for text, item in zip(TEXTS, batch.data, strict=True):
        ids = tokenizer.encode(text)
        total += len(ids)
        expected = F.normalize(_last_hidden(reference, ids)[-1], dim=-1)
        torch.testing.assert_close(torch.tensor(item.embedding), expected, atol=1e-4, rtol=0)
        alone = client.embeddings.create(model="tiny", input=text)  # base64 on the wire
        torch.testing.assert_close(
            torch.tensor(alone.data[0].embedding), torch.tensor(item.embedding), atol=1e-5, rtol=0
        )
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == total
    assert batch.model == "tiny" and batch.object == "list"


def test_dimensions_on_a_matryoshka_model_and_token_id_inputs(tiny: tuple[Server, Path]) -> None:
    server, _ = tiny
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    full = client.embeddings.create(model="tiny", input=[[5, 6, 7, 8]], encoding_format="float")
    short = client.embeddings.create(model="tiny", input=[5, 6, 7, 8], dimensions=16)
    assert len(full.data[0].embedding) == 64 and len(short.data[0].embedding) == 16
    expected = F.normalize(torch.tensor(full.data[0].embedding)[:16], dim=-1)
    torch.testing.assert_close(torch.tensor(short.data[0].embedding), expected, atol=1e-5, rtol=0)
    assert short.usage.prompt_tokens == 4


def test_bundled_model_embeds_beside_a_running_generation(
    server: Server, hf_reference: Any
) -> None:
    """An embedding answered while a long stream generates, on the same engine; the vector is
    transformers' (the same GGUF, dequantized) within cosine 0.99 (the default path's weights
    stay 4-bit and its activations are quantized for the integer kernels)."""

    async def run() -> tuple[list[float], int]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
        stream = await client.completions.create(
            model="smol", prompt="Once upon a time", max_tokens=200, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = 0
        async for _ in stream:
            chunks += 1
            if chunks == 3:  # generating now: embed while it runs
                result = await client.embeddings.create(model="smol", input=TEXTS[0])
                await stream.close()
                return result.data[0].embedding, chunks
        raise AssertionError("the stream ended early")

    embedding, _ = asyncio.run(run())
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": TEXTS[0]}).json()["tokens"]
    expected = F.normalize(_last_hidden(hf_reference.model, ids)[-1].float(), dim=-1)
    cosine = float(torch.dot(torch.tensor(embedding), expected))
    assert cosine > 0.99, cosine


def test_pooling_endpoint_and_the_chat_form(server: Server) -> None:
    pooled = httpx.post(f"{server.url}/pooling", json={"model": "smol", "input": TEXTS[1]})
    assert pooled.status_code == 200, pooled.text
    body = pooled.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "pooling"
    embedded = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS[1]}).json()
    assert body["data"][0]["data"] == embedded["data"][0]["embedding"]

    messages = [{"role": "user", "content": TEXTS[1]}]
    chat = httpx.post(f"{server.url}/v1/embeddings", json={"messages": messages}).json()
    rendered = httpx.post(
        f"{server.url}/tokenize", json={"messages": messages, "add_generation_prompt": False}
    ).json()
    assert chat["usage"]["prompt_tokens"] == rendered["count"]
    b64 = httpx.post(
        f"{server.url}/v1/embeddings", json={"messages": messages, "encoding_format": "base64"}
    ).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(chat["data"][0]["embedding"], abs=1e-6)


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({"input": "hi", "dimensions": 8}, "dimensions", 400),  # not a Matryoshka model
        ({"input": []}, "input", 400),
        ({"input": [""]}, "input", 400),
        ({"input": [[1, 2, 10**9]]}, "input", 400),
        ({"input": [[7] * 600]}, "input", 400),  # over max_model_len 512
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", 400),
        ({"input": "hi", "model": "nope"}, "model", 404),
        ({"input": "hi", "dimensions": 0}, "dimensions", 400),
    ],
)
def test_bad_embedding_requests(server: Server, body: dict[str, Any], param: str, status: int):
    response = httpx.post(f"{server.url}/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_embeddings_need_the_api_key(auth_server: Server) -> None:
    for path in ("/v1/embeddings", "/pooling"):
        response = httpx.post(f"{auth_server.url}{path}", json={"input": "hi"})
        assert response.status_code == 401, path
        ok = httpx.post(
            f"{auth_server.url}{path}", json={"input": "hi"}, headers=auth_server.headers
        )
        assert ok.status_code == 200, ok.text


def test_embeddings_count_in_vllm_metrics(tiny: tuple[Server, Path]) -> None:
    from tests.e2e.conftest import metric

    server, _ = tiny
    before = metric(server, "vllm:request_success_total", finished_reason="stop")
    prompt_before = metric(server, "vllm:prompt_tokens_total")
    latency_before = metric(server, "vllm:e2e_request_latency_seconds_count")
    response = httpx.post(f"{server.url}/v1/embeddings", json={"input": [[5, 6, 7], [8, 9]]})
    assert response.status_code == 200, response.text
    assert metric(server, "vllm:request_success_total", finished_reason="stop") == before + 2
    assert metric(server, "vllm:prompt_tokens_total") == prompt_before + 5
    assert metric(server, "vllm:e2e_request_latency_seconds_count") == latency_before + 2


def test_score_and_rerank_are_cosines_of_the_served_embeddings(tiny: tuple[Server, Path]) -> None:
    """vLLM's /score and /rerank with an embedding model: the cosine similarity of the same
    vectors /v1/embeddings serves; rerank orders the documents by it."""
    server, _ = tiny
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    vectors = [
        torch.tensor(d.embedding)
        for d in client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float").data
    ]
    expected = [F.cosine_similarity(vectors[0], v, dim=0).item() for v in vectors[1:]]
    score = httpx.post(f"{server.url}/v1/score", timeout=60,
                       json={"model": "tiny", "text_1": TEXTS[0], "text_2": TEXTS[1:]})  # fmt: skip
    assert score.status_code == 200, score.text
    assert [d["score"] for d in score.json()["data"]] == pytest.approx(expected, abs=1e-5)
    rerank = httpx.post(
        f"{server.url}/rerank",
        timeout=60,
        json={"query": TEXTS[0], "documents": TEXTS[1:], "top_n": 1},
    ).json()
    (best,) = rerank["results"]
    assert best["index"] == max(range(2), key=lambda i: expected[i])
    assert best["relevance_score"] == pytest.approx(max(expected), abs=1e-5)
    assert best["document"]["text"] == TEXTS[1 + best["index"]]
