"""POST /v1/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.responses import Response

from tokenmill.server.auth import v1_router
from tokenmill.server.protocol import CompletionRequest
from tokenmill.server.serving_completion import CompletionServer
from tokenmill.server.streams import until_disconnect

router = v1_router()


def completion_server(request: Request) -> CompletionServer:
    return request.app.state.completion


@router.post("/completions")
async def create_completion(
    body: CompletionRequest,
    request: Request,
    server: Annotated[CompletionServer, Depends(completion_server)],
) -> Response:
    return await until_disconnect(request, server.create(body, request.headers.get("x-request-id")))
