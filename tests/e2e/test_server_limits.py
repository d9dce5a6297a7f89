"""Request limits on a real server: bad input is a 400 quickly and the server keeps serving."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from tests.e2e.test_server import MODEL, QUESTION, client

if TYPE_CHECKING:
    from tests.e2e.conftest import Server

JSON = {"content-type": "application/json"}


def assert_serves(server: Server) -> None:
    """The server still answers a normal chat request (greedy: two sampled tokens can be
    three bytes of an emoji, which is no text yet)."""
    response = client(server).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=2, temperature=0
    )
    assert response.choices[0].message.content


def test_huge_n_is_rejected_quickly(server: Server) -> None:
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as info:
        client(server).completions.create(model=MODEL, prompt="Hi", n=10**9, max_tokens=1)
    assert time.monotonic() - start < 5
    assert info.value.param == "n"
    assert "n must be <= 128; got 1000000000" in info.value.message
    assert_serves(server)


@pytest.mark.parametrize(
    "content",
    [
        '{"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        '{"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "top_p": Infinity}',
        "[1, 2]",
        "null",
        '"hello"',
    ],
)
def test_non_finite_and_non_object_bodies_are_400(server: Server, content: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=JSON, timeout=30)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
         "took over"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ],
)  # fmt: skip
def test_malicious_template_is_400_and_the_server_goes_on(
    server: Server, template: str, fragment: str
) -> None:
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=2,
            extra_body={"chat_template": template},
        )
    assert time.monotonic() - start < 30  # the 2 s render budget, not the template's loops
    assert info.value.param == "chat_template"
    assert fragment in info.value.message
    assert_serves(server)
