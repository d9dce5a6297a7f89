"""Protocol models: what bodies parse to, what is rejected, how responses serialize."""

from __future__ import annotations

import json
import logging
import math

import pytest
from pydantic import ValidationError

from tokenmill.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionRequest,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
)

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("text", "text"),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [1, 2, 3]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_forms(prompt: object, expected: object) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == expected


def test_defaults_follow_openai_and_vllm() -> None:
    completion = CompletionRequest.model_validate({"prompt": "x"})
    assert completion.max_tokens == 16 and completion.n == 1 and completion.echo is False
    assert completion.add_special_tokens is True and completion.top_k == -1
    chat = ChatCompletionRequest.model_validate({"messages": USER})
    assert chat.max_tokens is None and chat.max_completion_tokens is None
    assert chat.add_generation_prompt is True and chat.add_special_tokens is False
    assert chat.model is None and chat.temperature is None


def test_unknown_fields_are_kept_aside_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="tokenmill.server.protocol"):
        request = ChatCompletionRequest.model_validate(
            {"messages": USER, "store": True, "metadata": {"a": "b"}}
        )
    assert request.model_extra == {"store": True, "metadata": {"a": "b"}}
    assert "metadata" in caplog.text and "store" in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "temperature": math.nan},
        {"prompt": "x", "top_p": math.inf},
        {"prompt": "x", "logit_bias": {"1": -math.inf}},
        {"prompt": "x", "frequency_penalty": "NaN"},
        {"prompt": "x", "presence_penalty": math.inf},
        {"prompt": "x", "min_p": -math.inf},
        {"prompt": "x", "length_penalty": math.nan},
    ],
)
def test_non_finite_floats_are_rejected(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="finite"):
        CompletionRequest.model_validate(body)


@pytest.mark.parametrize(
    "body",
    [
        {},  # prompt is required
        {"prompt": {"text": "x"}},
        {"prompt": "x", "n": 1.5},
        {"prompt": "x", "seed": 2**63},
        {"prompt": "x", "stream_options": {"include_usage": "sometimes"}},
        {"prompt": "x", "response_format": {"type": "xml"}},
        {"prompt": "x", "truncate_prompt_tokens": 0},
        {"prompt": "x", "truncate_prompt_tokens": -2},
    ],
)
def test_invalid_completion_bodies(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_n_is_capped_by_the_server_not_the_schema() -> None:
    # RequestLimits.max_n is the server's to set; the model only checks the type
    assert CompletionRequest.model_validate({"prompt": "x", "n": 10**9}).n == 10**9
    assert ChatCompletionRequest.model_validate({"messages": USER, "best_of": 500}).best_of == 500


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "robot", "content": "x"}],
        [{"content": "x"}],
        [{"role": "user", "content": [{"text": "no type"}]}],
        [{"role": "user", "content": 42}],
    ],
)
def test_invalid_messages(messages: list[object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": messages})


def test_message_forms() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "tool", "content": "42", "tool_call_id": "1"},
            ],
            "documents": [{"title": "t", "text": "body"}],
            "chat_template_kwargs": {"enable_thinking": False},
        }
    )
    assert [m.role for m in request.messages] == ["developer", "user", "assistant", "tool"]
    content = request.messages[1].content
    assert isinstance(content, list) and content[0].text == "a"
    assert request.documents is not None and request.documents[0].title == "t"


def test_tokenize_request_union() -> None:
    from pydantic import TypeAdapter

    adapter: TypeAdapter[TokenizeRequest] = TypeAdapter(TokenizeRequest)
    assert isinstance(adapter.validate_python({"prompt": "x"}), TokenizeCompletionRequest)
    chat = adapter.validate_python({"messages": USER, "add_generation_prompt": False})
    assert isinstance(chat, TokenizeChatRequest) and chat.add_generation_prompt is False


def test_delta_leaves_out_unset_keys() -> None:
    assert DeltaMessage(content="x").model_dump() == {"content": "x"}
    assert DeltaMessage(role="assistant", content="").model_dump() == {
        "role": "assistant",
        "content": "",
    }
    chunk = ChatCompletionStreamResponse(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content="hi"))],
    )
    data = json.loads(chunk.model_dump_json(exclude={"usage"}))
    assert data["choices"][0] == {
        "index": 0,
        "delta": {"content": "hi"},
        "logprobs": None,
        "finish_reason": None,
        "stop_reason": None,
    }
    assert "usage" not in data and data["object"] == "chat.completion.chunk"


def test_error_envelope_shape() -> None:
    error = ErrorResponse(error=ErrorInfo(message="m", type="BadRequestError", param="n", code=400))
    assert error.model_dump() == {
        "error": {"message": "m", "type": "BadRequestError", "param": "n", "code": 400}
    }
