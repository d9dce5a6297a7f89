"""A fault while serving one request (model error, grammar backend error) fails that request
alone: its neighbours in the batch finish exactly as they would have, and no block leaks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.errors import RequestFailedError

PROMPTS = ["The capital of France is", "List three colors:", "def add(a, b):"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
POISON = 7  # a prompt starting with this token id makes the model "fail"


@pytest.fixture(scope="module")
def llm(default_llm: Any) -> Any:
    return default_llm


@pytest.fixture(scope="module")
def alone(llm: Any) -> list[list[int]]:
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


def run_to_end(engine: Any) -> dict[str, Any]:
    finished = {}
    while engine.has_unfinished:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def assert_all_blocks_free(llm: Any) -> None:
    pool = llm.engine.core.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_model_error_fails_only_the_poisoned_request(
    llm: Any, alone: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = llm.engine.core.executor
    execute = executor.execute

    def poisoned_execute(scheduled: Any) -> Any:
        if any(s.request.prompt_token_ids[0] == POISON for s in scheduled):
            raise RuntimeError("poisoned input")
        return execute(scheduled)

    monkeypatch.setattr(executor, "execute", poisoned_execute)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ok-{i}", llm.tokenizer.encode(prompt), GREEDY)
    engine.add_request("bad", [POISON, *llm.tokenizer.encode(PROMPTS[0])], GREEDY)
    finished = run_to_end(engine)
    assert finished["bad"].error is not None and "poisoned input" in finished["bad"].error
    for i in range(len(PROMPTS)):
        assert finished[f"ok-{i}"].error is None
        assert finished[f"ok-{i}"].outputs[0].token_ids == alone[i]
    assert_all_blocks_free(llm)


class _BrokenMatcher:
    """A grammar backend that allows everything, then fails on the third token."""

    def __init__(self) -> None:
        self.accepted = 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = -1

    def accept_token(self, token_id: int) -> bool:
        self.accepted += 1
        if self.accepted == 3:
            raise ValueError("grammar backend bug")
        return True

    def is_terminated(self) -> bool:
        return False

    def rollback(self, num_tokens: int) -> None:
        raise NotImplementedError


class _BrokenGrammar:
    def new_matcher(self) -> _BrokenMatcher:
        return _BrokenMatcher()


def test_grammar_backend_error_fails_only_that_request(llm: Any, alone: list[list[int]]) -> None:
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ok-{i}", llm.tokenizer.encode(prompt), GREEDY)
    n2 = SamplingParams(temperature=0.0, max_tokens=12, n=2)
    engine.add_request("bad", llm.tokenizer.encode(PROMPTS[1]), n2, grammar=_BrokenGrammar())
    finished = run_to_end(engine)
    assert "grammar backend bug" in (finished["bad"].error or "")
    for i in range(len(PROMPTS)):
        assert finished[f"ok-{i}"].outputs[0].token_ids == alone[i]
    assert_all_blocks_free(llm)


def test_async_engine_raises_request_failed_for_the_failed_request(
    llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the shared engine outlives this AsyncEngine: its shutdown must not close the grammar pool
    monkeypatch.setattr(llm.engine.structured_outputs, "close", lambda: None)
    engine = AsyncEngine(llm.engine)

    async def main() -> None:
        await engine.start()
        try:
            prompt = llm.tokenizer.encode(PROMPTS[0])
            with pytest.raises(RequestFailedError, match="engine failed") as failed:
                async for _ in engine.generate(prompt, GREEDY, "x", grammar=_BrokenGrammar()):  # type: ignore[arg-type]
                    pass
            assert "grammar backend bug" not in str(failed.value)  # internals stay in the log
            outputs = [o async for o in engine.generate(prompt, GREEDY, "y")]
            assert outputs[-1].finished and outputs[-1].error is None
            assert engine.is_alive
        finally:
            await engine.shutdown()

    asyncio.run(main())
    assert_all_blocks_free(llm)
