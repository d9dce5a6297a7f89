"""A chat choice's text as OpenAI's message: the thought of a reasoning model in
`reasoning_content` (and `reasoning`, vLLM's newer name), tool calls in `tool_calls`, the rest
in `content`; whole, or streamed as deltas that add up to the whole (tools/reasoning.py and
tools/parser.py split any prefix of an output as a prefix of the split of all of it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.outputs import CompletionOutput
from tokenmill.server.protocol import ChatResponseMessage, DeltaMessage
from tokenmill.tools.parser import CallDelta, ToolCallStream, new_call_id, parse
from tokenmill.tools.reasoning import ReasoningMarkers, split_reasoning
from tokenmill.tools.request import ToolUse


def finish_reason(reason: str | None, num_calls: int) -> str | None:
    """ "tool_calls" for a choice that ended by itself after calling tools (not for "length")."""
    return "tool_calls" if num_calls and reason == "stop" else reason


@dataclass(slots=True)
class _ChoiceState:
    reasoning_sent: int = 0
    content_sent: int = 0
    calls: ToolCallStream | None = None


@dataclass(slots=True)
class ChatOutput:
    """How one request's choices are split: its tools (None: no call parsing) and its
    reasoning markers (None: no thought), with whether the prompt left the model in one."""

    tools: ToolUse | None
    reasoning: ReasoningMarkers | None
    in_thought: bool
    include_reasoning: bool = True  # False: the thought is dropped (vLLM's include_reasoning)
    _choices: dict[int, _ChoiceState] = field(default_factory=dict)

    @property
    def is_plain(self) -> bool:
        return self.tools is None and self.reasoning is None

    def _split(self, text: str, final: bool) -> tuple[str | None, str]:
        if self.reasoning is None:
            return None, text
        split = split_reasoning(text, self.reasoning, self.in_thought, final)
        return (split.reasoning if self.include_reasoning else None), split.content

    def message(
        self, role: str, echo: str, output: CompletionOutput
    ) -> tuple[ChatResponseMessage, str | None]:
        """A finished choice's message and finish reason."""
        reasoning, text = self._split(output.text, final=True)
        calls: list[dict[str, Any]] = []
        content: str | None = echo + text
        if self.tools is not None:
            parsed = parse(text, self.tools.fmt, final=True)
            calls = [
                _call(new_call_id(), c.name, c.arguments)
                for c in parsed.calls
                if c.name is not None
            ]
            content = echo + parsed.message_content(final=True)
            if calls and not content:
                content = None
        message = ChatResponseMessage(role=role, content=content, tool_calls=calls)
        if reasoning:
            message.reasoning_content = message.reasoning = reasoning
        return message, finish_reason(output.finish_reason, len(calls))

    def delta(
        self, index: int, text: str, reason: str | None
    ) -> tuple[DeltaMessage | None, str | None]:
        """Choice `index`'s delta now that its text is `text` (None: nothing to send yet),
        and its finish reason (when `reason` says it finished)."""
        final = reason is not None
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _ChoiceState()
            if self.tools is not None:
                state.calls = ToolCallStream(self.tools.fmt)
        reasoning, answer = self._split(text, final)
        new_reasoning = (reasoning or "")[state.reasoning_sent :]
        state.reasoning_sent += len(new_reasoning)
        pieces: list[dict[str, Any]] = []
        num_calls = 0
        if state.calls is not None:
            content, calls = state.calls.update(answer, final)
            pieces, num_calls = [_piece(c) for c in calls], state.calls.num_calls
        else:
            content = answer[state.content_sent :]
            state.content_sent = len(answer)
        finish = finish_reason(reason, num_calls)
        if not (new_reasoning or content or pieces):
            return (DeltaMessage() if final else None), finish
        delta = DeltaMessage(content=content or None, tool_calls=pieces or None)
        if new_reasoning:
            delta.reasoning_content = delta.reasoning = new_reasoning
        return delta, finish


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _piece(delta: CallDelta) -> dict[str, Any]:
    if delta.id is not None and delta.name is not None:
        return {"index": delta.index, **_call(delta.id, delta.name, delta.arguments)}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}
