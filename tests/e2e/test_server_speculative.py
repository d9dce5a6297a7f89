"""Servers with --speculative-config (vLLM's n-gram speculation, and a draft model: the
bundled model drafting for itself): the same answers as the server without it, streamed or
not; vLLM's spec-decode counters on /metrics; a config it cannot run stops it before the
model loads, naming what is wrong."""

from __future__ import annotations

import json
import subprocess

import pytest
from openai import OpenAI

from tests.e2e.conftest import Server, free_port, metric, serve_command

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}  # fmt: skip
COPY = [{"role": "user", "content": "Repeat exactly: the red fox ran to the old mill by the "
         "river, and the red fox ran back to the old mill by the river."}]  # fmt: skip


@pytest.fixture(scope="module")
def spec_servers(start_server, bundled_gguf_path) -> dict[str, Server]:
    draft = {"model": bundled_gguf_path, "num_speculative_tokens": 3}  # (2 after a 1st guess)
    servers = {
        "ngram": start_server("speculative", "--speculative-config", json.dumps(SPEC), wait=False),
        "draft": start_server("drafted", "--speculative-config", json.dumps(draft), wait=False),
    }
    for server in servers.values():
        start_server.wait_healthy(server)
    return servers


def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(server: Server, model: str, stream: bool = False) -> tuple[str, list[str]]:
    """The answer's text and its tokens (from logprobs), greedy."""
    body = dict(model=model, messages=COPY, max_tokens=48, temperature=0, logprobs=True)
    if not stream:
        choice = client(server).chat.completions.create(**body).choices[0]  # type: ignore[call-overload]
        return choice.message.content, [t.token for t in choice.logprobs.content]
    text, tokens = "", []
    for chunk in client(server).chat.completions.create(**body, stream=True):  # type: ignore[call-overload]
        if chunk.choices:
            delta = chunk.choices[0]
            text += delta.delta.content or ""
            tokens += [t.token for t in (delta.logprobs.content if delta.logprobs else [])]
    return text, tokens


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_answers_match_the_server_without_speculation(
    spec_servers: dict[str, Server], server: Server, method: str
) -> None:
    spec_server = spec_servers[method]
    expected = chat(server, "smol")
    spec_model = client(spec_server).models.list().data[0].id
    assert chat(spec_server, spec_model) == expected
    assert chat(spec_server, spec_model, stream=True) == expected
    drafts = metric(spec_server, "vllm:spec_decode_num_draft_tokens_total")
    accepted = metric(spec_server, "vllm:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafts
    if method == "draft":  # the model's own greedy guesses hold, but for those guessed after
        assert drafts - accepted <= 2 * 2  # the end of the answer: 2 at most in each chat
    assert metric(spec_server, "vllm:spec_decode_num_drafts_total") > 0
    first = metric(spec_server, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position="0")
    assert 0 < first <= accepted


def test_a_config_it_cannot_run_stops_the_server_naming_the_problem() -> None:
    bad = json.dumps({"method": "eagle", "model": "some/draft", "num_speculative_tokens": 2})
    done = subprocess.run(
        serve_command("--speculative-config", bad, "--port", str(free_port())),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "method 'eagle' is not supported" in done.stderr
    missing = json.dumps({"model": "/no/such/draft", "num_speculative_tokens": 2})
    done = subprocess.run(
        serve_command("--speculative-config", missing, "--port", str(free_port())),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "/no/such/draft" in done.stderr
