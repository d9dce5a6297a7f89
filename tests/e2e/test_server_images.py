"""Images in chat against a real `tokenmill serve` of a tiny Idefics3 (SmolVLM) model, through
the official openai client (sync, async, streaming) and raw HTTP for the error paths.

Greedy tokens equal transformers' for the same image and text; `usage` and `/tokenize`
count the image tokens; every bad image (corrupt, a decompression bomb, too many, a URL to
a loopback address or another scheme) is a 400 naming its content part, after which the
server still serves and holds no KV blocks.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from tests.e2e.conftest import Server, metric

MODEL = "tiny-vl"
QUESTION = "What is in this picture?"


def picture(seed: int, size: tuple[int, int] = (50, 40)) -> Image.Image:
    pixels = np.random.RandomState(seed).rand(size[1], size[0], 3) * 255
    return Image.fromarray(pixels.astype("uint8"))


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    kind = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def messages(*urls: str, text: str = QUESTION) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def tiny_vl(tiny_vision_model_dir: Any, start_server: Any) -> tuple[Server, Path]:
    directory = tiny_vision_model_dir("idefics3")
    server = start_server(
        "tiny-vl", str(directory), "--dtype", "float32", "--served-model-name", MODEL,
        "--allowed-media-domains", "127.0.0.1", "localhost",
        "--limit-mm-per-prompt", '{"image": 2}', "--return-tokens-as-token-ids",
    )  # fmt: skip
    return server, directory


@pytest.fixture(scope="module")
def reference(tiny_vl: tuple[Server, Path]) -> Any:
    """(prompt ids, greedy ids) from transformers for images decoded from the data URLs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    directory = tiny_vl[1]
    processor = AutoProcessor.from_pretrained(str(directory))
    model = AutoModelForImageTextToText.from_pretrained(str(directory), dtype=torch.float32)

    def run(urls: list[str], max_tokens: int) -> tuple[list[int], list[int]]:
        images = [
            Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB")
            for u in urls
        ]
        content = [{"type": "image"} for _ in urls] + [{"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.eval().generate(
                **inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
            )
        n = inputs["input_ids"].shape[1]
        return inputs["input_ids"][0].tolist(), out[0, n:].tolist()

    return run


def token_ids(logprobs: Any) -> list[int]:
    """The sampled ids, from logprobs named "token_id:N" (--return-tokens-as-token-ids)."""
    return [int(t.token.removeprefix("token_id:")) for t in logprobs.content]


def test_chat_with_an_image_equals_transformers(tiny_vl, reference) -> None:
    server, _ = tiny_vl
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    url = data_url(picture(0))
    prompt_ids, want = reference([url], 8)
    out = client.chat.completions.create(
        model=MODEL, messages=messages(url), max_tokens=8, temperature=0, logprobs=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert token_ids(out.choices[0].logprobs) == want
    assert out.usage.prompt_tokens == len(prompt_ids)  # the image tokens count
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages(url), max_tokens=8, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == out.choices[0].message.content
    tokenized = httpx.post(
        f"{server.url}/tokenize", json={"model": MODEL, "messages": messages(url)}, timeout=30
    ).json()
    assert tokenized["tokens"] == prompt_ids


def test_concurrent_requests_with_different_images_and_formats(tiny_vl, reference) -> None:
    """JPEG, WebP and two PNGs in flight together (with n=2): each equals its own reference."""
    server, _ = tiny_vl
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
    cases = [
        [data_url(picture(1, (70, 45)), "JPEG")],
        [data_url(picture(2, (33, 60)), "WEBP")],
        [data_url(picture(3)), data_url(picture(4, (64, 64)))],
    ]

    async def run(urls: list[str]) -> Any:
        return await client.chat.completions.create(
            model=MODEL, messages=messages(*urls), max_tokens=6, temperature=0, n=2,
            logprobs=True, extra_body={"ignore_eos": True},
        )  # fmt: skip

    async def main() -> list[Any]:
        try:
            return await asyncio.gather(*(run(urls) for urls in cases))
        finally:
            await client.close()

    for urls, out in zip(cases, asyncio.run(main()), strict=True):
        want = reference(urls, 6)[1]
        assert [token_ids(c.logprobs) for c in out.choices] == [want, want]


def test_structured_output_with_an_image(tiny_vl) -> None:
    server, _ = tiny_vl
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    schema = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 8}},
              "required": ["color"], "additionalProperties": False}  # fmt: skip
    out = client.chat.completions.create(
        model=MODEL, messages=messages(data_url(picture(5))), max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )  # fmt: skip
    assert set(json.loads(out.choices[0].message.content)) == {"color"}


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height (the pixels are never there)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))


BAD_URLS = {
    "corrupt": (
        "data:image/png;base64," + base64.b64encode(b"not a png at all").decode(),
        "corrupt",
    ),
    "bad base64": ("data:image/png;base64,@@@@", "base64"),
    "not an image type": ("data:text/plain;base64,aGVsbG8=", "image"),
    "bomb": (
        "data:image/png;base64," + base64.b64encode(_bomb_png(30000, 30000)).decode(),
        "pixels",
    ),
    "loopback": ("http://127.0.0.1:9/cat.png", "loopback"),
    "private by name": ("http://localhost:9/cat.png", "loopback"),
    "domain not allowed": ("http://example.com/cat.png", "allowed"),
    "file": ("file:///etc/passwd", "scheme"),
}


@pytest.mark.parametrize("case", BAD_URLS)
def test_a_bad_image_is_a_400_naming_its_part(tiny_vl, case) -> None:
    server, _ = tiny_vl
    url, words = BAD_URLS[case]
    body = {"model": MODEL, "messages": messages(data_url(picture(6)), url), "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages.0.content.1", error
    assert words in error["message"], error


def test_limits_and_a_text_model_answer_400_then_the_server_serves(tiny_vl) -> None:
    server, _ = tiny_vl
    url = data_url(picture(7))
    three = {"model": MODEL, "messages": messages(url, url, url), "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=three, timeout=30)
    assert r.status_code == 400 and "at most 2 images" in r.json()["error"]["message"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    out = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=3)
    assert out.usage.completion_tokens == 3
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, "vllm:kv_cache_usage_perc") == 0


def test_a_text_only_model_says_it_takes_no_images(server: Server) -> None:
    body = {"model": "smol", "messages": messages(data_url(picture(8))), "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert "does not accept images" in r.json()["error"]["message"]


def test_responses_api_takes_input_image(tiny_vl) -> None:
    """An input_image part through /v1/responses runs as the same chat request."""
    server, _ = tiny_vl
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    url = data_url(picture(9))
    chat = client.chat.completions.create(
        model=MODEL, messages=messages(url), max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = [{"type": "input_image", "image_url": url},
               {"type": "input_text", "text": QUESTION}]  # fmt: skip
    response = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": content}], max_output_tokens=6,
        temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_mm_processor_kwargs_per_request(tiny_vl) -> None:
    """Idefics3 without image splitting: the global image only, so fewer prompt tokens; an
    option its processor lacks is a 400 naming the field."""
    server, _ = tiny_vl
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    body = {"model": MODEL, "messages": messages(data_url(picture(10, (64, 64)))), "max_tokens": 1}
    split = client.chat.completions.create(**body)
    whole = client.chat.completions.create(
        **body, extra_body={"mm_processor_kwargs": {"do_image_splitting": False}}
    )
    assert whole.usage.prompt_tokens < split.usage.prompt_tokens
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={**body, "mm_processor_kwargs": {"nope": 1}},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "mm_processor_kwargs"


def test_tools_with_an_image(tiny_vl) -> None:
    """A vision template without tool support gets the tools as a system text part; the
    required call is a valid call of the tool."""
    server, _ = tiny_vl
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    tool = {"type": "function", "function": {"name": "describe", "parameters": {
        "type": "object", "properties": {"color": {"type": "string", "maxLength": 6}},
        "required": ["color"], "additionalProperties": False}}}  # fmt: skip
    system = {"role": "system", "content": "You describe pictures."}
    out = client.chat.completions.create(
        model=MODEL, messages=[system, *messages(data_url(picture(11)))], max_tokens=60,
        temperature=0, tools=[tool], tool_choice="required",
    )  # fmt: skip
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "describe"
    assert set(json.loads(call.function.arguments)) == {"color"}


def test_embeddings_refuse_images_before_fetching_them(tiny_vl) -> None:
    """The chat form of /v1/embeddings takes no images: a 400 naming the part, said before
    the URL is fetched (a fetch would have been refused as loopback)."""
    server, _ = tiny_vl
    body = {"model": MODEL, "messages": messages("http://127.0.0.1:9/cat.png")}
    r = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages.0.content.0"
    assert "embeddings of images" in error["message"]
