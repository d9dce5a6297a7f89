"""Pydantic models of OpenAI's Responses API (POST /v1/responses): the request, the output
items and the response object; and the request as the Chat Completions request that serves it."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from tokenmill.errors import InvalidRequestError
from tokenmill.server.protocol import (
    REQUEST_ID_PATTERN,
    ChatCompletionRequest,
    OpenAIBaseModel,
    ResponseModel,
    Seed,
)

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]

# Chat Completions fields a Responses request may also send (vLLM-style extras, with
# extra_body); they go to the internal chat request as they are
CHAT_EXTRAS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "bad_words",
    "allowed_token_ids",
    "skip_special_tokens",
    "include_reasoning",
    "thinking_token_budget",
    "chat_template",
    "chat_template_kwargs",
    "cache_salt",
    "priority",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structured_outputs",
    "mm_processor_kwargs",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
)


class ReasoningConfig(OpenAIBaseModel):
    effort: ReasoningEffort | None = None  # to the chat template, as Chat's reasoning_effort
    summary: str | None = None  # accepted; tokenmill writes no summaries


class TextConfig(OpenAIBaseModel):
    # {"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "name", "schema", ...}
    format: dict[str, Any] | None = None


class ResponsesRequest(OpenAIBaseModel):
    """POST /v1/responses (fields in the order of OpenAI's reference); stateless unless
    `store` keeps the response for a later `previous_response_id`."""

    input: str | list[dict[str, Any]]  # a user message, or message / function call items
    model: str | None = None  # None = the first served model name
    background: bool | None = False  # only false: responses are answered in the request
    conversation: Any = None  # not supported (400 when set)
    include: list[str] | None = None  # only [] or null
    instructions: str | None = None  # a system message first (not carried over)
    max_output_tokens: int | None = None  # None = fill the context
    max_tool_calls: int | None = None  # not supported (400 when set)
    metadata: dict[str, str] | None = None  # echoed back
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None  # a stored response's conversation goes first
    reasoning: ReasoningConfig | None = None
    store: bool | None = True  # keep the response in this process's memory
    stream: bool | None = False
    temperature: float | None = None  # None = 1.0
    text: TextConfig | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # function tools: {"type": "function", "name", ...}
    top_logprobs: int | None = None  # not supported (400 when set)
    top_p: float | None = None  # None = 1.0
    truncation: Literal["auto", "disabled"] | None = None  # only "disabled"
    user: str | None = None
    prompt: Any = None  # a stored prompt template of OpenAI's: not supported (400 when set)

    # vLLM-style extras (and those of CHAT_EXTRAS, sent with extra_body)
    seed: Seed | None = None
    request_id: Annotated[str, Field(pattern=REQUEST_ID_PATTERN)] | None = None  # the id


# ---------------------------------------------------------------------------------------
# Output items
# ---------------------------------------------------------------------------------------

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningText(ResponseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class MessageItem(ResponseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "completed"
    content: list[OutputText] = Field(default_factory=list)


class ReasoningItem(ResponseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    status: ItemStatus = "completed"


class FunctionCallItem(ResponseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: ItemStatus = "completed"


OutputItem = MessageItem | ReasoningItem | FunctionCallItem


# ---------------------------------------------------------------------------------------
# The response
# ---------------------------------------------------------------------------------------


class InputTokensDetails(ResponseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0  # not counted apart yet: 0


class ResponseUsage(ResponseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(ResponseModel):
    """A response: the request's settings echoed back, its output items and usage."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "incomplete", "in_progress", "failed"] = "in_progress"
    background: bool = False
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None


# ---------------------------------------------------------------------------------------
# A Responses request as the Chat Completions request that serves it
# ---------------------------------------------------------------------------------------

_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def to_chat_request(
    request: ResponsesRequest, history: list[dict[str, Any]]
) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
    """The chat request, and the conversation it continues (history, then the input; without
    the instructions, which a later response does not inherit)."""
    check_unsupported(request)
    conversation = history + to_messages(request.input)
    if not conversation:
        raise InvalidRequestError("input must not be empty", param="input")
    system = [{"role": "system", "content": request.instructions}] if request.instructions else []
    body: dict[str, Any] = {
        "messages": system + conversation,
        "model": request.model,
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "user": request.user,
        "tools": _chat_tools(request.tools),
        "tool_choice": _chat_tool_choice(request.tool_choice),
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": _response_format(request.text),
        "reasoning_effort": request.reasoning.effort if request.reasoning else None,
    }
    extra = request.model_extra or {}
    body.update({name: extra[name] for name in CHAT_EXTRAS if name in extra})
    chat_fields = ChatCompletionRequest.model_fields
    for name in sorted(extra.keys() & chat_fields.keys() - set(CHAT_EXTRAS)):
        unused = (None, chat_fields[name].get_default(call_default_factory=True))
        if extra[name] not in unused:  # a Chat field this endpoint has no place for
            raise InvalidRequestError(f"{name} is not supported by /v1/responses", param=name)
    try:
        return ChatCompletionRequest.model_validate(body), conversation
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"])
        raise InvalidRequestError(f"{param}: {error['msg']}", param=param) from None


def check_unsupported(request: ResponsesRequest) -> None:
    """A 400 naming the first field whose feature tokenmill does not serve."""
    unsupported = {
        "background": (request.background, "background responses are not supported"),
        "conversation": (request.conversation is not None, "conversations are not supported"),
        "include": (request.include, "include is not supported (only [] or null)"),
        "max_tool_calls": (request.max_tool_calls is not None, "max_tool_calls is not supported"),
        "prompt": (request.prompt is not None, "stored prompts (prompt) are not supported; "
                   "send the instructions and input themselves"),
        "top_logprobs": (request.top_logprobs is not None, "top_logprobs is not supported"),
        "truncation": (request.truncation == "auto", "truncation 'auto' is not supported; "
                       "a prompt over the context length is a 400"),
    }  # fmt: skip
    for param, (is_used, message) in unsupported.items():
        if is_used:
            raise InvalidRequestError(message, param=param)


def to_messages(given: str | list[dict[str, Any]], param: str = "input") -> list[dict[str, Any]]:
    """Input items as chat messages: messages as they are, a function call on the assistant
    message before it (or a new one), a call's output as a tool message, reasoning skipped."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        where = f"{param}.{i}"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise InvalidRequestError(
                    f"role must be one of {sorted(_ROLES)}; got {role!r}", param=f"{where}.role"
                )
            messages.append({"role": role, "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            _add_call(messages, item, where)
        elif kind == "function_call_output":
            call_id = _required(item, "call_id", where)
            output = _text(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind != "reasoning":  # a reasoning item given back: the template has no place
            raise InvalidRequestError(
                f"unsupported input item type {kind!r} (expected message, function_call, "
                "function_call_output or reasoning)",
                param=f"{where}.type",
            )
    return messages


def _add_call(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    function = {"name": _required(item, "name", where),
                "arguments": _required(item, "arguments", where)}  # fmt: skip
    call = {"id": _required(item, "call_id", where), "type": "function", "function": function}
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant":
        last = {"role": "assistant", "content": None}
        messages.append(last)
    last["tool_calls"] = [*(last.get("tool_calls") or []), call]


def _required(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{key} must be a string", param=f"{where}.{key}")
    return value


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat's: its text, or with input_image parts, chat's text and
    image_url parts (a vision model takes them; any other model answers 400)."""
    if not isinstance(content, list) or not any(
        isinstance(p, dict) and p.get("type") == "input_image" for p in content
    ):
        return _text(content, where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise InvalidRequestError(
                    "input_image takes image_url (a data: or http(s) URL); file_id is not "
                    "supported",
                    param=f"{where}.content.{j}",
                )
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append({"type": "text", "text": _text([part], where)})
    return parts


def _text(content: Any, where: str) -> str:
    """A content's text: a string as is, text parts joined by newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequestError("content must be a string or a list of parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_file", "input_audio"):
            raise InvalidRequestError(
                f"{kind} parts are not supported: this server takes text only",
                param=f"{where}.content.{j}",
            )
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"unsupported content part type {kind!r} (expected input_text or output_text "
                "with a 'text' field)",
                param=f"{where}.content.{j}",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses' flat function tools as chat's {"type": "function", "function": {...}}."""
    if tools is None:
        return None
    result = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f"only function tools are supported; got type {tool.get('type')!r}",
                param=f"tools.{i}",
            )
        keys = ("name", "description", "parameters", "strict")
        result.append(
            {"type": "function", "function": {k: tool[k] for k in keys if tool.get(k) is not None}}
        )
    return result


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequestError(
        "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
        param="tool_choice",
    )


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """text.format as chat's response_format (None: plain text)."""
    fmt = text.format if text is not None else None
    kind = fmt.get("type") if fmt else "text"
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise InvalidRequestError(
            f"text.format.type must be text, json_object or json_schema; got {kind!r}",
            param="text.format.type",
        )
    assert fmt is not None
    if not isinstance(fmt.get("schema"), dict):
        raise InvalidRequestError("a json_schema format needs a schema", param="text.format.schema")
    schema = {k: fmt[k] for k in ("description", "schema", "strict") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"), **schema}}
