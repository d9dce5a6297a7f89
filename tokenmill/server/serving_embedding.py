"""POST /v1/embeddings and /pooling: prompts to embedding requests on the same engine that
generates (prefill-only requests, batched with generation), vectors back in OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any, Literal

import torch
from starlette.responses import JSONResponse, Response

from tokenmill.engine.outputs import PoolingRequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.server.limits import check_prompt_limits
from tokenmill.server.protocol import PromptTokensDetails, UsageInfo
from tokenmill.server.protocol_pooling import (
    EmbeddingChatRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingData,
    PoolingResponse,
)
from tokenmill.server.serving_base import ServingBase, prompt_list, request_ids
from tokenmill.server.serving_chat import ChatServer

logger = logging.getLogger(__name__)

Endpoint = Literal["embeddings", "pooling"]


class EmbeddingServer(ServingBase):
    """Serves /v1/embeddings (and vLLM's /pooling, the same vectors in its shape)."""

    def __init__(self, *args: Any, chat: ChatServer, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.chat = chat  # renders the `messages` form with the chat template

    async def create(
        self, request: EmbeddingRequest, endpoint: Endpoint, header_id: str | None = None
    ) -> Response:
        model = self.check_model(request.model)
        self.check_alive()
        prefix = "embd" if endpoint == "embeddings" else "pool"
        request_id, engine_id = request_ids(prefix, header_id or request.request_id)
        params = PoolingParams(
            dimensions=request.dimensions,
            normalize=request.normalize,
            truncate_prompt_tokens=request.truncate_prompt_tokens,
        )
        param = "messages" if isinstance(request, EmbeddingChatRequest) else "input"
        prompts = [
            self.input_processor.validate_pooling(ids, params, param)
            for ids in await self._prompt_token_ids(request)
        ]
        self.check_admission()
        if not self.settings.disable_log_requests:
            logger.info(
                "request %s: %d input(s) to embed, prompt tokens %s",
                request_id, len(prompts), [len(p) for p in prompts],
            )  # fmt: skip
        outputs = await self.encode_all(prompts, params, engine_id, request.cache_salt)
        vectors = [_encode_vector(o, request.encoding_format) for o in outputs]
        usage = self.usage(outputs)
        body: EmbeddingResponse | PoolingResponse
        if endpoint == "embeddings":
            data = [EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)]
            body = EmbeddingResponse(id=request_id, model=model, data=data, usage=usage)
        else:
            items = [PoolingData(index=i, data=v) for i, v in enumerate(vectors)]
            body = PoolingResponse(id=request_id, model=model, data=items, usage=usage)
        return JSONResponse(body.model_dump(mode="json"))

    async def _prompt_token_ids(self, request: EmbeddingRequest) -> list[list[int]]:
        """Each input as token ids (text tokenized in the tokenizer thread)."""
        if isinstance(request, EmbeddingChatRequest):
            return [await self.chat.prompt_token_ids(request)]  # type: ignore[arg-type]
        check_prompt_limits(request.input, self.settings.limits)
        items = prompt_list(request.input, "input")
        tokenizer = self.engine.tokenizer

        def encode() -> list[list[int]]:
            return [
                tokenizer.encode(item, add_special_tokens=request.add_special_tokens)
                if isinstance(item, str)
                else list(item)
                for item in items
            ]

        return await self.run_blocking(encode)

    async def encode_all(
        self,
        prompts: list[list[int]],
        params: PoolingParams,
        request_id: str,
        cache_salt: str | None,
    ) -> list[PoolingRequestOutput]:
        """Every prompt as its own engine request, all at once; one failing (or the client
        leaving) cancels the others, which aborts them in the engine."""
        tasks = [
            asyncio.ensure_future(self._encode(ids, params, f"{request_id}-{i}", cache_salt))
            for i, ids in enumerate(prompts)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _encode(
        self, prompt: list[int], params: PoolingParams, request_id: str, cache_salt: str | None
    ) -> PoolingRequestOutput:
        timer = self.metrics.start_pooling(len(prompt))
        try:
            output = await self.engine.encode(prompt, params, request_id, cache_salt=cache_salt)
        except asyncio.CancelledError:  # the client left, or another input failed
            timer.on_abort()
            raise
        timer.on_pooled(output)
        return output

    def usage(self, outputs: list[PoolingRequestOutput]) -> UsageInfo:
        num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
        details = None
        if self.settings.prompt_tokens_details:
            details = PromptTokensDetails(cached_tokens=sum(o.num_cached_tokens for o in outputs))
        return UsageInfo(
            prompt_tokens=num_prompt, total_tokens=num_prompt, prompt_tokens_details=details
        )


def _encode_vector(output: PoolingRequestOutput, encoding_format: str) -> list[float] | str:
    """The embedding as floats, or base64 of its little-endian float32 bytes (what the openai
    client asks for by default, and decodes)."""
    assert output.outputs is not None  # failures raise before this
    data = output.outputs.data.to(torch.float32).cpu()
    if encoding_format == "base64":
        return base64.b64encode(data.numpy().astype("<f4").tobytes()).decode("ascii")
    return data.tolist()
