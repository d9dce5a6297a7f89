"""POST /v1/embeddings (OpenAI's) and /pooling (vLLM's): embeddings from the served model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from tokenmill.server.auth import check_api_key, v1_router
from tokenmill.server.protocol_pooling import EmbeddingRequest
from tokenmill.server.serving_embedding import EmbeddingServer
from tokenmill.server.streams import until_disconnect

router = v1_router()
# /pooling, outside /v1 as in vLLM; it runs the model, so unlike vLLM it needs the API key
pooling_router = APIRouter(dependencies=[Depends(check_api_key)])


def embedding_server(request: Request) -> EmbeddingServer:
    return request.app.state.embedding


@router.post("/embeddings")
async def create_embedding(
    body: EmbeddingRequest,
    request: Request,
    server: Annotated[EmbeddingServer, Depends(embedding_server)],
) -> Response:
    return await until_disconnect(
        request, server.create(body, "embeddings", request.headers.get("x-request-id"))
    )


@pooling_router.post("/pooling")
async def create_pooling(
    body: EmbeddingRequest,
    request: Request,
    server: Annotated[EmbeddingServer, Depends(embedding_server)],
) -> Response:
    return await until_disconnect(
        request, server.create(body, "pooling", request.headers.get("x-request-id"))
    )
