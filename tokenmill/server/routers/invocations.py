"""POST /invocations: SageMaker's one inference route, as vLLM serves it. The body's shape
picks the API: `messages` is a chat completion, `prompt` a completion, `input` an embedding,
`query` and `documents` a rerank, `text_1` and `text_2` (or another of vLLM's spellings: data_1
and data_2, queries and documents, queries and items) a score. It runs the model, so
(unlike vLLM's) it needs the API key when one is set."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.responses import Response

from tokenmill.errors import InvalidRequestError
from tokenmill.server.auth import check_api_key
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.server.protocol_pooling import EmbeddingRequest
from tokenmill.server.protocol_score import PAIR_NAMES, RerankRequest, ScoreRequest
from tokenmill.server.streams import until_disconnect

router = APIRouter(dependencies=[Depends(check_api_key)])
_EMBEDDING: TypeAdapter[Any] = TypeAdapter(EmbeddingRequest)


@router.post("/invocations")
async def invocations(request: Request) -> Response:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    header_id = request.headers.get("x-request-id")
    state = request.app.state
    try:
        if "messages" in body:
            chat = ChatCompletionRequest.model_validate(body)
            return await until_disconnect(request, state.chat.create(chat, header_id))
        if "prompt" in body:
            completion = CompletionRequest.model_validate(body)
            return await until_disconnect(request, state.completion.create(completion, header_id))
        if "input" in body:
            embedding = _EMBEDDING.validate_python(body)
            return await until_disconnect(
                request, state.embedding.create(embedding, "embeddings", header_id)
            )
        if "query" in body and "documents" in body:
            rerank = RerankRequest.model_validate(body)
            return await until_disconnect(request, state.score.rerank(rerank, header_id))
        if any(first in body and second in body for first, second in PAIR_NAMES):
            score = ScoreRequest.model_validate(body)
            return await until_disconnect(request, state.score.score(score, header_id))
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]  # (as FastAPI's)
        raise RequestValidationError(errors, body=body) from None
    raise InvalidRequestError(
        "/invocations needs messages (a chat completion), prompt (a completion), input "
        "(an embedding), query and documents (a rerank) or text_1 and text_2 (a score; also "
        "data_1 and data_2, queries and documents, queries and items)"
    )
