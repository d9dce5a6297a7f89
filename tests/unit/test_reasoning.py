"""Reasoning: a thought split from the answer the same way streamed or whole; where a prompt
leaves the model; the thought's state machine (the constraint waits for the answer, a budget
forces the end marker); and the server's reasoning_content over a scripted engine."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from tests.unit.fake_engine import client_for, make_app, sse_events
from tests.unit.test_server_tools import WEATHER, ScriptedEngine
from tokenmill.engine.thought import Phase, Thought
from tokenmill.tools.formats import HERMES
from tokenmill.tools.reasoning import ReasoningMarkers, detect_reasoning, split_reasoning

MARKERS = ReasoningMarkers("<think>", "</think>", (7,), (8,))


def _stream_split(text: str, in_thought: bool, cuts: list[int]) -> tuple[str, str]:
    reasoning = content = ""
    for cut in [*cuts, len(text)]:
        split = split_reasoning(text[:cut], MARKERS, in_thought, final=cut == len(text))
        new_reasoning, new_content = split.reasoning or "", split.content
        assert new_reasoning.startswith(reasoning) and new_content.startswith(content)
        reasoning, content = new_reasoning, new_content
    return reasoning, content


@pytest.mark.parametrize(
    ("text", "in_thought", "expected"),
    [
        ("<think>\nLet me see.\n</think>\n\nIt is 4.", False, ("\nLet me see.\n", "It is 4.")),
        ("Let me see.\n</think>\n\nIt is 4.", True, ("Let me see.\n", "It is 4.")),
        ("It is 4.", False, (None, "It is 4.")),
        ("<thin", False, (None, "<thin")),
        ("Still thinking </thi", True, ("Still thinking </thi", "")),
        ("a < b </think> c </think> d", True, ("a < b ", "c </think> d")),
    ],
)
def test_split_and_every_chunking_of_its_stream(text, in_thought, expected):
    whole = split_reasoning(text, MARKERS, in_thought, final=True)
    assert (whole.reasoning, whole.content) == expected
    rng = random.Random(0)
    cuttings = [list(range(1, len(text)))] + [
        sorted(rng.sample(range(1, len(text)), min(k, len(text) - 1)))
        for k in (1, 2, 5)
        for _ in range(10)
    ]
    for cuts in cuttings:
        assert _stream_split(text, in_thought, cuts) == (whole.reasoning or "", whole.content)


def test_prompt_state_and_detection():
    assert MARKERS.prompt_in_thought([1, 2, 7, 5])
    assert not MARKERS.prompt_in_thought([1, 7, 5, 8, 9])
    assert not MARKERS.prompt_in_thought([1, 2])
    vocab = {"<think>": 1, "</think>": 2}
    assert detect_reasoning("{{ '<think>' }}...</think>", vocab) == "qwen3"
    assert detect_reasoning("{{ messages }}", vocab) is None
    assert detect_reasoning("...</think>", {}) is None


class Grammar:
    """A matcher that allows only the token 42 (then anything), recording what it was fed."""

    def __init__(self):
        self.fed: list[int] = []

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()
        bitmask[row, 1] = 1 << 10  # token 42

    def accept_token(self, token_id: int) -> bool:
        self.fed.append(token_id)
        return token_id == 42

    def is_terminated(self) -> bool:
        return False


def _allowed(matcher: Any) -> list[int]:
    mask = torch.zeros(1, 2, dtype=torch.int32)
    matcher.fill_bitmask(mask, 0)
    bits = [(int(mask[0, w]) >> b) & 1 for w in range(2) for b in range(32)]
    return [i for i, on in enumerate(bits) if on]


def test_constraint_waits_for_the_answer_and_a_budget_forces_the_end():
    grammar = Grammar()
    thought = Thought(MARKERS, in_thought=False, grammar=grammar, budget=3)
    assert thought.phase is Phase.OPENING and _allowed(thought.matcher) == [7, 42]
    assert thought.accept(7) and thought.phase is Phase.THINKING
    assert thought.matcher is None  # the thought is free
    for token in (20, 21, 22):  # 3 tokens: the budget
        assert thought.accept(token)
    assert _allowed(thought.matcher) == [8]  # the end marker is forced
    assert not thought.accept(23)
    assert thought.accept(8) and thought.phase is Phase.ANSWERING
    assert thought.num_tokens == 3 and grammar.fed == []
    assert thought.matcher is grammar and thought.accept(42) and grammar.fed == [42]


def test_answer_without_a_thought_and_a_natural_end():
    grammar = Grammar()
    direct = Thought(MARKERS, in_thought=False, grammar=grammar, budget=None)
    assert direct.accept(42) and direct.phase is Phase.ANSWERING and grammar.fed == [42]
    inside = Thought(MARKERS, in_thought=True, grammar=None, budget=10)
    assert inside.accept(5) and inside.accept(8) and inside.phase is Phase.ANSWERING
    assert inside.num_tokens == 1 and inside.matcher is None
    two = ReasoningMarkers("<think>", "</think>", (7,), (8, 9))  # a two-token end marker
    budget = Thought(two, in_thought=True, grammar=None, budget=2)
    assert budget.accept(1) and budget.accept(8)  # the marker's first token, by itself
    assert _allowed(budget.matcher) == [9]  # budget spent: its rest is forced
    assert budget.accept(9) and budget.phase is Phase.ANSWERING


def _markers_engine(script: str) -> ScriptedEngine:
    engine = ScriptedEngine(script, seed=1)
    engine.reasoning_markers = ReasoningMarkers("<think>", "</think>", (1000,), (1001,))
    return engine


@pytest.mark.anyio
@pytest.mark.parametrize("with_tools", [False, True])
async def test_reasoning_content_whole_and_streamed(with_tools):
    answer = HERMES.call_text("get_weather", '{"city": "Paris"}') if with_tools else "It is 4."
    script = "<think>\nTwo and two.\n</think>\n\n" + answer
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "2+2?"}]}
    if with_tools:
        body["tools"] = [WEATHER]
    async with client_for(make_app(_markers_engine(script))) as client:
        whole = (await client.post("/v1/chat/completions", json=body)).json()
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        hidden = (
            await client.post("/v1/chat/completions", json={**body, "include_reasoning": False})
        ).json()
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == "\nTwo and two.\n"
    reasoning = content = ""
    calls = []
    for event in sse_events(streamed.text)[:-1]:
        delta = json.loads(event)["choices"][0]["delta"]
        assert delta.get("reasoning") == delta.get("reasoning_content")
        reasoning += delta.get("reasoning_content") or ""
        content += delta.get("content") or ""
        calls += delta.get("tool_calls") or []
    assert reasoning == message["reasoning_content"]
    assert content == (message["content"] or "")
    if with_tools:
        assert message["content"] is None and whole["choices"][0]["finish_reason"] == "tool_calls"
        assert message["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
        assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    else:
        assert message["content"] == "It is 4."
    assert "reasoning_content" not in hidden["choices"][0]["message"]


@pytest.mark.anyio
async def test_thinking_token_budget_needs_a_reasoning_model():
    body = {"messages": [{"role": "user", "content": "hi"}], "thinking_token_budget": 5}
    async with client_for(make_app(ScriptedEngine("x"))) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert (
        response.status_code == 400 and response.json()["error"]["param"] == "thinking_token_budget"
    )
    async with client_for(make_app(_markers_engine("<think>a</think>b"))) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.anyio
async def test_reasoning_effort_reaches_a_template_that_reads_it():
    template = "{{ reasoning_effort | default('unset') }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    engine = ScriptedEngine("ok")
    body = {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high"}
    async with client_for(make_app(engine)) as client:
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "reasoning_effort"
        used = await client.post("/v1/chat/completions", json={**body, "chat_template": template})
        assert used.status_code == 200, used.text
        bad = await client.post(
            "/v1/chat/completions",
            json={**body, "chat_template": template, "reasoning_effort": "max"},
        )
        assert bad.status_code == 400
    prompt = bytes(i - 2 for i in engine.requests[-1][0] if i >= 2).decode()
    assert prompt.startswith("high|hi")
