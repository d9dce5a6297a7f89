"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.responses import Response

from tokenmill.server.auth import v1_router
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.server.serving_chat import ChatServer
from tokenmill.server.streams import until_disconnect

router = v1_router()


def chat_server(request: Request) -> ChatServer:
    return request.app.state.chat


@router.post("/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    server: Annotated[ChatServer, Depends(chat_server)],
) -> Response:
    return await until_disconnect(request, server.create(body, request.headers.get("x-request-id")))
