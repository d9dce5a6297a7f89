"""vLLM's score and rerank APIs: POST /score and /v1/score; /rerank, /v1/rerank and
/v2/rerank (Jina's and Cohere's shapes, as vLLM serves them). They run the model, so unlike
vLLM's they need the API key when one is set."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from tokenmill.server.auth import check_api_key
from tokenmill.server.protocol_score import RerankRequest, ScoreRequest
from tokenmill.server.serving_score import ScoreServer
from tokenmill.server.streams import until_disconnect

router = APIRouter(dependencies=[Depends(check_api_key)])


def score_server(request: Request) -> ScoreServer:
    return request.app.state.score


@router.post("/score")
@router.post("/v1/score")
async def create_score(
    body: ScoreRequest,
    request: Request,
    server: Annotated[ScoreServer, Depends(score_server)],
) -> Response:
    return await until_disconnect(request, server.score(body, request.headers.get("x-request-id")))


@router.post("/rerank")
@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def create_rerank(
    body: RerankRequest,
    request: Request,
    server: Annotated[ScoreServer, Depends(score_server)],
) -> Response:
    return await until_disconnect(request, server.rerank(body, request.headers.get("x-request-id")))
