"""Pydantic models of /v1/embeddings (OpenAI's, plus vLLM's chat form and extras) and
vLLM's /pooling."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import Field

from tokenmill.server.protocol import (
    ChatDocument,
    ChatMessage,
    RequestIdExtra,
    ResponseModel,
    TruncatePromptTokens,
    UsageInfo,
)

EmbeddingInput = list[int] | list[list[int]] | str | list[str]


class PoolingExtras(RequestIdExtra):
    """What both request forms share: OpenAI's fields and vLLM's extras."""

    model: str | None = None  # None = the first served model name
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32
    dimensions: Annotated[int, Field(ge=1)] | None = None  # Matryoshka models only
    user: str | None = None
    # vLLM's extras
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    normalize: bool | None = None  # None: the model's pooler config says
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class EmbeddingCompletionRequest(PoolingExtras):
    """POST /v1/embeddings with `input`: one text or token list, or a list of them."""

    input: EmbeddingInput
    add_special_tokens: bool = True


class EmbeddingChatRequest(PoolingExtras):
    """POST /v1/embeddings with `messages` (vLLM's form): one conversation, rendered by the
    chat template, embedded."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool = False  # on top of what the template adds
    documents: list[ChatDocument] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


EmbeddingRequest = EmbeddingCompletionRequest | EmbeddingChatRequest


class EmbeddingData(ResponseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64


class EmbeddingResponse(ResponseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class PoolingData(ResponseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | str  # str: base64


class PoolingResponse(ResponseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[PoolingData]
    usage: UsageInfo
