"""POST /tokenize and /detokenize (no API key, as in vLLM): the tokenizer and chat template."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from tokenmill.server.limits import check_prompt_limits
from tokenmill.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from tokenmill.server.routers.chat import chat_server
from tokenmill.server.serving_chat import ChatServer

router = APIRouter()


@router.post("/tokenize")
async def tokenize(
    body: TokenizeRequest,
    server: Annotated[ChatServer, Depends(chat_server)],
) -> TokenizeResponse:
    server.check_model(body.model)
    tokenizer = server.engine.tokenizer
    if isinstance(body, TokenizeChatRequest):
        token_ids, _ = await server.render_prompt(body)  # image tokens counted too
    else:
        check_prompt_limits(body.prompt, server.settings.limits)
        token_ids = await server.run_blocking(
            tokenizer.encode, body.prompt, body.add_special_tokens
        )
    strs = tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(token_ids),
        max_model_len=server.engine.max_model_len,
        tokens=token_ids,
        token_strs=strs,
    )


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeRequest,
    server: Annotated[ChatServer, Depends(chat_server)],
) -> DetokenizeResponse:
    server.check_model(body.model)
    server.input_processor.check_token_ids(body.tokens, "tokens")
    text = await server.run_blocking(server.engine.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)
