"""InputProcessor: each request check once, with the numbers in its message, for the offline
API (a request stops at the context) and the server (max_tokens must fit beside the prompt)."""

from __future__ import annotations

import pytest

from tokenmill.engine.input_processor import InputProcessor
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams

VOCAB, MAX_LEN = 100, 32
OFFLINE = InputProcessor(VOCAB, MAX_LEN)
SERVER = InputProcessor(VOCAB, MAX_LEN, max_logprobs=5, fit_max_tokens=True)


def rejects(processor: InputProcessor, prompt: list[int], param: str, **params: object) -> str:
    with pytest.raises(InvalidRequestError) as info:
        processor.validate(prompt, SamplingParams(**params))  # type: ignore[arg-type]
    assert info.value.param == param
    return info.value.message


@pytest.mark.parametrize("processor", [OFFLINE, SERVER])
def test_empty_prompt_and_ids_outside_the_vocabulary(processor: InputProcessor) -> None:
    assert rejects(processor, [], "prompt") == "prompt must contain at least one token"
    message = rejects(processor, [1, VOCAB, -1, 5], "prompt")
    assert message == f"prompt has token ids outside the vocabulary [0, {VOCAB}): [{VOCAB}, -1]"
    assert "[0, 100)" in rejects(processor, [1], "stop_token_ids", stop_token_ids=[VOCAB])


@pytest.mark.parametrize("processor", [OFFLINE, SERVER])
def test_a_prompt_that_fills_the_context_is_rejected_unless_it_only_echoes(
    processor: InputProcessor,
) -> None:
    message = rejects(processor, [1] * MAX_LEN, "prompt", max_tokens=None)
    assert message == (
        f"This model's maximum context length is {MAX_LEN} tokens. However, your prompt has "
        f"{MAX_LEN} tokens, leaving no room for the completion."
    )
    rejects(processor, [1] * MAX_LEN, "prompt", max_tokens=0, prompt_logprobs=1)  # runs a step
    echo = processor.validate([1] * MAX_LEN, SamplingParams(max_tokens=0))  # nothing runs
    assert echo.prompt_token_ids == [1] * MAX_LEN


def test_the_server_rejects_max_tokens_over_the_context_and_fills_a_missing_one() -> None:
    message = rejects(SERVER, [1] * 20, "max_tokens", max_tokens=13)
    assert "you requested 33 tokens (20 in the prompt, 13 in the completion)" in message
    filled = SERVER.validate([1] * 10, SamplingParams(max_tokens=None))
    assert filled.params.max_tokens == MAX_LEN - 10
    with pytest.raises(InvalidRequestError, match="your messages has 32 tokens"):
        SERVER.validate([1] * MAX_LEN, SamplingParams(max_tokens=None), prompt_param="messages")


def test_the_offline_api_lets_max_tokens_run_into_the_context() -> None:
    item = OFFLINE.validate([1] * 20, SamplingParams(max_tokens=13))
    assert item.params.max_tokens == 13  # the request stops at the context ("length")
    assert OFFLINE.validate([1], SamplingParams(max_tokens=None)).params.max_tokens is None


def test_truncation_comes_before_the_prompt_checks() -> None:
    params = SamplingParams(truncate_prompt_tokens=3, max_tokens=1)
    item = SERVER.validate([VOCAB] * 20 + [1, 2, 3], params)  # the dropped ids are never run
    assert item.prompt_token_ids == [1, 2, 3]


def test_logprob_caps() -> None:
    assert "max allowed: 5" in rejects(SERVER, [1], "logprobs", logprobs=6)
    assert "max allowed: 5" in rejects(SERVER, [1], "prompt_logprobs", prompt_logprobs=6)
    assert OFFLINE.validate([1], SamplingParams(logprobs=20)).params.logprobs == 20
    assert "max allowed: 20" in rejects(OFFLINE, [1], "logprobs", logprobs=21)


def test_the_callers_list_and_params_are_not_changed() -> None:
    prompt, params = [1, 2, 3], SamplingParams(truncate_prompt_tokens=1, max_tokens=None)
    item = SERVER.validate(prompt, params)
    assert prompt == [1, 2, 3] and params.max_tokens is None
    assert item.prompt_token_ids == [3] and item.params.max_tokens == MAX_LEN - 1
