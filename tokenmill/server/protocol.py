"""Pydantic models of the HTTP API: OpenAI's request/response types plus vLLM's extras."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from tokenmill.sampling_params import valid_truncation

logger = logging.getLogger(__name__)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
Seed = Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX)]


def _keep_count(value: int) -> int:
    if not valid_truncation(value):
        raise ValueError("must be at least 1, or -1 for max_model_len")
    return value


# vLLM's truncate_prompt_tokens: keep the prompt's last k tokens; -1: max_model_len of them
TruncatePromptTokens = Annotated[int, AfterValidator(_keep_count)]


class OpenAIBaseModel(BaseModel):
    """A request body: unknown fields are accepted (OpenAI clients send them) and ignored."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _log_unknown_fields(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        result = handler(data)
        if result.model_extra:
            logger.debug("%s: ignoring unknown fields %s", cls.__name__, sorted(result.model_extra))
        return result


class ResponseModel(BaseModel):
    """A response body: exactly the declared fields."""


def _is_none(value: Any) -> bool:
    return value is None


# ---------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True  # a final chunk with usage (choices empty); vLLM's default
    continuous_usage_stats: bool | None = False  # vLLM: with include_usage, in every chunk


class JsonSchemaFormat(OpenAIBaseModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # with --enable-prompt-tokens-details (as vLLM)
    prompt_tokens_details: PromptTokensDetails | None = Field(default=None, exclude_if=_is_none)


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    """OpenAI's error envelope: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


# ---------------------------------------------------------------------------------------
# vLLM extras (not in OpenAI's API; clients send them with extra_body). Each is a mixin so
# a request model lists OpenAI's fields itself and inherits the extras it accepts.
# ---------------------------------------------------------------------------------------


class SamplingExtras(OpenAIBaseModel):
    """vLLM's extra sampling parameters, shared by Completions and Chat (ranges: SamplingParams;
    caps: RequestLimits)."""

    return_token_ids: bool | None = False  # the prompt's and each choice's token ids
    best_of: int | None = None  # generate best_of, return the n with the best logprob sum
    use_beam_search: bool = False  # beam width = best_of (or n)
    top_k: int = -1  # -1 = all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search only
    early_stopping: bool | Literal["never"] = False  # beam search only
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    prompt_logprobs: int | None = None  # top logprobs of every prompt token
    allowed_token_ids: list[int] | None = None  # only these tokens may be generated
    bad_words: list[str] | None = None  # never generated (each word's token sequences banned)
    # logprobs name each token "token_id:{id}"; None = the server's --return-tokens-as-token-ids
    return_tokens_as_token_ids: bool | None = None
    priority: int = 0  # lower is scheduled first; other than 0 needs --scheduling-policy priority
    # isolates this tenant's prefix-cache entries: only requests with the same salt share them
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class UnsupportedExtras(OpenAIBaseModel):
    """vLLM's newer fields tokenmill does not honour yet: accepted at their default (what
    clients send when they do not use them), a 400 naming the field otherwise
    (serving_base.check_unsupported_fields), never silently ignored."""

    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None


# a client's request id: 1 to 256 visible ASCII characters (no space, no line break: it is
# logged and echoed)
REQUEST_ID_PATTERN = r"^[\x21-\x7e]{1,256}$"


class RequestIdExtra(OpenAIBaseModel):
    """vLLM's request_id: the response's id after its prefix (the X-Request-Id header, when
    sent, wins)."""

    request_id: Annotated[str, Field(pattern=REQUEST_ID_PATTERN)] | None = None


class StructuredOutputExtras(OpenAIBaseModel):
    """vLLM's structured-output fields; at most one constraint per request (with
    response_format), read by tokenmill.structured.spec_from_request_fields."""

    guided_json: str | dict[str, Any] | None = None  # a JSON schema (JSON text or object)
    guided_regex: str | None = None  # the whole output matches it
    guided_choice: list[str] | None = None  # the output is exactly one of these
    guided_grammar: str | None = None  # GBNF/EBNF (`root ::= ...`) or Lark (`start: ...`)
    guided_decoding_backend: str | None = None  # xgrammar, outlines, lm-format-enforcer
    guided_whitespace_pattern: str | None = None  # whitespace allowed between JSON tokens
    # current vLLM's spelling: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    structured_outputs: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------

Prompt = list[int] | list[list[int]] | str | list[str]


class CompletionRequest(SamplingExtras, StructuredOutputExtras, UnsupportedExtras, RequestIdExtra):
    """POST /v1/completions (fields in the order of OpenAI's reference)."""

    model: str | None = None  # None = the first served model name
    prompt: Prompt
    echo: bool = False
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None  # top logprobs per token (0..20); with echo, the prompt's too
    max_tokens: int | None = 16
    n: int = 1  # choices per prompt (cap: RequestLimits.max_n)
    presence_penalty: float = 0.0
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None  # fill-in-the-middle: the text after the gap (FIM models)
    temperature: float | None = None  # None = 1.0
    top_p: float | None = None  # None = 1.0
    user: str | None = None

    # vLLM extras specific to Completions
    add_special_tokens: bool = True  # e.g. BOS on top of the prompt
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _embeds_without_prompt(cls, data: Any) -> Any:
        """vLLM's prompt_embeds may stand in for the prompt: the 400 then names it (as
        serving_base's unsupported fields), not a missing prompt."""
        if isinstance(data, dict) and "prompt" not in data and data.get("prompt_embeds"):
            return {**data, "prompt": ""}
        return data


# ---------------------------------------------------------------------------------------
# llama.cpp's /infill (fill-in-the-middle for editor plugins)
# ---------------------------------------------------------------------------------------


class InfillExtraChunk(BaseModel):
    """One extra file of /infill's input_extra: context put before the FIM prefix."""

    model_config = ConfigDict(extra="forbid")

    filename: str = ""
    text: str


# llama.cpp /completion options tokenmill does not implement, accepted only with the value
# that turns them off (a 400 names any other value, and any field not known here)
INFILL_NEUTRAL_FIELDS: dict[str, Any] = {
    "n_probs": 0,
    "n_indent": 0,
    "t_max_predict_ms": 0,
    "t_max_prompt_ms": 0,
    "id_slot": -1,
    "n_keep": 0,
    "n_discard": 0,
    "n_cmpl": 1,
    "min_keep": 0,
    "typical_p": 1.0,
    "dynatemp_range": 0.0,
    "mirostat": 0,
    "dry_multiplier": 0.0,
    "xtc_probability": 0.0,
    "post_sampling_probs": False,
    "timings_per_token": False,
    "return_progress": False,
    "grammar": "",
    "lora": [],
}


class InfillRequest(OpenAIBaseModel):
    """POST /infill: llama.cpp's body (its defaults); unknown fields are a 400, not ignored
    (checked by the server, see INFILL_NEUTRAL_FIELDS)."""

    model: str | None = None
    input_prefix: str = ""  # before the gap
    input_suffix: str = ""  # after the gap
    input_extra: list[InfillExtraChunk] = Field(default_factory=list)  # other files
    prompt: str = ""  # text already typed in the middle (after the middle marker)
    n_predict: int = -1  # -1 = until the context is full
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # <= 0: all tokens
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = -1  # -1: a random draw
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    ignore_eos: bool = False
    return_tokens: bool = False
    cache_prompt: bool = True  # false: a salt of its own; no cached prefix shared with others
    response_fields: list[str] | None = None  # keep only these (a/b: b of a, renamed b)
    spm_infill: bool = False  # suffix-prefix-middle order (llama.cpp's server flag, per request)


class PromptLogprob(ResponseModel):
    """vLLM's prompt_logprobs entry: one token's logprob at one prompt position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobsList = list[dict[int, PromptLogprob] | None]  # None for the first prompt token


class CompletionLogProbs(ResponseModel):
    """Completions' logprobs: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)  # where each token starts in the text
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: first prompt token
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop id or string that ended it
    prompt_logprobs: PromptLogprobsList | None = Field(default=None, exclude_if=_is_none)
    # with return_token_ids: the prompt's ids (in a stream, the first chunk), the output's
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_is_none)
    token_ids: list[int] | None = Field(default=None, exclude_if=_is_none)


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------


class ImageURL(OpenAIBaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the processor decides


class ChatContentPart(OpenAIBaseModel):
    """One part of an array content: {"type": "text", "text": ...}, image_url, input_audio, ..."""

    type: str
    text: str | None = None
    image_url: ImageURL | str | None = (
        None  # "image_url" parts: {"url": "data:..." | "https://..."}
    )


class ChatMessage(OpenAIBaseModel):
    """One message of the conversation; extra keys (e.g. tool_calls) reach the template."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatDocument(OpenAIBaseModel):
    title: str | None = None
    text: str


class ChatCompletionRequest(
    SamplingExtras, StructuredOutputExtras, UnsupportedExtras, RequestIdExtra
):
    """POST /v1/chat/completions (fields in the order of OpenAI's reference)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str | None = None  # None = the first served model name
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False  # logprob of each output token
    top_logprobs: int | None = None  # and this many most likely alternatives (0..20)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None  # None = fill the context
    n: int = 1  # choices per prompt (cap: RequestLimits.max_n)
    presence_penalty: float = 0.0
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None  # None = 1.0
    top_p: float | None = None  # None = 1.0
    tools: list[dict[str, Any]] | None = None  # function tools (tokenmill/tools)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # to the chat template (as vLLM: gpt-oss-style templates read it); a 400 for a template
    # that does not use it
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    # vLLM's reasoning extras: the most tokens a thought may take (its end is then forced);
    # include_reasoning false drops the thought from the response
    thinking_token_budget: Annotated[int, Field(ge=0)] | None = None
    include_reasoning: bool = True
    user: str | None = None

    # vLLM extras specific to Chat
    echo: bool = False  # prepend the last message if it has the response's role
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # continue the last message instead of a new one
    add_special_tokens: bool = False  # on top of what the template adds
    documents: list[ChatDocument] | None = None
    chat_template: str | None = None  # template text for this request
    chat_template_kwargs: dict[str, Any] | None = None
    # a vision model's image processor options for this request's images (vLLM's)
    mm_processor_kwargs: dict[str, Any] | None = None


class ChatResponseMessage(ResponseModel):
    role: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    # a reasoning model's thought (vLLM's names: reasoning_content, and the newer reasoning)
    reasoning_content: str | None = Field(default=None, exclude_if=_is_none)
    reasoning: str | None = Field(default=None, exclude_if=_is_none)


class ChatCompletionLogProb(ResponseModel):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None  # the token's UTF-8 bytes (part of a character, if split)


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatCompletionResponseChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = Field(default=None, exclude_if=_is_none)  # return_token_ids


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobsList | None = Field(default=None, exclude_if=_is_none)
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_is_none)


class DeltaMessage(ResponseModel):
    """A streamed piece of a message; unset (None) keys are left out as OpenAI does."""

    role: str | None = None
    content: str | None = None
    # pieces of tool calls: {"index", "id", "type", "function": {"name", "arguments"}} first,
    # then {"index", "function": {"arguments": more}}
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None  # a piece of the thought (and as `reasoning`)
    reasoning: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = Field(default=None, exclude_if=_is_none)  # the new ones


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_is_none)  # 1st chunk
    # the first chunk after the prefill (the role chunks come before it)
    prompt_logprobs: PromptLogprobsList | None = Field(default=None, exclude_if=_is_none)


# ---------------------------------------------------------------------------------------
# Models, tokenize, detokenize, version
# ---------------------------------------------------------------------------------------


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tokenmill"
    root: str | None = None  # what was loaded
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[ChatDocument] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str


class VersionResponse(ResponseModel):
    version: str
