"""POST /v1/completions: prompts to engine requests, engine outputs to OpenAI responses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.responses import JSONResponse, Response

from tokenmill.errors import InvalidRequestError
from tokenmill.server.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
)
from tokenmill.server.serving_base import ChoiceTracker, EngineInput, ServingBase
from tokenmill.server.sse import EventStreamResponse, sse_event


class CompletionServer(ServingBase):
    """Serves the legacy Completions API."""

    async def create(self, request: CompletionRequest) -> Response:
        model = self.check_model(request.model)
        self.check_alive()
        request_id = f"cmpl-{uuid.uuid4().hex}"
        inputs, prompt_texts = await self.to_engine_inputs(request)
        self.log_request(request_id, inputs)
        echoes = prompt_texts if request.echo else [""] * len(inputs)
        if request.stream:
            return EventStreamResponse(self._stream(request, request_id, model, inputs, echoes))
        response = await self._collect(request_id, model, inputs, echoes)
        return JSONResponse(response.model_dump(mode="json"))

    async def to_engine_inputs(
        self, request: CompletionRequest
    ) -> tuple[list[EngineInput], list[str]]:
        """The request as engine inputs (one per prompt) and each prompt's text (for echo)."""
        _check_completion_options(request)
        params = self.sampling_params(request, request.max_tokens)
        prompts = await self.run_blocking(self._tokenize, request)
        inputs = [self.fit_to_context(ids, params, "prompt") for ids, _ in prompts]
        return inputs, [text for _, text in prompts]

    def _tokenize(self, request: CompletionRequest) -> list[tuple[list[int], str]]:
        """Token ids and text of each prompt (runs in the tokenizer thread)."""
        tokenizer, prompt = self.engine.tokenizer, request.prompt
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        result = []
        for item in prompt:
            if isinstance(item, str):
                ids = tokenizer.encode(item, add_special_tokens=request.add_special_tokens)
            else:
                ids = list(item)
                self.check_token_ids(ids, "prompt")
            if request.truncate_prompt_tokens is not None:
                ids = ids[-request.truncate_prompt_tokens :]
            text = item if isinstance(item, str) else ""
            if request.echo and not isinstance(item, str):
                text = tokenizer.decode(ids)
            result.append((ids, text))
        return result

    async def _collect(
        self, request_id: str, model: str, inputs: list[EngineInput], echoes: list[str]
    ) -> CompletionResponse:
        tracker = ChoiceTracker(inputs)
        texts: dict[int, str] = {}
        choices: dict[int, CompletionResponseChoice] = {}
        async with aclosing(self.generate(inputs, request_id)) as outputs:
            async for i, output in outputs:
                for delta in tracker.update(i, output):
                    texts[delta.index] = texts.get(delta.index, echoes[i]) + delta.text
                    choices[delta.index] = CompletionResponseChoice(
                        index=delta.index,
                        text=texts[delta.index],
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                    )
        return CompletionResponse(
            id=request_id,
            model=model,
            choices=[choices[i] for i in sorted(choices)],
            usage=tracker.usage(),
        )

    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        model: str,
        inputs: list[EngineInput],
        echoes: list[str],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        tracker = ChoiceTracker(inputs)
        async with aclosing(self.generate(inputs, request_id)) as outputs:
            async for i, output in outputs:
                for delta in tracker.update(i, output):
                    choice = CompletionResponseChoice(
                        index=delta.index,
                        text=(echoes[i] if delta.is_first else "") + delta.text,
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                    )
                    chunk = CompletionStreamResponse(
                        id=request_id, created=created, model=model, choices=[choice]
                    )
                    yield sse_event(chunk, exclude=exclude)
        if include_usage:
            chunk = CompletionStreamResponse(
                id=request_id, created=created, model=model, choices=[], usage=tracker.usage()
            )
            yield sse_event(chunk)


def _check_completion_options(request: CompletionRequest) -> None:
    """400 for Completions options whose feature has not landed yet."""
    for name in ("logprobs", "suffix", "allowed_token_ids"):
        if getattr(request, name) is not None:
            raise InvalidRequestError(f"{name} is not supported yet", param=name)
