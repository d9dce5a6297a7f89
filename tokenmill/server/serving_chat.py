"""POST /v1/chat/completions: messages through the chat template, outputs to chat responses."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, Response

from tokenmill.engine.input_processor import EngineInput
from tokenmill.engine.outputs import PositionLogprobs, RequestOutput
from tokenmill.errors import InvalidRequestError
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.multimodal.media import load_images
from tokenmill.server.chat_output import ChatOutput
from tokenmill.server.choices import ChoiceDelta
from tokenmill.server.limits import RequestLimits, check_chat_limits
from tokenmill.server.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatContentPart,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    ImageURL,
    TokenizeChatRequest,
)
from tokenmill.server.serving_base import (
    RequestIds,
    ServingBase,
    check_unsupported_fields,
    request_ids,
    usage_in_chunks,
)
from tokenmill.server.sse import EventStreamResponse, sse_event
from tokenmill.tokenizer.chat_template import render_chat, template_reads_parts
from tokenmill.tools.formats import detect_format, format_named
from tokenmill.tools.request import ToolUse, tool_use

if TYPE_CHECKING:
    from PIL.Image import Image

_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
_AUDIO_PARTS = frozenset({"input_audio", "audio_url", "audio"})

ChatPromptRequest = ChatCompletionRequest | TokenizeChatRequest


class ChatServer(ServingBase):
    """Serves the Chat Completions API."""

    async def create(
        self, request: ChatCompletionRequest, header_id: str | None = None
    ) -> Response:
        model = self.check_model(request.model)
        self.check_alive()
        request_id, engine_id = request_ids("chatcmpl", header_id or request.request_id)
        inputs = await self.to_engine_inputs(request)
        self.check_admission()
        self.log_request(request_id, inputs)
        if request.stream:
            return EventStreamResponse(
                self._stream(request, (request_id, engine_id), model, inputs)
            )
        response = await self._collect(request, (request_id, engine_id), model, inputs)
        return JSONResponse(response.model_dump(mode="json"))

    async def to_engine_inputs(self, request: ChatCompletionRequest) -> list[EngineInput]:
        """The request as one engine input: rendered, tokenized, with its SamplingParams."""
        _check_chat_options(request, self.settings.limits)
        max_tokens = request.max_completion_tokens
        if max_tokens is None:
            max_tokens = request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = await self.sampling_params(request, max_tokens, logprobs, request.prompt_logprobs)
        if request.thinking_token_budget is not None:
            if self.engine.reasoning_markers is None:
                raise InvalidRequestError(
                    "thinking_token_budget needs a reasoning model: this model's chat template "
                    "has no <think> markers (or pass --reasoning-parser)",
                    param="thinking_token_budget",
                )
            params = dataclasses.replace(
                params, thinking_token_budget=request.thinking_token_budget
            )
        use = self.tool_use(request)
        if use is not None and use.parses_calls:
            if params.structured_outputs is not None:
                raise InvalidRequestError(
                    "tool calls are constrained by the tools' schemas: response_format, guided_* "
                    "and structured_outputs apply only with tool_choice 'none'",
                    param="tool_choice",
                )
            params = dataclasses.replace(params, structured_outputs=use.constraint())
        prompt_token_ids, images = await self.render_prompt(request, use)  # checks the limits
        grammar = await self.compile_grammar(params)
        return [
            self.to_engine_input(
                prompt_token_ids, params, "messages", grammar, request.cache_salt,
                request.priority, images,
            )
        ]  # fmt: skip

    def tool_use(self, request: ChatPromptRequest) -> ToolUse | None:
        """The request's tools, checked, with the tool-call syntax of the template it uses."""
        tools = getattr(request, "tools", None)
        if tools is None and getattr(request, "tool_choice", None) in (None, "none"):
            return None
        parser = self.settings.tool_call_parser
        template = request.chat_template or self.engine.tokenizer.chat_template
        fmt = format_named(parser) if parser else detect_format(template)
        return tool_use(
            tools,
            getattr(request, "tool_choice", None),
            getattr(request, "parallel_tool_calls", None),
            fmt,
            self.settings.limits.max_tools,
        )

    def chat_output(self, request: ChatCompletionRequest, item: EngineInput) -> ChatOutput:
        """How the request's choices split into thought, calls and content."""
        use = self.tool_use(request)
        markers = self.engine.reasoning_markers
        return ChatOutput(
            tools=use if use is not None and use.parses_calls else None,
            reasoning=markers,
            in_thought=markers is not None and markers.prompt_in_thought(item.prompt_token_ids),
            include_reasoning=request.include_reasoning,
        )

    async def prompt_token_ids(self, request: ChatPromptRequest) -> list[int]:
        """The rendered, tokenized conversation of a request that takes no images
        (embeddings)."""
        prompt, _ = await self.render_prompt(request, images_allowed=False)
        return prompt

    async def render_prompt(
        self,
        request: ChatPromptRequest,
        use: ToolUse | None = None,
        images_allowed: bool = True,
    ) -> tuple[list[int], tuple[ImageInput, ...]]:
        """Render the conversation (and its tools) and tokenize it, in the tokenizer thread;
        a vision model's image parts fetched and expanded into its image tokens."""
        check_chat_limits(request, self.settings.limits)
        if request.continue_final_message and request.add_generation_prompt:
            raise InvalidRequestError(
                "cannot set both continue_final_message and add_generation_prompt to true",
                param="continue_final_message",
            )
        if use is None:
            use = self.tool_use(request)
        processor = self.engine.image_processor
        template = request.chat_template or self.engine.tokenizer.chat_template
        as_parts = processor is not None and template_reads_parts(template)
        messages, urls = to_template_messages(request.messages, as_parts)
        if urls and not images_allowed:
            raise InvalidRequestError("embeddings of images are not supported", param=urls[0][1])
        if urls and processor is None:
            raise InvalidRequestError("this model does not accept images", param=urls[0][1])
        if urls and not as_parts:
            raise InvalidRequestError(
                "the chat template renders text content only, so it has no place for images",
                param=urls[0][1],
            )
        kwargs = getattr(request, "mm_processor_kwargs", None) or {}
        if processor is not None:  # checked before anything is fetched
            kwargs = processor.check_kwargs(kwargs, "mm_processor_kwargs")
        elif kwargs:
            raise InvalidRequestError(
                "this model does not accept images", param="mm_processor_kwargs"
            )
        images = await load_images(urls, self.settings.media, self.settings.limits.max_images)
        return await self.run_blocking(
            self._render_and_encode, request, use, messages, images, kwargs
        )

    def _render_and_encode(
        self,
        request: ChatPromptRequest,
        use: ToolUse | None,
        messages: list[dict[str, Any]],
        images: list[Image],
        processor_kwargs: dict[str, Any],
    ) -> tuple[list[int], tuple[ImageInput, ...]]:
        tokenizer, documents = self.engine.tokenizer, request.documents
        template_kwargs = _with_reasoning_effort(request, tokenizer.chat_template)
        if self.settings.default_chat_template_kwargs:
            template_kwargs = {
                **self.settings.default_chat_template_kwargs,
                **(template_kwargs or {}),
            }
        if use is not None:
            messages = use.template_messages(messages)
        prompt = render_chat(
            tokenizer,
            messages,
            tools=use.template_tools() if use is not None else None,
            chat_template=request.chat_template,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template_kwargs=template_kwargs,
            documents=[d.model_dump(exclude_none=True) for d in documents] if documents else None,
            budget=self.settings.limits.render_budget,
        )
        ids = tokenizer.encode(prompt, add_special_tokens=request.add_special_tokens)
        processor = self.engine.image_processor
        if processor is None:
            return ids, ()
        return processor.expand(ids, images, "messages", processor_kwargs)

    async def _collect(
        self, request: ChatCompletionRequest, ids: RequestIds, model: str, inputs: list[EngineInput]
    ) -> ChatCompletionResponse:
        request_id, engine_id = ids
        role, echo = _response_role(request), _echo_text(request)
        splitter = self.chat_output(request, inputs[0])
        tracker = self.tracker(inputs)
        final: RequestOutput | None = None
        async with aclosing(self.generate(inputs, engine_id)) as outputs:
            async for i, output in outputs:
                tracker.update(i, output)
                final = output
        assert final is not None  # every engine stream ends with its finished output
        choices = []
        for seq in final.outputs:
            message = ChatResponseMessage(role=role, content=echo + seq.text)
            reason: str | None = seq.finish_reason
            if not splitter.is_plain:
                message, reason = splitter.message(role, echo, seq)
            choices.append(
                ChatCompletionResponseChoice(
                    index=seq.index,
                    message=message,
                    logprobs=self._logprobs(request, seq.token_ids, seq.logprobs),
                    finish_reason=reason,
                    stop_reason=seq.stop_reason,
                    token_ids=list(seq.token_ids) if request.return_token_ids else None,
                )
            )
        return ChatCompletionResponse(
            id=request_id,
            model=model,
            choices=choices,
            usage=tracker.usage(),
            prompt_logprobs=(
                self.logprobs.prompt(final.prompt_logprobs)
                if request.prompt_logprobs is not None
                else None
            ),
            prompt_token_ids=list(final.prompt_token_ids) if request.return_token_ids else None,
        )

    def _logprobs(
        self,
        request: ChatCompletionRequest,
        token_ids: list[int],
        entries: list[PositionLogprobs] | None,
    ) -> ChatCompletionLogProbs | None:
        if not request.logprobs:
            return None
        return self.logprobs.chat(
            token_ids, entries or [], request.top_logprobs or 0, self.tokens_as_ids(request)
        )

    async def _stream(
        self, request: ChatCompletionRequest, ids: RequestIds, model: str, inputs: list[EngineInput]
    ) -> AsyncIterator[str]:
        request_id, engine_id = ids
        created = int(time.time())
        include_usage, continuous = usage_in_chunks(request, self.settings.force_include_usage)
        exclude = None if include_usage else {"usage"}
        tracker = self.tracker(inputs)

        prompt_ids = list(inputs[0].prompt_token_ids) if request.return_token_ids else None

        prompt_logprobs_due = request.prompt_logprobs is not None

        def chunk(
            choices: list[ChatCompletionStreamChoice], output: RequestOutput | None = None
        ) -> str:
            nonlocal prompt_ids, prompt_logprobs_due
            response = ChatCompletionStreamResponse(
                id=request_id, created=created, model=model, choices=choices,
                usage=tracker.usage() if continuous else None, prompt_token_ids=prompt_ids,
            )  # fmt: skip
            prompt_ids = None  # the first chunk only
            if output is not None and prompt_logprobs_due and output.prompt_logprobs is not None:
                response.prompt_logprobs = self.logprobs.prompt(output.prompt_logprobs)
                prompt_logprobs_due = False
            return sse_event(response, exclude=exclude)

        role, echo = _response_role(request), _echo_text(request)
        splitter = self.chat_output(request, inputs[0])
        for index in range(request.n):  # the first delta of each choice carries the role
            yield chunk([_stream_choice(index, DeltaMessage(role=role, content=echo))])
        async with aclosing(self.generate(inputs, engine_id)) as outputs:
            async for i, output in outputs:
                for delta in tracker.update(i, output):
                    if not splitter.is_plain:
                        message, reason = splitter.delta(
                            delta.index, delta.output.text, delta.finish_reason
                        )
                        if message is None:  # held back (a call's name arriving, say)
                            if not (request.logprobs or request.return_token_ids):
                                continue
                            message = DeltaMessage()  # its tokens' logprobs and ids go now
                        delta.finish_reason = reason
                    elif delta.text or delta.finish_reason:
                        message = DeltaMessage(content=delta.text or None)
                    else:
                        continue
                    logprobs = self._logprobs(request, delta.new_token_ids, delta.new_logprobs)
                    choice = _stream_choice(delta.index, message, delta, logprobs)
                    if request.return_token_ids:
                        choice.token_ids = delta.new_token_ids
                    yield chunk([choice], output)
        if include_usage:
            usage_chunk = ChatCompletionStreamResponse(
                id=request_id, created=created, model=model, choices=[], usage=tracker.usage()
            )
            yield sse_event(usage_chunk)


def to_template_messages(
    messages: list[ChatMessage], as_parts: bool = False
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Messages as the plain dicts chat templates expect, and the image URLs in order (with
    the parameter each came from). Content is a string (text parts joined), or with
    `as_parts` (a vision model's template) a list of {"type": "text", "text": ...} and
    {"type": "image"} parts."""
    result = []
    urls: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        item = {k: v for k, v in message.model_dump(exclude={"content"}).items() if v is not None}
        parts = _content_parts(message.content, i, urls)
        if as_parts:
            item["content"] = parts
        else:
            item["content"] = "\n".join(p["text"] for p in parts if p["type"] == "text")
        if item["role"] == "developer":  # OpenAI's newer name for system; templates know system
            item["role"] = "system"
        result.append(item)
    return result, urls


def _content_parts(
    content: Any, message_index: int, urls: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """A message's content as template parts; image parts' URLs appended to `urls`."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        param = f"messages.{message_index}.content.{j}"
        if part.type in _IMAGE_PARTS:
            urls.append((_image_url(part, param), param))
            parts.append({"type": "image"})
        elif part.type in _AUDIO_PARTS:
            raise InvalidRequestError("this model does not accept audio", param=param)
        elif part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"unsupported content part type {part.type!r} (expected 'text' with a 'text' "
                "field, or 'image_url')",
                param=param,
            )
        else:
            parts.append({"type": "text", "text": part.text})
    return parts


def _image_url(part: ChatContentPart, param: str) -> str:
    """The URL of an image part: {"type": "image_url", "image_url": {"url": ...}} (OpenAI's),
    or the URL as a string (the Responses API's input_image)."""
    value = part.image_url
    url = value.url if isinstance(value, ImageURL) else value
    if not isinstance(url, str) or not url:
        raise InvalidRequestError(
            f'a {part.type} part needs image_url: {{"url": ...}}', param=param
        )
    return url


def _text_of(content: Any, message_index: int) -> str:
    """A message's text: a string as is, text parts joined by newlines (as vLLM does)."""
    parts = _content_parts(content, message_index, [])
    return "\n".join(p["text"] for p in parts if p["type"] == "text")


def _check_chat_options(request: ChatCompletionRequest, limits: RequestLimits) -> None:
    """400 for chat options whose feature has not landed yet, and for top_logprobs out of range."""
    check_unsupported_fields(request)
    if request.top_logprobs is not None:
        if not 0 <= request.top_logprobs <= limits.max_logprobs:
            raise InvalidRequestError(
                f"top_logprobs must be in [0, {limits.max_logprobs}]; got {request.top_logprobs}",
                param="top_logprobs",
            )
        if request.top_logprobs > 0 and not request.logprobs:  # (0 asks for nothing: vLLM's)
            raise InvalidRequestError(
                "when using top_logprobs, logprobs must be set to true", param="top_logprobs"
            )


def _with_reasoning_effort(
    request: ChatPromptRequest, model_template: str | None
) -> dict[str, Any] | None:
    """chat_template_kwargs plus reasoning_effort, for a template that reads it."""
    effort = getattr(request, "reasoning_effort", None)
    if effort is None:
        return request.chat_template_kwargs
    template = request.chat_template or model_template or ""
    if "reasoning_effort" not in template:
        raise InvalidRequestError(
            "reasoning_effort has no effect on this model: its chat template does not read it",
            param="reasoning_effort",
        )
    return {**(request.chat_template_kwargs or {}), "reasoning_effort": effort}


def _response_role(request: ChatCompletionRequest) -> str:
    """A new assistant message, or (continuing) the role of the last message (as vLLM does)."""
    return "assistant" if request.add_generation_prompt else request.messages[-1].role


def _echo_text(request: ChatCompletionRequest) -> str:
    """With echo, the last message's text when it has the response's role."""
    last = request.messages[-1]
    if not request.echo or last.role != _response_role(request):
        return ""
    return _text_of(last.content, len(request.messages) - 1)


def _stream_choice(
    index: int,
    delta: DeltaMessage,
    finish: ChoiceDelta | None = None,
    logprobs: ChatCompletionLogProbs | None = None,
) -> ChatCompletionStreamChoice:
    return ChatCompletionStreamChoice(
        index=index,
        delta=delta,
        logprobs=logprobs,
        finish_reason=finish.finish_reason if finish else None,
        stop_reason=finish.stop_reason if finish else None,
    )
