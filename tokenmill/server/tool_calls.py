"""Tool calls in Chat Completions responses: a choice's text split into content and
`tool_calls` (tokenmill/tools/parser.py), whole or streamed as OpenAI's deltas."""

from __future__ import annotations

from typing import Any

from tokenmill.engine.outputs import CompletionOutput
from tokenmill.server.protocol import ChatResponseMessage, DeltaMessage
from tokenmill.tools.parser import CallDelta, ToolCallStream, new_call_id, parse
from tokenmill.tools.request import ToolUse


def finish_reason(reason: str | None, num_calls: int) -> str | None:
    """ "tool_calls" for a choice that ended by itself after calling tools (not for "length")."""
    return "tool_calls" if num_calls and reason == "stop" else reason


def tool_message(
    role: str, echo: str, output: CompletionOutput, use: ToolUse
) -> tuple[ChatResponseMessage, str | None]:
    """A finished choice's message and finish reason; content None when it only called tools."""
    parsed = parse(output.text, use.fmt, final=True)
    calls = [
        _call(new_call_id(), call.name, call.arguments)
        for call in parsed.calls
        if call.name is not None
    ]
    content: str | None = echo + parsed.message_content(final=True)
    if calls and not content:
        content = None
    message = ChatResponseMessage(role=role, content=content, tool_calls=calls)
    return message, finish_reason(output.finish_reason, len(calls))


class ToolDeltas:
    """The streamed deltas of one request's choices."""

    def __init__(self, use: ToolUse):
        self.use = use
        self._streams: dict[int, ToolCallStream] = {}

    def delta(
        self, index: int, text: str, reason: str | None
    ) -> tuple[DeltaMessage | None, str | None]:
        """The message delta of choice `index` whose text is now `text` (None: nothing new)
        and its finish reason (when `reason` says it finished)."""
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = ToolCallStream(self.use.fmt)
        final = reason is not None
        content, calls = stream.update(text, final)
        finish = finish_reason(reason, stream.num_calls)
        if not content and not calls:
            return (DeltaMessage() if final else None), finish
        return DeltaMessage(
            content=content or None, tool_calls=[_piece(c) for c in calls] or None
        ), finish


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _piece(delta: CallDelta) -> dict[str, Any]:
    if delta.id is not None and delta.name is not None:
        return {"index": delta.index, **_call(delta.id, delta.name, delta.arguments)}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}
