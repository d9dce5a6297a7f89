"""POST /v1/responses: OpenAI's Responses API on top of Chat Completions. A request becomes an
internal ChatCompletionRequest (ChatServer renders, checks and runs it); the choice's deltas,
split by ChatOutput, become output items and streamed events. A stored response's conversation
is kept in memory (ResponseStore) for a later previous_response_id."""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response

from tokenmill.engine.input_processor import EngineInput
from tokenmill.errors import InvalidRequestError, NotFoundError
from tokenmill.server.protocol import ChatCompletionRequest, UsageInfo
from tokenmill.server.protocol_responses import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputItem,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    to_chat_request,
    to_messages,
)
from tokenmill.server.serving_base import ServingBase, check_unsupported_fields
from tokenmill.server.serving_chat import ChatServer
from tokenmill.server.sse import EventStreamResponse

# a chat request's parameter names as the Responses request spells them
_PARAMS = {
    "reasoning_effort": "reasoning.effort",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "messages": "input",
}


@dataclass(slots=True)
class _Stored:
    response: dict[str, Any]  # the response object as returned
    messages: list[dict[str, Any]]  # its conversation (input then output; no instructions)
    num_chars: int


class ResponseStore:
    """Stored responses in this process's memory, least recently used dropped first once
    there are more than `max_responses` or their JSON passes `max_chars` characters."""

    def __init__(self, max_responses: int = 1000, max_chars: int = 64 << 20):
        self.max_responses, self.max_chars = max_responses, max_chars
        self._entries: OrderedDict[str, _Stored] = OrderedDict()
        self.num_chars = 0

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        num_chars = len(json.dumps(response)) + len(json.dumps(messages))
        if num_chars > self.max_chars:
            return  # bigger than the whole store: never kept
        replaced = self._entries.pop(response["id"], None)
        if replaced is not None:
            self.num_chars -= replaced.num_chars
        self._entries[response["id"]] = _Stored(response, messages, num_chars)
        self.num_chars += num_chars
        while len(self._entries) > self.max_responses or self.num_chars > self.max_chars:
            _, dropped = self._entries.popitem(last=False)
            self.num_chars -= dropped.num_chars

    def get(self, response_id: str) -> _Stored | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def __len__(self) -> int:
        return len(self._entries)


class ResponsesServer(ServingBase):
    """Serves the Responses API through ChatServer's rendering, checks and engine stream."""

    def __init__(self, *args: Any, chat: ChatServer, store: ResponseStore | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.chat = chat
        self.store = store if store is not None else ResponseStore()

    async def create(self, request: ResponsesRequest) -> Response:
        model = self.check_model(request.model)
        self.check_alive()
        check_unsupported_fields(request)  # (OpenAI's and vLLM's, as Chat's)
        history = self._history(request.previous_response_id)
        chat_request, conversation = to_chat_request(request, history)
        response_id = request.request_id or f"resp_{uuid.uuid4().hex}"
        if request.request_id is not None and self.store.get(request.request_id) is not None:
            raise InvalidRequestError(
                f"request_id {request.request_id!r} names a stored response already",
                param="request_id",
            )
        before_input = len(chat_request.messages) - len(conversation) + len(history)
        inputs = await self._engine_inputs(chat_request, before_input)
        self.check_admission()
        self.log_request(response_id, inputs)
        shell = _shell(request, response_id, model)
        events = self._events(shell, chat_request, inputs, conversation, shell.store)
        if request.stream:
            return EventStreamResponse(_sse(events))
        final: dict[str, Any] = {}
        async with aclosing(events) as stream:
            async for event in stream:
                final = event
        return JSONResponse(final["response"])

    def retrieve(self, response_id: str) -> Response:
        entry = self.store.get(response_id)
        if entry is None:
            raise NotFoundError(
                f"response {response_id!r} not found: responses are kept in memory per process",
                param="response_id",
            )
        return JSONResponse(entry.response)

    def _history(self, response_id: str | None) -> list[dict[str, Any]]:
        if response_id is None:
            return []
        entry = self.store.get(response_id)
        if entry is None:
            raise InvalidRequestError(
                f"previous response {response_id!r} not found: responses are kept in memory "
                "per process (and only with store true)",
                param="previous_response_id",
            )
        return entry.messages

    async def _engine_inputs(
        self, chat_request: ChatCompletionRequest, before_input: int
    ) -> list[EngineInput]:
        """The chat request run as chat runs it; its errors name the Responses fields
        (`before_input`: the chat messages ahead of the input's: instructions, history)."""
        try:
            return await self.chat.to_engine_inputs(chat_request)
        except InvalidRequestError as exc:
            param = exc.param or ""
            index, _, rest = param.removeprefix("messages.").partition(".")
            if param.startswith("messages.") and index.isdigit() and int(index) >= before_input:
                exc.param = ".".join(["input", str(int(index) - before_input), rest]).rstrip(".")
            else:
                exc.param = _PARAMS.get(param, exc.param)
            raise

    async def _events(
        self,
        shell: ResponseObject,
        chat_request: ChatCompletionRequest,
        inputs: list[EngineInput],
        conversation: list[dict[str, Any]],
        store: bool,
    ) -> AsyncGenerator[dict[str, Any]]:
        """Every event of the response, the last one carrying the finished response."""
        writer = EventWriter(shell)
        for event in writer.start():
            yield event
        splitter = self.chat.chat_output(chat_request, inputs[0])
        tracker = self.tracker(inputs)
        finish: str | None = None
        reasoning: str | None
        content: str | None
        engine_id = f"{shell.id}-{uuid.uuid4().hex[:12]}"  # (a client's id need not be unique)
        async with aclosing(self.chat.generate(inputs, engine_id)) as outputs:
            async for i, output in outputs:
                for delta in tracker.update(i, output):
                    if splitter.is_plain:
                        reasoning, content, pieces = None, delta.text, []
                        finish = delta.finish_reason or finish
                    else:
                        message, reason = splitter.delta(
                            delta.index, delta.output.text, delta.finish_reason
                        )
                        finish = reason or finish
                        if message is None:
                            continue
                        reasoning, content = message.reasoning_content, message.content
                        pieces = message.tool_calls or []
                    for event in writer.add(reasoning, content, pieces):
                        yield event
        done = writer.finish(finish, _usage(tracker.usage()))
        if store:
            items = [item.model_dump(mode="json") for item in shell.output]
            self.store.put(shell.model_dump(mode="json"), conversation + to_messages(items))
        for event in done:
            yield event


class EventWriter:
    """Turns one choice's pieces (thought, content, tool-call pieces) into Responses events,
    numbered from 0, and keeps the output items they add up to in the response."""

    def __init__(self, response: ResponseObject):
        self.response = response
        self.num_events = 0
        self.open: OutputItem | None = None  # the item deltas go to
        self.calls: dict[int, tuple[FunctionCallItem, int]] = {}  # call index: item, output index

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type_, "sequence_number": self.num_events, **fields}
        self.num_events += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        body = self.response.model_dump(mode="json")
        return [self.event("response.created", response=body),
                self.event("response.in_progress", response=body)]  # fmt: skip

    def add(
        self, reasoning: str | None, content: str | None, pieces: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if reasoning:
            item = self._item(ReasoningItem, events)
            item.content[0].text += reasoning
            events.append(self.event("response.reasoning_text.delta", delta=reasoning,
                                     **self._where(item)))  # fmt: skip
        if content:
            message = self._item(MessageItem, events)
            message.content[0].text += content
            events.append(self.event("response.output_text.delta", delta=content, logprobs=[],
                                     **self._where(message)))  # fmt: skip
        for piece in pieces:
            events += self._call_piece(piece)
        return events

    def finish(self, reason: str | None, usage: ResponseUsage) -> list[dict[str, Any]]:
        """The last events: the open item done, then response.completed (or .incomplete)."""
        is_cut = reason == "length"
        events = self._close("incomplete" if is_cut else "completed")
        response = self.response
        response.status, response.usage = ("incomplete" if is_cut else "completed"), usage
        if is_cut:
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        name = "response.incomplete" if is_cut else "response.completed"
        return [*events, self.event(name, response=response.model_dump(mode="json"))]

    def _item(self, kind: type[MessageItem | ReasoningItem], events: list[dict[str, Any]]) -> Any:
        """The open item if it is of this kind, else a new one (the open one done first)."""
        if isinstance(self.open, kind):
            return self.open
        events += self._close("completed")
        if kind is ReasoningItem:
            item: OutputItem = ReasoningItem(id=f"rs_{uuid.uuid4().hex}", status="in_progress")
            part: Any = ReasoningText()
        else:
            item = MessageItem(id=f"msg_{uuid.uuid4().hex}", status="in_progress")
            part = OutputText()
        events += self._add_item(item)
        item.content.append(part)  # type: ignore[union-attr]
        events.append(self.event("response.content_part.added", part=part.model_dump(mode="json"),
                                 **self._where(item)))  # fmt: skip
        return item

    def _add_item(self, item: OutputItem) -> list[dict[str, Any]]:
        self.open = item
        self.response.output.append(item)
        index = len(self.response.output) - 1
        body = item.model_dump(mode="json")
        return [self.event("response.output_item.added", output_index=index, item=body)]

    def _call_piece(self, piece: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        arguments = piece["function"].get("arguments") or ""
        if "id" in piece:  # a new call: its id and name, maybe the start of its arguments
            events += self._close("completed")
            call = FunctionCallItem(
                id=f"fc_{uuid.uuid4().hex}",
                call_id=piece["id"],
                name=piece["function"]["name"],
                status="in_progress",
            )
            events += self._add_item(call)
            self.calls[piece["index"]] = (call, len(self.response.output) - 1)
        call, index = self.calls[piece["index"]]
        if arguments:
            call.arguments += arguments
            events.append(self.event("response.function_call_arguments.delta", item_id=call.id,
                                     output_index=index, delta=arguments))  # fmt: skip
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        """The open item's done events (none when no item is open)."""
        item, self.open = self.open, None
        if item is None:
            return []
        item.status = status  # type: ignore[assignment]
        index = self.response.output.index(item)
        events: list[dict[str, Any]] = []
        if isinstance(item, FunctionCallItem):
            events.append(self.event("response.function_call_arguments.done", item_id=item.id,
                                     output_index=index, arguments=item.arguments))  # fmt: skip
        else:
            part = item.content[0]
            name = "reasoning_text" if isinstance(item, ReasoningItem) else "output_text"
            extra: dict[str, Any] = {} if isinstance(item, ReasoningItem) else {"logprobs": []}
            events.append(self.event(f"response.{name}.done", text=part.text, **extra,
                                     **self._where(item)))  # fmt: skip
            events.append(self.event("response.content_part.done",
                                     part=part.model_dump(mode="json"), **self._where(item)))  # fmt: skip
        body = item.model_dump(mode="json")
        return [*events, self.event("response.output_item.done", output_index=index, item=body)]

    def _where(self, item: OutputItem) -> dict[str, Any]:
        index = self.response.output.index(item)
        return {"item_id": item.id, "output_index": index, "content_index": 0}


def _shell(request: ResponsesRequest, response_id: str, model: str) -> ResponseObject:
    """The response as it starts: the request's settings echoed, no output yet."""
    effort = request.reasoning.effort if request.reasoning else None
    return ResponseObject(
        id=response_id,
        model=model,
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        metadata=request.metadata,
        parallel_tool_calls=request.parallel_tool_calls is not False,
        previous_response_id=request.previous_response_id,
        reasoning={"effort": effort, "summary": None} if request.reasoning else None,
        store=request.store is not False,
        temperature=request.temperature,
        text={"format": (request.text.format if request.text else None) or {"type": "text"}},
        tool_choice=request.tool_choice or "auto",
        tools=request.tools or [],
        top_p=request.top_p,
        user=request.user,
    )


def _usage(usage: UsageInfo) -> ResponseUsage:
    details = usage.prompt_tokens_details
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=details.cached_tokens if details else 0
        ),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


async def _sse(events: AsyncGenerator[dict[str, Any]]) -> AsyncIterator[str]:
    """Each event as `event: <type>` and its JSON; closing this closes the engine stream."""
    async with aclosing(events) as stream:
        async for event in stream:
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
