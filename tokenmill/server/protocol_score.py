"""Pydantic models of vLLM's score and rerank APIs (POST /score, /v1/score; /rerank,
/v1/rerank, /v2/rerank), answered with an embedding model: a pair's score is the cosine
similarity of its two texts' embeddings."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import Field, model_validator

from tokenmill.server.protocol import (
    RequestIdExtra,
    ResponseModel,
    TruncatePromptTokens,
    UsageInfo,
)

_TEXTS = Annotated[list[str], Field(min_length=1)] | str


def text_list(texts: str | list[str]) -> list[str]:
    """One text, or several, as a list."""
    return [texts] if isinstance(texts, str) else texts


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


# vLLM's four spellings of a score request's two sides
PAIR_NAMES = (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents"),
              ("queries", "items"))  # fmt: skip


class ScoreRequest(ScoreExtras):
    """The first side against the second: one to one, one to many (a single first text), or
    pairwise (two lists of the same length). The sides are named as in any of vLLM's
    spellings: text_1/text_2, data_1/data_2, queries/documents, queries/items."""

    text_1: _TEXTS | None = None
    text_2: _TEXTS | None = None
    data_1: _TEXTS | None = None
    data_2: _TEXTS | None = None
    queries: _TEXTS | None = None
    documents: _TEXTS | None = None
    items: _TEXTS | None = None

    @model_validator(mode="after")
    def _one_spelling(self) -> ScoreRequest:
        self.sides()
        return self

    def sides(self) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
        """Both sides as (the name the client used, its texts)."""
        for first, second in PAIR_NAMES:
            a, b = getattr(self, first), getattr(self, second)
            if a is not None and b is not None:
                return (first, text_list(a)), (second, text_list(b))
        raise ValueError(
            "a score request needs text_1 and text_2 (or data_1 and data_2, queries and "
            "documents, queries and items)"
        )


class RerankRequest(ScoreExtras):
    """Documents ranked by relevance to the query; top_n: how many to return (0: all)."""

    query: str
    documents: _TEXTS  # (a single text: one document)
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
