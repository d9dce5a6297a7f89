"""POST /v1/responses (OpenAI's Responses API) and GET /v1/responses/{id} (a stored one)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.responses import Response

from tokenmill.server.auth import v1_router
from tokenmill.server.protocol_responses import ResponsesRequest
from tokenmill.server.serving_responses import ResponsesServer
from tokenmill.server.streams import until_disconnect

router = v1_router()


def responses_server(request: Request) -> ResponsesServer:
    return request.app.state.responses


@router.post("/responses")
async def create_response(
    body: ResponsesRequest,
    request: Request,
    server: Annotated[ResponsesServer, Depends(responses_server)],
) -> Response:
    return await until_disconnect(request, server.create(body))


@router.get("/responses/{response_id}")
async def retrieve_response(
    response_id: str, server: Annotated[ResponsesServer, Depends(responses_server)]
) -> Response:
    return server.retrieve(response_id)
