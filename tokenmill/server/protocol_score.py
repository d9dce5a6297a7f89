"""Pydantic models of vLLM's score and rerank APIs (POST /score, /v1/score; /rerank,
/v1/rerank, /v2/rerank), answered with an embedding model: a pair's score is the cosine
similarity of its two texts' embeddings."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import Field

from tokenmill.server.protocol import (
    RequestIdExtra,
    ResponseModel,
    TruncatePromptTokens,
    UsageInfo,
)

_TEXTS = Annotated[list[str], Field(min_length=1)] | str


class ScoreExtras(RequestIdExtra):
    """What score and rerank share: vLLM's extras."""

    model: str | None = None  # None = the first served model name
    truncate_prompt_tokens: TruncatePromptTokens | None = None  # of each text
    priority: int = 0
    # a cross-encoder's; refused here unless unset (scores are cosines of embeddings)
    use_activation: bool | None = None
    activation: bool | None = None
    softmax: bool | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # texts only: refused unless unset


class ScoreRequest(ScoreExtras):
    """text_1 against text_2: one to one, one to many (a single text_1), or pairwise (two
    lists of the same length)."""

    text_1: _TEXTS
    text_2: _TEXTS


class RerankRequest(ScoreExtras):
    """Documents ranked by relevance to the query; top_n: how many to return (0: all)."""

    query: str
    documents: Annotated[list[str], Field(min_length=1)]
    top_n: Annotated[int, Field(ge=0)] = 0


class ScoreData(ResponseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(ResponseModel):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankDocument(ResponseModel):
    text: str


class RerankResult(ResponseModel):
    index: int  # the document's place in `documents`
    document: RerankDocument
    relevance_score: float


class RerankUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(ResponseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]  # most relevant first
